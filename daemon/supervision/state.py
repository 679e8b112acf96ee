"""A guest's lifecycle as the daemon sees it: the states, the one table of allowed transitions, and the runtime
record (:class:`Guest`) whose :meth:`Guest.set_state` is the only place a state changes.

::

    stopped --start--> starting --ping ok--> running <--pause/resume--> paused
    running/paused --stop--> stopping --exit--> stopped
    (any live) --DM exits--> restarting --backoff--> starting      (policy allows, under max_restarts)
                           \\-> stopped | crashed | failed            (policy forbids / limit reached)
    stopped --daemon restart finds the DM alive--> running          (re-attach)
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from daemon import backends as bk
from daemon.config import GuestDefinition
from daemon.control import ControlClient, StateEvent
from daemon.messages import ExitCode

if TYPE_CHECKING:
    from daemon.supervision.forkserver import ForkedDm

log = logging.getLogger("daemon.supervisor")


class GuestState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    RESTARTING = "restarting"
    CRASHED = "crashed"
    FAILED = "failed"


S = GuestState
LIVE_STATES = frozenset({S.STARTING, S.RUNNING, S.PAUSED, S.STOPPING})
# A DM process exists in these (stopping: asked to exit, not gone yet).
_EXITS = frozenset({S.STOPPED, S.CRASHED, S.FAILED, S.RESTARTING})  # where a DM exit can lead (policy decides)

VALID_TRANSITIONS: dict[GuestState, frozenset[GuestState]] = {
    # start; re-attach to a DM found alive after a daemon restart; a DM found dead then goes by the policy.
    S.STOPPED: frozenset({S.STARTING, S.RUNNING}) | _EXITS,
    S.CRASHED: frozenset({S.STARTING, S.STOPPED}),
    S.FAILED: frozenset({S.STARTING, S.STOPPED}),
    # ping answered (running, or paused if the DM says so), stop, or the DM exits while coming up.
    S.STARTING: frozenset({S.RUNNING, S.PAUSED, S.STOPPING}) | _EXITS,
    S.RUNNING: frozenset({S.PAUSED, S.STOPPING}) | _EXITS,
    S.PAUSED: frozenset({S.RUNNING, S.STOPPING}) | _EXITS,
    # An exit the operator asked for (stop, kill, destroy) is "stopped" even if it took a SIGKILL.
    S.STOPPING: frozenset({S.STOPPED}),
    # backoff over: start again (or that start fails); cancelled by stop/kill/destroy/start.
    S.RESTARTING: frozenset({S.STARTING, S.STOPPED, S.FAILED}),
}


class InvalidTransition(RuntimeError):
    """The supervisor tried a state change the lifecycle table forbids (a supervisor bug, never a client's)."""

    def __init__(self, name: str, old: GuestState, new: GuestState) -> None:
        super().__init__(f"guest {name!r}: invalid state transition {old.value} -> {new.value}")


def check_transition(old: GuestState, new: GuestState) -> bool:
    """True if ``old -> new`` is allowed; staying in a state is not a transition and always allowed."""
    return old == new or new in VALID_TRANSITIONS[old]


@dataclass
class Guest:
    definition: GuestDefinition
    _state: GuestState = GuestState.STOPPED
    pid: int | None = None
    pidfd: int | None = None
    popen: subprocess.Popen[bytes] | ForkedDm | None = None  # our child (exec) or the zygote's (ForkedDm)
    started_at: float | None = None  # wall clock, survives daemon restarts via meta.json
    last_exit_reason: str | None = None
    last_exit_code: int | None = None
    guest_status: int | None = None
    restarts: int = 0
    restart_times: deque[float] = field(default_factory=deque)
    control: ControlClient | None = None
    last_event: StateEvent | None = None
    uid: int | None = None
    stop_requested: bool = False
    restart_task: asyncio.Task[None] | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    generation: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=100))
    backends: list[bk.Backend] = field(default_factory=list)  # daemon-managed vhost-user back-ends

    @property
    def state(self) -> GuestState:
        return self._state

    def set_state(self, new: GuestState) -> None:
        """The one place a guest's state changes; the change must be in :data:`VALID_TRANSITIONS`."""
        new = GuestState(new)
        if not check_transition(self._state, new):
            raise InvalidTransition(self.name, self._state, new)
        if new != self._state:
            log.debug("guest %s: %s -> %s", self.name, self._state.value, new.value)
        self._state = new

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def live(self) -> bool:
        return self._state in LIVE_STATES

    @property
    def rebooting(self) -> bool:
        """Restarting because the guest was reset (by itself, or by POST .../reset: its DM exited 3): the next DM
        boots the same machine again, and its console output continues the same console log, as a QEMU guest's
        serial log does across a reboot; any other start begins a new log (the previous one kept as
        console.log.1)."""
        return self._state == GuestState.RESTARTING and self.last_exit_code == ExitCode.RESET

    def uptime(self) -> float | None:
        if self.started_at is None or not self.live:
            return None
        return max(0.0, time.time() - self.started_at)

    def note(self, event: str) -> None:
        self.events.append({"time": time.time(), "event": event})
        log.info("guest %s: %s", self.name, event)

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self._state.value,
            "dm_pid": self.pid,
            "uptime_s": self.uptime(),
            "last_exit_reason": self.last_exit_reason,
            "last_exit_code": self.last_exit_code,
            "guest_status": self.guest_status,
            "restarts": self.restarts,
            "uid": self.uid,
            "last_event": self.last_event.reason if self.last_event is not None else None,
            "backends": [b.info() for b in self.backends],
        }
