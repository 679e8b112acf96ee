"""The supervision parts that need no process: the lifecycle table and Guest.set_state, the restart policy (one
implementation for DMs and back-ends, clock passed in), the jail uid pool, and that pause/resume/reset wait for
the guest lock."""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from daemon import messages as msg  # noqa: E402
from daemon.config import parse_definition  # noqa: E402
from daemon.paths import Paths  # noqa: E402
from daemon.supervision.errors import StartFailed  # noqa: E402
from daemon.supervision.restart import RestartPolicy  # noqa: E402
from daemon.supervision.spawn import UidPool  # noqa: E402
from daemon.supervision.state import (  # noqa: E402
    LIVE_STATES,
    VALID_TRANSITIONS,
    Guest,
    GuestState,
    InvalidTransition,
    check_transition,
)
from daemon.supervisor import Supervisor, SupervisorConfig  # noqa: E402

S = GuestState


def _guest(**kw: Any) -> Guest:
    return Guest(parse_definition({"name": "g", "kernel": "demo", **kw}, check_paths=False))


def test_every_state_has_a_row_and_every_target_is_a_state() -> None:
    assert set(VALID_TRANSITIONS) == set(GuestState)
    assert all(t <= set(GuestState) for t in VALID_TRANSITIONS.values())


@pytest.mark.parametrize("old, new", [
    (S.STOPPED, S.PAUSED), (S.STOPPED, S.STOPPING), (S.CRASHED, S.RUNNING), (S.FAILED, S.RESTARTING),
    (S.STOPPING, S.RUNNING), (S.STOPPING, S.RESTARTING), (S.STOPPING, S.CRASHED), (S.RESTARTING, S.RUNNING),
    (S.RESTARTING, S.PAUSED),
])
def test_transitions_outside_the_table_are_refused_and_leave_the_state(old: GuestState, new: GuestState) -> None:
    assert not check_transition(old, new)
    g = _guest()
    g._state = old
    with pytest.raises(InvalidTransition, match=f"{old.value} -> {new.value}"):
        g.set_state(new)
    assert g.state == old


def test_the_documented_lifecycle_walks_through_set_state() -> None:
    g = _guest()
    for s in (S.STARTING, S.RUNNING, S.PAUSED, S.RUNNING, S.STOPPING, S.STOPPED, S.STARTING, S.RUNNING,
              S.RESTARTING, S.STARTING, S.CRASHED, S.STARTING, S.FAILED, S.STOPPED):
        g.set_state(s)
        assert g.state == s and g.info()["state"] == s.value
    g.set_state(S.STOPPED)  # staying is not a transition


def test_live_states_are_exactly_those_with_a_dm_process() -> None:
    assert LIVE_STATES == {S.STARTING, S.RUNNING, S.PAUSED, S.STOPPING}


# ------------------------------------------------------------------------------------------------ restart policy


def _policy(policy: str = "on-failure", *, immediate_first: bool = False, max_restarts: int = 3) -> RestartPolicy:
    return RestartPolicy(policy, max_restarts, 60.0, 0.2, 1.0, immediate_first)


@pytest.mark.parametrize("policy, failure, reset, expected", [
    ("never", True, False, False), ("never", False, True, False), ("on-failure", True, False, True),
    ("on-failure", False, False, False), ("on-failure", False, True, True), ("always", False, False, True),
    ("always", True, False, True),
])
def test_policy_words_decide_whether_an_exit_is_restarted(policy: str, failure: bool, reset: bool,
                                                         expected: bool) -> None:
    assert _policy(policy).wants_restart(failure=failure, reset=reset) is expected


def test_dm_backoff_doubles_up_to_the_cap_and_a_reset_restarts_at_once() -> None:
    p, h = _policy(max_restarts=10), deque[float]()
    assert [p.next_delay(h, 0.0) for _ in range(4)] == [0.2, 0.4, 0.8, 1.0]
    assert p.next_delay(h, 0.0, immediate=True) == 0.0


def test_backend_backoff_restarts_the_first_at_once() -> None:
    p, h = _policy(immediate_first=True, max_restarts=10), deque[float]()
    assert [p.next_delay(h, 0.0) for _ in range(4)] == [0.0, 0.2, 0.4, 0.8]


def test_the_limit_counts_restarts_inside_the_sliding_window_only() -> None:
    p, h = _policy(max_restarts=2), deque[float]()
    assert p.next_delay(h, 0.0) is not None and p.next_delay(h, 10.0) is not None
    assert p.next_delay(h, 20.0) is None and len(h) == 2  # a refused restart is not recorded
    assert p.next_delay(h, 60.5) is not None  # the one at t=0 left the window
    assert p.limit_message("boom") == "boom; restart limit reached (2 in 60.0 s)"


def test_policy_for_a_guest_takes_its_definition_words_and_limits() -> None:
    d = parse_definition({"name": "g", "kernel": "demo", "restart": "always", "max_restarts": 7,
                          "restart_window_s": 30}, check_paths=False)
    p = RestartPolicy.for_guest(d, 0.1, 2.0)
    assert (p.policy, p.max_restarts, p.window_s, p.backoff_initial, p.backoff_max) == ("always", 7, 30, 0.1, 2.0)


# ------------------------------------------------------------------------------------------------------- uids


def test_uid_pool_hands_out_the_lower_half_and_mirrors_backends_in_the_upper() -> None:
    pool = UidPool(1000, 4)
    a, b = pool.alloc(), pool.alloc()
    assert (a, b) == (1000, 1001) and pool.backend_uid(a) == 1002
    with pytest.raises(StartFailed, match="no free jail uid"):
        pool.alloc()
    pool.release(a)
    assert pool.alloc() == 1000
    assert pool.contains(1003) and not pool.contains(1004)


# ---------------------------------------------------------------------------------------------- the guest lock


class _RecordingLink:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def call(self, g: Guest, command: msg.Command[Any], timeout: float | None = None,
                   fd: int | None = None) -> Any:
        self.calls.append(command.cmd)
        return command.reply.from_result({"state": "paused"} if command.cmd == "pause" else
                                         {"state": "running"} if command.cmd == "resume" else {})


@pytest.mark.parametrize("op, state", [("pause", S.RUNNING), ("resume", S.PAUSED), ("reset", S.RUNNING)])
def test_pause_resume_and_reset_wait_for_the_guest_lock(tmp_path: Path, op: str, state: GuestState) -> None:
    async def main() -> None:
        sup = Supervisor(SupervisorConfig(paths=Paths(tmp_path / "state", tmp_path / "run")))
        link = _RecordingLink()
        sup.link = link  # type: ignore[assignment]
        g = _guest()
        g._state = state
        sup.guests[g.name] = g
        await g.lock.acquire()  # e.g. a stop in progress
        task = asyncio.ensure_future(getattr(sup, op)(g.name))
        for _ in range(5):
            await asyncio.sleep(0)
        assert link.calls == [] and not task.done()  # nothing sent while another operation holds the lock
        g.lock.release()
        await task
        assert link.calls == [op]

    asyncio.run(main())
