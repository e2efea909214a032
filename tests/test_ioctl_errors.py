"""The ioctl helper's errors: every errno becomes a KernelError that says what it means."""

from __future__ import annotations

import errno
import os

import pytest

from kvhost import abi
from kvhost.errors import DeviceUnavailable, KernelError
from kvhost.ioctl import ioctl, open_device


def test_enotty_names_the_missing_ioctl_and_its_release() -> None:
    # A real ioctl on a real file that does not implement it: the kernel answers ENOTTY.
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        buf = abi.buffer(abi.new_var("vhost_features_array", "features", 2, count=2))
        with pytest.raises(KernelError) as info:
            ioctl(fd, abi.VHOST_GET_FEATURES_ARRAY, buf, device="/dev/null")
    finally:
        os.close(fd)
    err = info.value
    assert err.errno == errno.ENOTTY
    assert err.op == "VHOST_GET_FEATURES_ARRAY"
    assert "this kernel has no VHOST_GET_FEATURES_ARRAY (added in Linux 6.17)" in str(err)


def test_tunsetiff_on_a_non_tun_fd_is_reported_against_that_device() -> None:
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        ifr = abi.new("ifreq")
        with pytest.raises(KernelError, match=r"TUNSETIFF on /dev/null failed: ENOTTY"):
            ioctl(fd, abi.TUNSETIFF, abi.buffer(ifr), device="/dev/null")
    finally:
        os.close(fd)


def test_ebadf_is_a_kernel_error_not_an_oserror() -> None:
    with pytest.raises(KernelError, match="EBADF"):
        ioctl(987654, abi.VHOST_SET_OWNER, device="/dev/vhost-net")


def test_missing_device_says_which_module_to_load(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(DeviceUnavailable, match="does not exist: load the module with "
                       "'modprobe vhost_net'"):
        open_device(f"{tmp_path}/vhost-net")


def test_unopenable_device_says_how_to_get_access(tmp_path: os.PathLike[str]) -> None:
    # A directory cannot be opened O_RDWR: EISDIR is neither "missing" nor "permission".
    with pytest.raises(DeviceUnavailable, match="EISDIR"):
        open_device(str(tmp_path))


def test_missing_arbitrary_device_is_device_unavailable(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(DeviceUnavailable, match="does not exist"):
        open_device(f"{tmp_path}/no-such-device")
