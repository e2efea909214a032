"""kvhost: kernel vhost-net as a versioned vhost backend.

The package is layered; each module imports only from layers below it:

1. ``errors``, ``abi``, ``features``: exceptions, kernel ABI, named virtio feature bits.
2. ``ioctl``, ``versions``, ``memory``: the single ioctl helper, interface versions, guest memory.
3. ``vhost``, ``tap``, ``virtqueue``, ``qemu_args``: kernel devices and split rings.
4. ``probe``, ``vhost_user``: what this kernel offers; the vhost-user wire format.
5. ``manifest``: manifests written for management.
"""

__version__ = "0.1.0"
