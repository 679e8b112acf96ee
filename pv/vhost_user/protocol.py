"""vhost-user wire format, sans I/O (QEMU docs/interop/vhost-user.rst, "Message Specification").

This module turns bytes + SCM_RIGHTS fds into checked :class:`Message` objects and back, and parses every payload
kind the kvmdm backends accept into a frozen dataclass with its fields range-checked. It never touches a socket
(h11's shape): :class:`Decoder` is fed whatever the transport received, :func:`encode` returns bytes to send.

Errors say whose fault it was (CONVENTIONS §7): :class:`FrontendError` is the peer breaking the protocol.
``fatal`` errors desynchronise the byte stream (a header we cannot trust), so the only safe answer is to drop
the connection; non-fatal ones concern one well-framed message and can be answered with a REPLY_ACK failure.

File descriptors are owned by whoever holds the :class:`Message`; a message that fails validation closes its fds
(:meth:`Message.close_fds`) so a hostile frontend cannot exhaust our descriptor table.
"""

from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass, field

# ----------------------------------------------------------------------------------------------- constants
VHOST_USER_VERSION = 1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2  # "Bit 2 is the reply flag - needs to be sent on each reply from the back-end"
FLAG_NEED_REPLY = 1 << 3  # "Bit 3 is the need_reply flag" (REPLY_ACK)
_KNOWN_FLAGS = FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

VHOST_USER_F_PROTOCOL_FEATURES = 30  # "a feature bit was dedicated for this purpose"

# "Memory regions description": region0 .. region7.
VHOST_MEMORY_BASELINE_NREGIONS = 8
VHOST_USER_MAX_CONFIG_SIZE = 256  # QEMU include/hw/virtio/vhost-user.h
MAX_FDS_PER_MESSAGE = VHOST_MEMORY_BASELINE_NREGIONS  # the most any request we accept carries

# SET_VRING_KICK/CALL/ERR u64 payload: "Bits (0-7) ... contain the vring index. Bit 8 is the invalid FD flag."
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8

VHOST_VRING_F_LOG = 1 << 0  # vhost_vring_addr.flags (linux/vhost_types.h)

VHOST_USER_CONFIG_HDR_SIZE = 12  # offset, size, flags
CONFIG_FLAG_WRITABLE = 0  # "0: Vhost front-end messages used for writable fields"
CONFIG_FLAG_MIGRATION = 1  # "1: Vhost front-end messages used for live migration"


