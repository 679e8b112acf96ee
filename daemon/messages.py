"""The daemon <-> device-model messages, typed: one definition of every control command, its reply, the DM's
states and the DM's exit codes, used by the daemon (daemon.supervisor), the DM (daemon.dm) and the tests' fake DM.

daemon.control frames these on the wire (newline-delimited JSON, ``{"id", "cmd", "args"}`` requests and
``{"id", "ok", "result", "error"}`` responses). This module says what ``args`` and ``result`` hold for each
command: every request is a frozen dataclass with ``to_args()``/``from_args()``, every reply one with
``to_result()``/``from_result()``, and :data:`SCHEMA` pairs them. ``from_*`` is the single validating decoder
(:class:`RemoteProtocolError` for the peer's bytes); ``to_*`` output always passes it (the encoders check), so a
DM cannot answer what the daemon would refuse, and the fake DM cannot drift from the real one without failing
the same check.

No I/O and no asyncio here: the DM imports it before its jail.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

if TYPE_CHECKING:
    import argparse

MAX_ID = 2**53 - 1  # JSON numbers beyond this are not exact in every implementation (RFC 8259 §6)
MAX_CONSOLE_INPUT = 4096  # decoded bytes per console_input request
MAX_VHOST_DEVICES = 64
# Bounds on stats so a hostile DM cannot make the daemon's /metrics output unbounded.
MAX_STAT_KEYS = 256
MAX_STAT_NAME = 64
MAX_STAT_DEVICES = 64
MAX_COUNTER = 2**64 - 1
MAX_VCPUS = 1024


class ProtocolError(Exception):
    """Base: the control conversation broke a rule of the protocol."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids (its fault; we drop the connection or refuse the reply)."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol forbids (our bug)."""


# ----------------------------------------------------------------------------------------- states, exit codes


class DmState(StrEnum):
    """The DM's own state, as its ``state`` events and ``stats`` report it."""

    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    CRASHED = "crashed"


DM_STATES = frozenset(s.value for s in DmState)


class ExitCode(IntEnum):
    """How a DM process exits: the contract the supervisor's restart policy is keyed on. ``kvmdm run`` exits with
    the same codes (plus USAGE, and the guest's own isa-debug-exit value when it powers off with one)."""

    STOPPED = 0  # guest powered off, or stopped by the host
    ERROR = 1  # host-side error in the DM
    USAGE = 2  # bad command line (kvmdm run; argparse's own code)
    RESET = 3  # the guest asked for a reset: restart it unless the policy is "never"
    CRASHED = 4  # the guest crashed (triple fault, internal error)

    @classmethod
    def for_stop(cls, kind: str) -> ExitCode:
        """The exit code for a vCPU-loop stop reason kind (kvmcore.vcpu_loop.StopReason.kind)."""
        return _STOP_KIND_CODES.get(kind, cls.ERROR)

    @property
    def final_state(self) -> DmState:
        """The state the DM reports in its last event before exiting with this code."""
        return DmState.STOPPED if self in (ExitCode.STOPPED, ExitCode.RESET) else DmState.CRASHED


_STOP_KIND_CODES = {"poweroff": ExitCode.STOPPED, "host": ExitCode.STOPPED, "reset": ExitCode.RESET,
                    "crash": ExitCode.CRASHED}


def describe_exit(rc: int) -> tuple[str, bool]:
    """A DM exit status -> (reason for the operator, whether it counts as a failure for the restart policy)."""
    try:
        code = ExitCode(rc)
    except ValueError:
        return f"DM exited with unexpected code {rc}", True
    return {
        ExitCode.STOPPED: ("guest powered off (DM exit 0)", False),
        ExitCode.RESET: ("guest requested reset (DM exit 3)", False),
        ExitCode.CRASHED: ("guest crashed (DM exit 4)", True),
        ExitCode.ERROR: ("DM error (DM exit 1)", True),
    }.get(code, (f"DM exited with unexpected code {rc}", True))


# ------------------------------------------------------------------------------------- the DM's fds (argv)


@dataclass(frozen=True)
class DmFd:
    """One fd of the DM's command line: ``--<name>-fd N`` names the fd open at number N in the DM (the daemon's
    spawn passes exactly these, by exec's pass_fds or the zygote's SCM_RIGHTS, at the same numbers)."""

    name: str
    what: str
    required: bool = False
    repeated: bool = False

    @property
    def flag(self) -> str:
        return f"--{self.name}-fd"


