"""The restart policy, one implementation for DMs and vhost-user back-ends.

A guest definition's ``restart`` (``never`` | ``on-failure`` | ``always``) says *whether* an exit is restarted; its
``max_restarts`` per sliding ``restart_window_s`` bounds *how often*; restarts back off exponentially from
``backoff_initial`` up to ``backoff_max``. A guest-requested reset restarts at once under any policy but
``never``. Back-ends restart under their guest's words and limits (counted per back-end), their first restart in
a window immediate so that the DM's re-attach grace is not spent waiting.

Pure: the caller passes the clock reading, so the policy is tested without sleeping.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from daemon.config import GuestDefinition


@dataclass(frozen=True)
class RestartPolicy:
    policy: str  # never | on-failure | always
    max_restarts: int
    window_s: float
    backoff_initial: float
    backoff_max: float
    immediate_first: bool = False  # the first restart in a window waits no backoff

    @classmethod
    def for_guest(cls, d: GuestDefinition, backoff_initial: float, backoff_max: float, *,
                  immediate_first: bool = False) -> RestartPolicy:
        return cls(d.restart, d.max_restarts, d.restart_window_s, backoff_initial, backoff_max, immediate_first)

    def wants_restart(self, *, failure: bool, reset: bool = False) -> bool:
        """Does the policy word restart this exit? (A reset is neither failure nor success: restarted unless
        ``never``.)"""
        if reset:
            return self.policy != "never"
        if failure:
            return self.policy in ("on-failure", "always")
        return self.policy == "always"

    def next_delay(self, history: deque[float], now: float, *, immediate: bool = False) -> float | None:
        """Admit one more restart at monotonic time ``now``: its backoff delay in seconds, recorded in
        ``history``; or None if ``max_restarts`` restarts already happened within the window (then nothing is
        recorded)."""
        while history and now - history[0] > self.window_s:
            history.popleft()
        if len(history) >= self.max_restarts:
            return None
        n = len(history) - (1 if self.immediate_first else 0)  # earlier restarts that count for backoff
        history.append(now)
        if immediate or n < 0:
            return 0.0
        return min(self.backoff_max, self.backoff_initial * 2**n)

    def limit_message(self, reason: str) -> str:
        return f"{reason}; restart limit reached ({self.max_restarts} in {self.window_s} s)"