class ProtocolFeature(enum.IntEnum):
    """Protocol feature bits ("Protocol features")."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    SLAVE_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    SLAVE_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


class Request(enum.IntEnum):
    """Front-end message types ("Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_SLAVE_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


HEADER = struct.Struct("=III")  # request, flags, size ("All numbers are in the machine native byte order")
_U64 = struct.Struct("=Q")
_STATE = struct.Struct("=II")  # struct vhost_vring_state: index, num
_ADDR = struct.Struct("=IIQQQQ")  # struct vhost_vring_addr: index, flags, desc, used, avail, log
_MEM_HDR = struct.Struct("=II")  # nregions, padding
_REGION = struct.Struct("=QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
_CONFIG_HDR = struct.Struct("=III")  # offset, size, flags
assert _ADDR.size == 40 and _REGION.size == 32 and _CONFIG_HDR.size == VHOST_USER_CONFIG_HDR_SIZE

# Largest payload any request we accept may carry: GET/SET_CONFIG with a full 256-byte config space.
MAX_PAYLOAD = VHOST_USER_CONFIG_HDR_SIZE + VHOST_USER_MAX_CONFIG_SIZE
assert MAX_PAYLOAD >= _MEM_HDR.size + VHOST_MEMORY_BASELINE_NREGIONS * _REGION.size

_U64_MAX = (1 << 64) - 1


# ----------------------------------------------------------------------------------------------- errors
class FrontendError(Exception):
    """The vhost-user front-end broke the protocol. ``fatal``: the stream can no longer be trusted."""

    fatal = False


class MalformedHeader(FrontendError):
    """The message header is malformed (version, flags or size); the stream is out of sync."""

    fatal = True


class PayloadTooLarge(FrontendError):
    """The header announces a payload larger than any request accepted here."""

    fatal = True


class TooManyFds(FrontendError):
    """More file descriptors arrived than any single request may carry (or the kernel truncated them)."""

    fatal = True


class StrayFds(FrontendError):
    """File descriptors arrived in the middle of a message's payload, not with its header."""

    fatal = True


class UnknownRequest(FrontendError):
    """The request type is unknown or not supported by this back-end."""


class BadPayloadSize(FrontendError):
    """The payload size does not match what the request type requires."""


class BadFdCount(FrontendError):
    """The number of file descriptors does not match what the request requires."""


class BadFdKind(FrontendError):
    """A file descriptor is not of the kind the request needs (e.g. memory that is not a mappable file)."""


class InvalidValue(FrontendError):
    """A payload field is out of range or inconsistent with the negotiated state."""


class NotNegotiated(FrontendError):
    """The request needs a (protocol) feature that was not negotiated."""


# ----------------------------------------------------------------------------------------------- messages
def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


@dataclass
class Message:
    """One framed message. ``fds`` are owned by the holder: take them (``take_fd``) or call close_fds()."""

    request: int
    flags: int = VHOST_USER_VERSION
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def take_fd(self) -> int:
        """Remove and return the first fd: the caller now owns it."""
        return self.fds.pop(0)

    def close_fds(self) -> None:
        close_fds(self.fds)

    def name(self) -> str:
        try:
            return Request(self.request).name
        except ValueError:
            return f"request {self.request}"


def encode(msg: Message) -> bytes:
    """Header + payload bytes (fds travel separately as SCM_RIGHTS with these bytes)."""
    return HEADER.pack(msg.request, msg.flags, len(msg.payload)) + msg.payload


def reply(request: int, payload: bytes = b"") -> Message:
    return Message(request, VHOST_USER_VERSION | FLAG_REPLY, payload)


def reply_u64(request: int, value: int) -> Message:
    return reply(request, _U64.pack(value & _U64_MAX))


class Decoder:
    """Reassembles messages from a byte stream plus the fds received alongside (sans I/O).

    ``feed(data, fds)`` with what one recvmsg returned; ``next_message()`` returns a complete Message or None.
    Fds must arrive with the first bytes of a message's header (QEMU sends header, payload and fds in one
    sendmsg; the kernel attaches the fds to the first byte): fds that show up mid-message are a fatal error.
    """

    def __init__(self, *, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._fds: list[int] = []
        self._max_payload = max_payload
        self._failed = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def wanted(self) -> int:
        """How many more bytes complete the current message (header first). Lets the transport read exactly."""
        if len(self._buf) < HEADER.size:
            return HEADER.size - len(self._buf)
        _req, _flags, size = HEADER.unpack_from(self._buf)
        return max(0, HEADER.size + min(size, self._max_payload) - len(self._buf))

    def feed(self, data: bytes, fds: list[int] | None = None) -> None:
        fds = list(fds or [])
        if self._failed:
            close_fds(fds)
            raise MalformedHeader("decoder already failed")
        if fds:
            if self._buf:  # fds not attached to a header's first byte
                close_fds(fds)
                self._fail()
                raise StrayFds(f"{len(fds)} fds arrived {len(self._buf)} bytes into a message")
            if len(fds) > MAX_FDS_PER_MESSAGE:
                close_fds(fds)
                self._fail()
                raise TooManyFds(f"{len(fds)} fds > {MAX_FDS_PER_MESSAGE}")
            self._fds = fds
        self._buf += data

    def _fail(self) -> None:
        self._failed = True
        self._buf.clear()
        close_fds(self._fds)

    def next_message(self) -> Message | None:
        """A complete, header-checked message (payload not yet interpreted), or None if more bytes are needed."""
        if self._failed:
            raise MalformedHeader("decoder already failed")
        if len(self._buf) < HEADER.size:
            return None
        request, flags, size = HEADER.unpack_from(self._buf)
        if flags & FLAG_VERSION_MASK != VHOST_USER_VERSION:
            self._fail()
            raise MalformedHeader(f"version {flags & FLAG_VERSION_MASK} (flags 0x{flags:x}), expected 1")
        if flags & ~_KNOWN_FLAGS or flags & FLAG_REPLY:
            # A reply flag on a request, or bits no spec revision defines: not a message we can trust.
            self._fail()
            raise MalformedHeader(f"flags 0x{flags:x}")
        if size > self._max_payload:
            self._fail()
            raise PayloadTooLarge(f"{size} > {self._max_payload} bytes")
        end = HEADER.size + size
        if len(self._buf) < end:
            return None
        msg = Message(request, flags, bytes(self._buf[HEADER.size : end]), self._fds)
        del self._buf[:end]
        self._fds = []
        return msg

    def close(self) -> None:
        self._buf.clear()
        close_fds(self._fds)


# ----------------------------------------------------------------------------------------------- payloads
def _expect_size(msg: Message, size: int) -> None:
    if len(msg.payload) != size:
        raise BadPayloadSize(f"{msg.name()}: payload is {len(msg.payload)} bytes, expected {size}")


def expect_fds(msg: Message, count: int) -> None:
    if len(msg.fds) != count:
        raise BadFdCount(f"{msg.name()}: {len(msg.fds)} fds, expected {count}")


def parse_empty(msg: Message) -> None:
    """Requests without payload (GET_FEATURES, SET_OWNER, ...). QEMU sends size 0."""
    _expect_size(msg, 0)
    expect_fds(msg, 0)


def parse_u64(msg: Message) -> int:
    _expect_size(msg, _U64.size)
    expect_fds(msg, 0)
    return int(_U64.unpack(msg.payload)[0])


@dataclass(frozen=True)
class VringState:
    """struct vhost_vring_state ("A vring state description")."""

    index: int
    num: int

    def pack(self) -> bytes:
        return _STATE.pack(self.index, self.num)


def parse_state(msg: Message) -> VringState:
    _expect_size(msg, _STATE.size)
    expect_fds(msg, 0)
    index, num = _STATE.unpack(msg.payload)
    return VringState(index, num)


@dataclass(frozen=True)
class VringAddr:
    """struct vhost_vring_addr ("A vring address description"): front-end *user* addresses, not GPAs."""

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int

    def pack(self) -> bytes:
        return _ADDR.pack(
            self.index, self.flags, self.desc_user_addr, self.used_user_addr, self.avail_user_addr,
            self.log_guest_addr,
        )  # fmt: skip


def parse_vring_addr(msg: Message) -> VringAddr:
    _expect_size(msg, _ADDR.size)
    expect_fds(msg, 0)
    index, flags, desc, used, avail, log = _ADDR.unpack(msg.payload)
    if flags & ~VHOST_VRING_F_LOG:
        raise InvalidValue(f"SET_VRING_ADDR: unknown flags 0x{flags:x}")
    return VringAddr(index, flags, desc, used, avail, log)


@dataclass(frozen=True)
class VringFile:
    """SET_VRING_KICK/CALL/ERR: ring index and, unless the NOFD bit is set, the fd (owned by the caller)."""

    index: int
    fd: int  # -1 with the NOFD flag


def parse_vring_file(msg: Message) -> VringFile:
    """Takes ownership of the message's fd (if any) into the returned VringFile."""
    _expect_size(msg, _U64.size)
    (value,) = _U64.unpack(msg.payload)
    if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
        raise InvalidValue(f"{msg.name()}: unknown bits in 0x{value:x}")
    nofd = bool(value & VRING_NOFD_MASK)
    expect_fds(msg, 0 if nofd else 1)
    return VringFile(value & VRING_IDX_MASK, -1 if nofd else msg.take_fd())


@dataclass(frozen=True)
class MemoryRegion:
    """One "memory regions description" entry, with the fd that backs it (owned by the table's holder)."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    fd: int = -1


def _ranges_overlap(a: list[tuple[int, int]]) -> bool:
    a = sorted(a)
    return any(a[i][0] + a[i][1] > a[i + 1][0] for i in range(len(a) - 1))


def parse_mem_table(msg: Message) -> list[MemoryRegion]:
    """SET_MEM_TABLE: structure and arithmetic checks only (fd kinds and sizes are the backend's job).

    On success the regions carry the message's fds, in order ("The size and ordering of the fds matches the
    number and ordering of memory regions"), and the message no longer owns them.
    """
    if len(msg.payload) < _MEM_HDR.size:
        raise BadPayloadSize(f"SET_MEM_TABLE: payload is {len(msg.payload)} bytes")
    nregions, _padding = _MEM_HDR.unpack_from(msg.payload)
    if not 1 <= nregions <= VHOST_MEMORY_BASELINE_NREGIONS:
        raise InvalidValue(f"SET_MEM_TABLE: {nregions} regions (1..{VHOST_MEMORY_BASELINE_NREGIONS})")
    _expect_size(msg, _MEM_HDR.size + nregions * _REGION.size)
    expect_fds(msg, nregions)
    regions = []
    for i in range(nregions):
        gpa, size, uva, off = _REGION.unpack_from(msg.payload, _MEM_HDR.size + i * _REGION.size)
        if size == 0:
            raise InvalidValue(f"SET_MEM_TABLE: region {i} is empty")
        for what, base in (("guest", gpa), ("user", uva), ("mmap offset", off)):
            if base + size - 1 > _U64_MAX:
                raise InvalidValue(f"SET_MEM_TABLE: region {i} {what} range 0x{base:x}+0x{size:x} wraps")
        regions.append(MemoryRegion(gpa, size, uva, off))
    if _ranges_overlap([(r.guest_phys_addr, r.memory_size) for r in regions]):
        raise InvalidValue("SET_MEM_TABLE: guest address ranges overlap")
    if _ranges_overlap([(r.userspace_addr, r.memory_size) for r in regions]):
        # User addresses translate ring addresses: an ambiguous translation is not a table.
        raise InvalidValue("SET_MEM_TABLE: user address ranges overlap")
    return [
        MemoryRegion(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset, msg.take_fd())
        for r in regions
    ]


def pack_mem_table(regions: list[MemoryRegion]) -> bytes:
    """Front-end side (tests, fuzzing): the payload for SET_MEM_TABLE; send the region fds alongside."""
    out = _MEM_HDR.pack(len(regions), 0)
    for r in regions:
        out += _REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
    return out


@dataclass(frozen=True)
class ConfigPayload:
    """"Virtio device config space": offset, size, flags and (for SET_CONFIG) the bytes."""

    offset: int
    size: int
    flags: int
    data: bytes

    def pack(self) -> bytes:
        return _CONFIG_HDR.pack(self.offset, self.size, self.flags) + self.data


def parse_config(msg: Message) -> ConfigPayload:
    """GET_CONFIG / SET_CONFIG: size must match the payload and stay within VHOST_USER_MAX_CONFIG_SIZE."""
    expect_fds(msg, 0)
    if len(msg.payload) < _CONFIG_HDR.size:
        raise BadPayloadSize(f"{msg.name()}: payload is {len(msg.payload)} bytes")
    offset, size, flags = _CONFIG_HDR.unpack_from(msg.payload)
    data = msg.payload[_CONFIG_HDR.size :]
    if len(data) != size:
        raise BadPayloadSize(f"{msg.name()}: config size {size} but {len(data)} bytes follow")
    if size > VHOST_USER_MAX_CONFIG_SIZE or offset > VHOST_USER_MAX_CONFIG_SIZE - size:
        raise InvalidValue(f"{msg.name()}: config range {offset}+{size} > {VHOST_USER_MAX_CONFIG_SIZE}")
    if flags not in (CONFIG_FLAG_WRITABLE, CONFIG_FLAG_MIGRATION):
        raise InvalidValue(f"{msg.name()}: config flags {flags}")
    return ConfigPayload(offset, size, flags, bytes(data))
