"""kvhost-shim: a vhost-user backend whose datapath is the kernel's vhost-net.

Unmodified QEMU connects to it as to any vhost-user net backend; every message is checked
against the pinned interface version and turned into kernel vhost ioctls, so guest memory,
kick/call eventfds and the tap go straight to vhost-net and no packet passes through Python::

    socket --> protocol (decode) --> session (state, version) --> kernel_backend --> vhost/tap

* :mod:`shim.session`: the per-connection state machine (sans-IO).
* :mod:`shim.kernel_backend`: the translation into kernel calls.
* :mod:`shim.tap_setup`: which tap a connection gets; the tap prepared for ``--user``.
* :mod:`shim.server`: sockets, fd passing, signals.
* :mod:`shim.cli`: the ``kvhost-shim`` program.
"""