DM_FDS: tuple[DmFd, ...] = (
    DmFd("control", "listening unix stream socket of the control protocol", required=True),
    DmFd("definition", "pipe holding the guest definition (JSON)", required=True),
    DmFd("console", "the console log, O_APPEND", required=True),
    DmFd("kvm", "/dev/kvm", required=True),
    DmFd("kernel", "the kernel image; a firmware guest's BIOS image", required=True),
    DmFd("initrd", "the initrd image"),
    DmFd("disk", "per disk: the image, or a connected vhost-user socket", repeated=True),
    DmFd("tap", "per nic: the tap, or a connected vhost-user socket", repeated=True),
    DmFd("nic-rom", "a firmware guest's virtio-net option ROM file (nic_rom), as stored: the DM takes its x86 "
                    "image for fw_cfg"),
)


def add_dm_fd_args(parser: argparse.ArgumentParser) -> None:
    """Declare :data:`DM_FDS` on a parser (the DM's, and the tests' fake DM: one contract)."""
    for fd in DM_FDS:
        if fd.repeated:
            parser.add_argument(fd.flag, type=int, action="append", default=[], help=fd.what)
        else:
            parser.add_argument(fd.flag, type=int, required=fd.required, help=fd.what)


# ---------------------------------------------------------------------------------------------- field checks


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_keys(msg: dict[str, Any], allowed: set[str], what: str) -> None:
    extra = msg.keys() - allowed
    if extra:
        raise RemoteProtocolError(f"{what}: unknown field(s) {sorted(extra)}")
    missing = allowed - msg.keys()
    if missing:
        raise RemoteProtocolError(f"{what}: missing field(s) {sorted(missing)}")


