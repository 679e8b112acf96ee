"""The daemon <-> DM zygote wire protocol (daemon.zygote is the zygote, daemon.supervision.forkserver the daemon's
end): message types, their one codec, and the checks each end applies to the other's bytes.

Two ``SOCK_SEQPACKET`` socketpairs, created by the daemon and passed to the zygote as ``--request-fd`` and
``--event-fd`` (seqpacket: one message per ``recvmsg``, its fds (SCM_RIGHTS) arrive with it, nothing is split):

* request channel, strictly request/reply, one request in flight (the daemon serialises them):
  zygote -> daemon ``{"op": "ready", "pid": P}`` once, when every import is done;
  daemon -> zygote ``{"op": "spawn", "id": N, "args": [...], "fds": [T0, T1, ...], "log": K, "pid_ns": B}``
  with the fds themselves by SCM_RIGHTS, in the order of ``fds``: the child gets fd ``i`` of the message
  installed as fd number ``fds[i]`` (the numbers ``args`` names, as ``Popen(pass_fds=...)`` keeps them), except
  fd ``K``, the guest's dm.log, which becomes its stdout and stderr only; ``args`` is what
  ``daemon.dm.parse_args`` gets; ``pid_ns`` true: fork the child as pid 1 of a new pid namespace of its own (a
  jailed DM, daemon/jail.py step 10);
  zygote -> daemon ``{"op": "spawned", "id": N, "pid": P}`` with a pidfd of the child by SCM_RIGHTS, or
  ``{"op": "error", "id": N, "error": "..."}``;
* event channel, zygote -> daemon only: ``{"op": "exited", "pid": P, "returncode": R}`` for every child it
  reaped, ``R`` in ``subprocess.Popen.returncode``'s convention (``-SIG`` for a fatal signal).

Messages are UTF-8 JSON objects of at most :data:`MAX_MESSAGE` bytes, at most :data:`MAX_FDS` fds each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_MESSAGE = 64 * 1024
MAX_FDS = 64  # the DM's contract (daemon.messages.DM_FDS): up to 7 fixed fds + disks + nics; the config caps both well below this
MAX_ARGS = 256


class ZygoteProtocolError(ValueError):
    """A zygote message is malformed (bad JSON, unknown op, a field of the wrong type or out of range)."""


@dataclass(frozen=True)
class Ready:
    pid: int


@dataclass(frozen=True)
class Spawn:
    id: int
    args: list[str]
    fds: list[int]  # target fd numbers in the child, one per SCM_RIGHTS fd, in order
    log: int  # index into fds of the child's stdout/stderr
    pid_ns: bool = False  # fork it as pid 1 of a new pid namespace (daemon/jail.py step 10, pid_ns_ready)


@dataclass(frozen=True)
class Spawned:
    id: int
    pid: int


@dataclass(frozen=True)
class SpawnError:
    id: int
    error: str


@dataclass(frozen=True)
class Exited:
    pid: int
    returncode: int


Message = Ready | Spawn | Spawned | SpawnError | Exited

_FIELDS: dict[str, tuple[type, dict[str, str]]] = {
    "ready": (Ready, {"pid": "pid"}),
    "spawn": (Spawn, {"id": "int", "args": "args", "fds": "fds", "log": "int", "pid_ns": "bool"}),
    "spawned": (Spawned, {"id": "int", "pid": "pid"}),
    "error": (SpawnError, {"id": "int", "error": "str"}),
    "exited": (Exited, {"pid": "pid", "returncode": "code"}),
}
_OPS = {cls: op for op, (cls, _) in _FIELDS.items()}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(kind: str, name: str, v: Any) -> None:
    ok: bool
    if kind == "int":
        ok = _is_int(v) and 0 <= v < 1 << 62
    elif kind == "pid":
        ok = _is_int(v) and 1 < v < 1 << 22  # PID_MAX_LIMIT
    elif kind == "code":
        ok = _is_int(v) and -128 < v < 256
    elif kind == "bool":
        ok = isinstance(v, bool)
    elif kind == "str":
        ok = isinstance(v, str) and len(v) <= 4096
    elif kind == "args":
        ok = isinstance(v, list) and len(v) <= MAX_ARGS and all(isinstance(a, str) and "\0" not in a for a in v)
    elif kind == "fds":
        ok = (isinstance(v, list) and 0 < len(v) <= MAX_FDS and all(_is_int(fd) and 3 <= fd < 1 << 20 for fd in v)
              and len(set(v)) == len(v))
    else:  # pragma: no cover - a typo in _FIELDS
        raise AssertionError(kind)
    if not ok:
        raise ZygoteProtocolError(f"zygote message field {name!r}: bad value {v!r:.200}")


def encode(m: Message) -> bytes:
    op = _OPS[type(m)]
    body = {"op": op, **vars(m)}
    data = json.dumps(body, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ZygoteProtocolError(f"zygote message of {len(data)} bytes is over {MAX_MESSAGE}")
    return data


def decode(data: bytes, nfds: int = 0) -> Message:
    """One message (``nfds``: how many fds came with it, checked against what the message says)."""
    if len(data) > MAX_MESSAGE:
        raise ZygoteProtocolError(f"zygote message of {len(data)} bytes is over {MAX_MESSAGE}")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise ZygoteProtocolError(f"zygote message is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ZygoteProtocolError("zygote message is not an object")
    op = obj.pop("op", None)
    if op not in _FIELDS:
        raise ZygoteProtocolError(f"unknown zygote op {op!r:.100}")
    cls, fields = _FIELDS[op]
    if set(obj) != set(fields):
        raise ZygoteProtocolError(f"zygote {op!r}: fields {sorted(obj)} != {sorted(fields)}")
    for name, kind in fields.items():
        _check(kind, name, obj[name])
    m: Message = cls(**obj)
    want = {Spawn: len(obj.get("fds", ())), Spawned: 1}.get(cls, 0)
    if nfds != want:
        raise ZygoteProtocolError(f"zygote {op!r} came with {nfds} fds, expected {want}")
    if isinstance(m, Spawn) and not 0 <= m.log < len(m.fds):
        raise ZygoteProtocolError(f"zygote 'spawn': log index {m.log} outside its {len(m.fds)} fds")
    return m
