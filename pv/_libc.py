"""The only ctypes in pv/: libc calls the os module lacks (pyudev's _ctypeslib pattern: signatures in one table)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_SIGNATURES: dict[str, tuple[type, list[type]]] = {
    # int fallocate(int fd, int mode, off_t offset, off_t len);
    "fallocate": (ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]),
}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
for _name, (_res, _args) in _SIGNATURES.items():
    _fn = getattr(_libc, _name)
    _fn.restype = _res
    _fn.argtypes = _args


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); raises OSError (errno EOPNOTSUPP when the filesystem cannot do ``mode``)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