def _object(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise RemoteProtocolError(f"{what} must be an object")
    return v


# ----------------------------------------------------------------------------------------------------- events

MAX_REASON_LEN = 1024


@dataclass(frozen=True)
class StateEvent:
    """``{"event": "state", "state", "reason", "guest_status"}``: unsolicited, DM -> daemon, on every change of
    the DM's state (and when a device needs attention: same state, new reason)."""

    state: str
    reason: str
    guest_status: int | None

    @classmethod
    def make(cls, state: str, reason: str = "", guest_status: int | None = None) -> StateEvent:
        """Our own event (reason cut to the limit), checked like the peer's: an invalid one is our bug."""
        try:
            return validate_event({"event": "state", "state": str(state), "reason": reason[:MAX_REASON_LEN],
                                   "guest_status": guest_status})
        except RemoteProtocolError as e:
            raise LocalProtocolError(str(e)) from None

    def to_msg(self) -> dict[str, Any]:
        return {"event": "state", "state": self.state, "reason": self.reason, "guest_status": self.guest_status}


def validate_event(msg: dict[str, Any]) -> StateEvent:
    check_keys(msg, {"event", "state", "reason", "guest_status"}, "event")
    if msg["event"] != "state":
        raise RemoteProtocolError(f"event: unknown event {str(msg['event'])[:64]!r}")
    state, reason, status = msg["state"], msg["reason"], msg["guest_status"]
    if not isinstance(state, str) or state not in DM_STATES:
        raise RemoteProtocolError(f"event: unknown state {str(state)[:64]!r}")
    if not isinstance(reason, str) or len(reason) > MAX_REASON_LEN:
        raise RemoteProtocolError(f"event: reason must be a string of at most {MAX_REASON_LEN} chars")
    if status is not None and (not is_int(status) or not -(2**31) <= status < 2**32):
        raise RemoteProtocolError("event: guest_status must be a 32-bit integer or null")
    return StateEvent(str(state), reason, status)


# ---------------------------------------------------------------------------------------------------- replies


class Reply:
    """Base of every command's reply: ``to_result()`` is what goes on the wire, ``from_result`` validates it."""

    def to_result(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_result(cls, result: Any) -> Reply:
        raise NotImplementedError


@dataclass(frozen=True)
class Pong(Reply):
    """``ping`` -> ``{"pong": true}``."""

    def to_result(self) -> dict[str, Any]:
        return {"pong": True}

    @classmethod
    def from_result(cls, result: Any) -> Pong:
        r = _object(result, "ping reply")
        check_keys(r, {"pong"}, "ping reply")
        if r["pong"] is not True:
            raise RemoteProtocolError("ping reply: pong must be true")
        return cls()


@dataclass(frozen=True)
class Ack(Reply):
    """``stop`` / ``reset`` -> ``{}``: the DM took the request; the outcome arrives as a state event / exit."""

    def to_result(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_result(cls, result: Any) -> Ack:
        check_keys(_object(result, "reply"), set(), "reply")
        return cls()


@dataclass(frozen=True)
class StateReply(Reply):
    """``pause`` / ``resume`` -> ``{"state": DmState}``: the DM's state after the command."""

    state: DmState

    def to_result(self) -> dict[str, Any]:
        return {"state": self.state.value}

    @classmethod
    def from_result(cls, result: Any) -> StateReply:
        r = _object(result, "state reply")
        check_keys(r, {"state"}, "state reply")
        if not isinstance(r["state"], str) or r["state"] not in DM_STATES:
            raise RemoteProtocolError(f"state reply: unknown state {str(r['state'])[:64]!r}")
        return cls(DmState(r["state"]))


@dataclass(frozen=True)
class ConsoleInputReply(Reply):
    """``console_input`` -> ``{"accepted": n}``: bytes taken into the DM's input buffer (they reach the UART as
    the guest drains its receive FIFO, so "accepted", not "written")."""

    accepted: int

    def to_result(self) -> dict[str, Any]:
        return {"accepted": self.accepted}

    @classmethod
    def from_result(cls, result: Any) -> ConsoleInputReply:
        r = _object(result, "console_input reply")
        check_keys(r, {"accepted"}, "console_input reply")
        n = r["accepted"]
        if not is_int(n) or not 0 <= n <= MAX_CONSOLE_INPUT:
            raise RemoteProtocolError(f"console_input reply: accepted must be an integer in 0..{MAX_CONSOLE_INPUT}")
        return cls(n)


@dataclass(frozen=True)
class AttachBackendReply(Reply):
    """``attach_backend`` -> ``{"device": i, "resumed": bool}`` (resumed: rings were live and carried over)."""

    device: int
    resumed: bool

    def to_result(self) -> dict[str, Any]:
        return {"device": self.device, "resumed": self.resumed}

    @classmethod
    def from_result(cls, result: Any) -> AttachBackendReply:
        r = _object(result, "attach_backend reply")
        check_keys(r, {"device", "resumed"}, "attach_backend reply")
        if not is_int(r["device"]) or not 0 <= r["device"] < MAX_VHOST_DEVICES:
            raise RemoteProtocolError("attach_backend reply: device out of range")
        if not isinstance(r["resumed"], bool):
            raise RemoteProtocolError("attach_backend reply: resumed must be a boolean")
        return cls(r["device"], r["resumed"])


def _counter_map(v: Any, what: str) -> dict[str, int]:
    if not isinstance(v, dict) or len(v) > MAX_STAT_KEYS:
        raise RemoteProtocolError(f"stats: {what} must be an object with at most {MAX_STAT_KEYS} keys")
    for k, n in v.items():
        if len(k) > MAX_STAT_NAME or not k.isprintable():
            raise RemoteProtocolError(f"stats: {what} key {k[:64]!r} is not a short printable name")
        if not is_int(n) or not 0 <= n <= MAX_COUNTER:
            raise RemoteProtocolError(f"stats: {what}[{k[:64]!r}] must be a non-negative 64-bit integer")
    return dict(v)


@dataclass(frozen=True)
class Stats(Reply):
    """``stats`` -> the DM's counters (unknown extra keys are tolerated for forward compatibility, not kept)."""

    state: str
    uptime_s: float
    exits: dict[str, int]
    devices: dict[str, dict[str, int]]
    rss_bytes: int
    vcpus: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "uptime_s": self.uptime_s, "exits": self.exits, "devices": self.devices,
                "rss_bytes": self.rss_bytes, "vcpus": self.vcpus}

    def to_result(self) -> dict[str, Any]:
        return self.to_dict()

    @classmethod
    def from_result(cls, result: Any) -> Stats:
        if not isinstance(result, dict):
            raise RemoteProtocolError("stats: result must be an object")
        for k in ("state", "uptime_s", "exits", "devices", "rss_bytes", "vcpus"):
            if k not in result:
                raise RemoteProtocolError(f"stats: missing {k}")
        state = result["state"]
        if not isinstance(state, str) or state not in DM_STATES:
            raise RemoteProtocolError("stats: unknown state")
        up = result["uptime_s"]
        if isinstance(up, bool) or not isinstance(up, int | float) or not math.isfinite(up) or up < 0:
            raise RemoteProtocolError("stats: uptime_s must be a non-negative number")
        exits = _counter_map(result["exits"], "exits")
        devs_raw = result["devices"]
        if not isinstance(devs_raw, dict) or len(devs_raw) > MAX_STAT_DEVICES:
            raise RemoteProtocolError(f"stats: devices must be an object with at most {MAX_STAT_DEVICES} devices")
        devices = {}
        for name, counters in devs_raw.items():
            if len(name) > MAX_STAT_NAME or not name.isprintable():
                raise RemoteProtocolError(f"stats: device name {name[:64]!r} is not a short printable name")
            devices[name] = _counter_map(counters, f"devices[{name!r}]")
        rss, vcpus = result["rss_bytes"], result["vcpus"]
        if not is_int(rss) or not 0 <= rss <= MAX_COUNTER:
            raise RemoteProtocolError("stats: rss_bytes must be a non-negative integer")
        if not is_int(vcpus) or not 0 <= vcpus <= MAX_VCPUS:
            raise RemoteProtocolError("stats: vcpus must be a small non-negative integer")
        return cls(state, float(up), exits, devices, rss, vcpus)


def validate_stats(result: Any) -> Stats:
    return Stats.from_result(result)


# --------------------------------------------------------------------------------------------------- commands

R = TypeVar("R", bound=Reply)


class Command(Generic[R]):
    """Base of every request. ``cmd`` is the wire name, ``reply`` the only reply type the command may get."""

    cmd: ClassVar[str]
    reply: ClassVar[type[Reply]]
    carries_fd: ClassVar[bool] = False  # the request brings exactly one fd by SCM_RIGHTS (daemon.control)

    def to_args(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> Command[Any]:
        if args:
            raise RemoteProtocolError(f"request: {cls.cmd} takes no arguments")
        return cls()

    def decode_reply(self, result: Any) -> R:
        """The peer's ``result`` for this command, validated into its reply type."""
        return self.reply.from_result(result)  # type: ignore[return-value]

    def encode_reply(self, reply: Reply) -> dict[str, Any]:
        """Our reply to this command, checked to be its reply type and to pass the peer's validation."""
        if type(reply) is not self.reply:
            raise LocalProtocolError(f"{self.cmd}: reply must be {self.reply.__name__}, not {type(reply).__name__}")
        result = reply.to_result()
        try:
            self.reply.from_result(result)
        except RemoteProtocolError as e:
            raise LocalProtocolError(str(e)) from None
        return result


@dataclass(frozen=True)
class Ping(Command[Pong]):
    cmd = "ping"
    reply = Pong


@dataclass(frozen=True)
class GetStats(Command[Stats]):
    cmd = "stats"
    reply = Stats


@dataclass(frozen=True)
class Pause(Command[StateReply]):
    cmd = "pause"
    reply = StateReply


@dataclass(frozen=True)
class Resume(Command[StateReply]):
    cmd = "resume"
    reply = StateReply


@dataclass(frozen=True)
class Stop(Command[Ack]):
    cmd = "stop"
    reply = Ack


@dataclass(frozen=True)
class Reset(Command[Ack]):
    cmd = "reset"
    reply = Ack


_B64_MAX = 4 * ((MAX_CONSOLE_INPUT + 2) // 3)


@dataclass(frozen=True)
class ConsoleInput(Command[ConsoleInputReply]):
    """Bytes for the guest's COM1, base64 on the wire."""

    cmd = "console_input"
    reply = ConsoleInputReply
    data: bytes = b""

    def __post_init__(self) -> None:
        if len(self.data) > MAX_CONSOLE_INPUT:
            raise LocalProtocolError(f"console_input: at most {MAX_CONSOLE_INPUT} bytes per request")

    def to_args(self) -> dict[str, Any]:
        return {"data": base64.b64encode(self.data).decode("ascii")}

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ConsoleInput:
        check_keys(args, {"data"}, "console_input args")
        data = args["data"]
        if not isinstance(data, str) or len(data) > _B64_MAX:
            raise RemoteProtocolError(f"console_input: data must be base64 of at most {MAX_CONSOLE_INPUT} bytes")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise RemoteProtocolError("console_input: data is not valid base64") from None
        if len(raw) > MAX_CONSOLE_INPUT:
            raise RemoteProtocolError(f"console_input: data must be base64 of at most {MAX_CONSOLE_INPUT} bytes")
        return cls(raw)


@dataclass(frozen=True)
class AttachBackend(Command[AttachBackendReply]):
    """Switch vhost-user device ``device`` (disks then nics, definition order) to the connected socket that
    travels with this request."""

    cmd = "attach_backend"
    reply = AttachBackendReply
    carries_fd = True
    device: int = 0

    def to_args(self) -> dict[str, Any]:
        return {"device": self.device}

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> AttachBackend:
        check_keys(args, {"device"}, "attach_backend args")
        dev = args["device"]
        if not is_int(dev) or not 0 <= dev < MAX_VHOST_DEVICES:
            raise RemoteProtocolError(f"attach_backend: device must be an integer in 0..{MAX_VHOST_DEVICES - 1}")
        return cls(dev)


SCHEMA: dict[str, type[Command[Any]]] = {c.cmd: c for c in (Ping, GetStats, Pause, Resume, Stop, Reset,
                                                              ConsoleInput, AttachBackend)}
COMMANDS = frozenset(SCHEMA)
FD_COMMANDS = frozenset(name for name, c in SCHEMA.items() if c.carries_fd)


def decode_command(cmd: Any, args: Any) -> Command[Any]:
    """A request's ``cmd`` and ``args`` -> the typed command (RemoteProtocolError if either is invalid)."""
    if not isinstance(cmd, str) or cmd not in SCHEMA:
        raise RemoteProtocolError(f"request: unknown command {str(cmd)[:64]!r}")
    if not isinstance(args, dict):
        raise RemoteProtocolError("request: args must be an object")
    return SCHEMA[cmd].from_args(args)
