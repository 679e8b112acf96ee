"""Every libc call the jail needs, in one private module (the pyudev ``_ctypeslib`` pattern).

Python 3.11 has no ``os.unshare``, ``mount``, ``pivot_root``, ``prctl`` or ``capset``; they are reached through
ctypes here and nowhere else. Each wrapper raises ``OSError(errno, ...)`` on failure so callers see the real errno.

libc is loaded by soname, never through ``ctypes.util.find_library``: that helper spawns ``ldconfig``/``gcc``,
which must not happen inside (or half-way into) the jail.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL("libc.so.6", use_errno=True)

# --- namespace flags, <linux/sched.h> ---------------------------------------------------------------------
CLONE_VM = 0x00000100
CLONE_FS = 0x00000200
CLONE_FILES = 0x00000400
CLONE_SIGHAND = 0x00000800
CLONE_PTRACE = 0x00002000
CLONE_VFORK = 0x00004000
CLONE_PARENT = 0x00008000
CLONE_THREAD = 0x00010000
CLONE_NEWNS = 0x00020000
CLONE_SYSVSEM = 0x00040000
CLONE_SETTLS = 0x00080000
CLONE_PARENT_SETTID = 0x00100000
CLONE_CHILD_CLEARTID = 0x00200000
CLONE_UNTRACED = 0x00800000
CLONE_CHILD_SETTID = 0x01000000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_IO = 0x80000000
# Every namespace bit clone(2) accepts in its 64-bit flags word (CLONE_NEWTIME, 0x80, is clone3/unshare only:
# in clone(2) the low byte is the exit signal).
CLONE_NEW_ALL = (
    CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET
)

# --- mount(2) flags, <linux/mount.h> ----------------------------------------------------------------------
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

# --- prctl(2) options, <linux/prctl.h> --------------------------------------------------------------------
PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_GET_NAME = 16
PR_GET_SECCOMP = 21
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_GET_SECUREBITS = 27
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

# <linux/securebits.h>
SECBIT_NOROOT = 1 << 0
SECBIT_NOROOT_LOCKED = 1 << 1
SECBIT_NO_SETUID_FIXUP = 1 << 2
SECBIT_NO_SETUID_FIXUP_LOCKED = 1 << 3
SECBIT_KEEP_CAPS = 1 << 4
SECBIT_KEEP_CAPS_LOCKED = 1 << 5
SECBIT_NO_CAP_AMBIENT_RAISE = 1 << 6
SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED = 1 << 7

# --- syscall numbers (x86_64, arch/x86/entry/syscalls/syscall_64.tbl) for calls without a glibc wrapper ----
SYS_clone = 56
SYS_ptrace = 101
SYS_pivot_root = 155
SYS_clone3 = 435
SYS_seccomp = 317
SECCOMP_SET_MODE_FILTER = 1

_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_CapDataPair = _CapData * 2  # v3 capabilities are 64 bits split in two 32-bit words

_libc.unshare.argtypes = (ctypes.c_int,)
_libc.unshare.restype = ctypes.c_int
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.setns.restype = ctypes.c_int
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.umount2.restype = ctypes.c_int
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_libc.prctl.restype = ctypes.c_int
_libc.capget.argtypes = (ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData))
_libc.capget.restype = ctypes.c_int
_libc.capset.argtypes = (ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData))
_libc.capset.restype = ctypes.c_int
_libc.sethostname.argtypes = (ctypes.c_char_p, ctypes.c_size_t)
_libc.sethostname.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    """setns(2): with CLONE_NEWPID it changes only the pid namespace of the caller's *future* children."""
    _check(_libc.setns(fd, nstype), "setns")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    def enc(s: str | None) -> bytes | None:
        return None if s is None else os.fsencode(s)

    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(os.fsencode(target), flags), f"umount2 {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(
        _libc.syscall(ctypes.c_long(SYS_pivot_root), ctypes.c_char_p(os.fsencode(new_root)),
                      ctypes.c_char_p(os.fsencode(put_old))),
        "pivot_root",
    )


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_libc.prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def capget() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of the calling thread as 64-bit masks."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = _CapDataPair()
    _check(_libc.capget(ctypes.byref(hdr), data), "capget")
    return (
        data[0].effective | (data[1].effective << 32),
        data[0].permitted | (data[1].permitted << 32),
        data[0].inheritable | (data[1].inheritable << 32),
    )


def capset_zero() -> None:
    """Empty the effective, permitted and inheritable sets (lowering is always permitted)."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = _CapDataPair()
    _check(_libc.capset(ctypes.byref(hdr), data), "capset")


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def seccomp_set_mode_filter(prog: bytes, insns: int) -> None:
    """seccomp(2) SECCOMP_SET_MODE_FILTER with no flags: install the classic BPF program ``prog`` of ``insns``
    8-byte instructions (struct sock_fprog) as a filter of the calling thread."""
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _SockFprog(insns, ctypes.addressof(buf))
    _check(_libc.syscall(ctypes.c_long(SYS_seccomp), ctypes.c_ulong(SECCOMP_SET_MODE_FILTER), ctypes.c_ulong(0),
                         ctypes.byref(fprog)), "seccomp(SECCOMP_SET_MODE_FILTER)")


def raw_syscall(nr: int, *args: int) -> int:
    """syscall(2) returning -errno instead of raising: escape tests need to see exactly what the kernel said."""
    ret = _libc.syscall(ctypes.c_long(nr), *(ctypes.c_ulong(a) for a in args))
    if ret == -1:
        return -ctypes.get_errno()
    return int(ret)
