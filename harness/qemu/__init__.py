"""Driving Debian's real QEMU from tests without a guest OS.

* :mod:`harness.qemu.machine` builds the command line and runs one QEMU (TCG, HLT-only BIOS,
  shared memfd RAM, qtest + QMP sockets), with either QEMU's own tap/vhost-net backend or a
  vhost-user socket;
* :mod:`harness.qemu.qtest` and :mod:`harness.qemu.qmp` are the two control protocols;
* :mod:`harness.qemu.virtio_pci` is a modern virtio-net driver played over qtest.

Errors live in :mod:`harness.qemu.errors` (all carry QEMU's exit status and stderr).
"""
