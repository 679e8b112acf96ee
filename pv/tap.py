"""TUN/TAP ioctls on a tap fd (linux/if_tun.h, Documentation/networking/tuntap.rst), in one place.

The device model only issues the ioctls that work on an *already attached* fd without CAP_NET_ADMIN
(TUNSETVNETHDRSZ, TUNSETOFFLOAD, TUNGETIFF, TUNGETVNETHDRSZ; all allowed by daemon.seccomp_policy). Creating the
interface (TUNSETIFF on /dev/net/tun, TUNSETPERSIST, TUNSETOWNER) is the daemon's job (daemon.net), which passes the
fd down: pass fds, not paths. No ctypes: ``fcntl.ioctl`` with a packed ``struct ifreq`` is enough.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

TUN_DEVICE = "/dev/net/tun"

# <linux/if_tun.h> ioctl numbers (_IOW('T', n, int) / _IOR('T', n, unsigned int)).
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOWNER = 0x400454CC
TUNSETGROUP = 0x400454CE
TUNGETFEATURES = 0x800454CF
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNGETVNETHDRSZ = 0x800454D7
TUNSETVNETHDRSZ = 0x400454D8

# TUNSETIFF ifr_flags.
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

# TUNSETOFFLOAD flags: what the *reader of the tap* (our guest) can take (tuntap.rst; QEMU tap_fd_set_offload).
TUN_F_CSUM = 0x01  # packets with partial checksums (virtio GUEST_CSUM)
TUN_F_TSO4 = 0x02  # TSO over IPv4 (virtio GUEST_TSO4; needs TUN_F_CSUM)
TUN_F_TSO6 = 0x04  # TSO over IPv6 (virtio GUEST_TSO6; needs TUN_F_CSUM)
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

IFNAMSIZ = 16
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: ifr_name[IFNAMSIZ], ifr_flags, rest of the 24-byte union
assert _IFREQ.size == 40
_INT = struct.Struct("i")
_UINT = struct.Struct("I")


class TapError(OSError):
    """A tap ioctl failed (a host/config error, never the guest's fault)."""


def _ioctl(fd: int, name: str, req: int, arg: bytes | int) -> bytes | int:
    try:
        return fcntl.ioctl(fd, req, arg)  # type: ignore[no-any-return]
    except OSError as e:
        raise TapError(e.errno, f"{name} on fd {fd}: {os.strerror(e.errno or 0)}") from None


def _check_name(name: str) -> bytes:
    raw = name.encode("ascii")
    if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b"\0" in raw or raw.strip() != raw:
        raise ValueError(f"invalid interface name {name!r} (1..{IFNAMSIZ - 1} printable ASCII characters)")
    return raw


def open_tap(name: str, *, vnet_hdr: bool = True, nonblock: bool = True) -> tuple[str, int]:
    """Attach to (creating if needed) tap ``name`` (may be a template like ``tap%d``); returns (ifname, fd).

    IFF_NO_PI: no 4-byte packet-info prefix; IFF_VNET_HDR: every frame carries a virtio_net_hdr (size set with
    :func:`set_vnet_hdr_size`). Needs CAP_NET_ADMIN unless the tap exists and is owned by the caller.
    """
    raw = _check_name(name)
    flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC | (os.O_NONBLOCK if nonblock else 0))
    try:
        out = _ioctl(fd, "TUNSETIFF", TUNSETIFF, _IFREQ.pack(raw, flags))
        assert isinstance(out, bytes)
        ifname = _IFREQ.unpack(out)[0].rstrip(b"\0").decode("ascii")
    except BaseException:
        os.close(fd)
        raise
    return ifname, fd


def get_iff(fd: int) -> tuple[str, int]:
    """TUNGETIFF: (interface name, ifr_flags) of an attached tun/tap fd; TapError if ``fd`` is not one."""
    out = _ioctl(fd, "TUNGETIFF", TUNGETIFF, bytes(_IFREQ.size))
    assert isinstance(out, bytes)
    raw, flags = _IFREQ.unpack(out)
    return raw.rstrip(b"\0").decode("ascii", "replace"), flags


def is_tap(fd: int) -> bool:
    """True iff ``fd`` is an attached tap (not tun) fd; False for sockets, pipes, files (ENOTTY/EINVAL/EBADFD)."""
    try:
        _name, flags = get_iff(fd)
    except TapError as e:
        if e.errno in (errno.ENOTTY, errno.EINVAL, errno.EBADFD, errno.ENOTSOCK):
            return False
        raise
    return bool(flags & IFF_TAP)


def set_vnet_hdr_size(fd: int, size: int) -> None:
    """TUNSETVNETHDRSZ: the kernel reads/writes ``size`` header bytes per frame (>= 10; extra bytes skipped)."""
    _ioctl(fd, "TUNSETVNETHDRSZ", TUNSETVNETHDRSZ, _INT.pack(size))


def get_vnet_hdr_size(fd: int) -> int:
    out = _ioctl(fd, "TUNGETVNETHDRSZ", TUNGETVNETHDRSZ, _INT.pack(0))
    assert isinstance(out, bytes)
    return int(_INT.unpack(out)[0])


def set_offload(fd: int, flags: int) -> None:
    """TUNSETOFFLOAD: the offloads the tap may hand us (TUN_F_*); TSO flags without TUN_F_CSUM are refused."""
    _ioctl(fd, "TUNSETOFFLOAD", TUNSETOFFLOAD, flags)


def get_features(fd: int) -> int:
    """TUNGETFEATURES: the IFF_* flags this kernel's tun driver supports."""
    out = _ioctl(fd, "TUNGETFEATURES", TUNGETFEATURES, _UINT.pack(0))
    assert isinstance(out, bytes)
    return int(_UINT.unpack(out)[0])


def set_persist(fd: int, persist: bool) -> None:
    """TUNSETPERSIST: keep the interface after the last fd closes (needs CAP_NET_ADMIN)."""
    _ioctl(fd, "TUNSETPERSIST", TUNSETPERSIST, int(persist))


def set_owner(fd: int, uid: int) -> None:
    """TUNSETOWNER: let ``uid`` attach to the (persistent) interface without CAP_NET_ADMIN."""
    _ioctl(fd, "TUNSETOWNER", TUNSETOWNER, uid)
