"""The daemon's control client of one guest's DM: connects lazily (and again after the DM dropped us), keeps the
DM's state events on the :class:`Guest`, sends typed commands (daemon.messages) and turns every failure into the
:class:`SupervisorError` the API answers with."""

from __future__ import annotations

from daemon import messages as msg
from daemon.control import (
    ControlClient,
    ControlClosed,
    ControlError,
    ControlTimeout,
    ProtocolError,
    StateEvent,
)
from daemon.paths import Paths
from daemon.supervision.errors import DMFault, DMTimeout, InvalidState
from daemon.supervision.state import Guest, GuestState

# The daemon talks to a DM in these states (starting: pinging it; stopping: asking it to stop).
_REACHABLE = frozenset({GuestState.RUNNING, GuestState.PAUSED, GuestState.STARTING, GuestState.STOPPING})


class ControlLink:
    def __init__(self, paths: Paths, request_timeout: float) -> None:
        self.paths = paths
        self.request_timeout = request_timeout

    def _on_event(self, g: Guest, client: ControlClient, ev: StateEvent) -> None:
        if g.control is not client:
            return
        g.last_event = ev
        if ev.guest_status is not None:
            g.guest_status = ev.guest_status
        # The DM's pause/resume (its own, or answering ours) moves the daemon's view; other states arrive as exits.
        if g.state in (GuestState.RUNNING, GuestState.PAUSED) and ev.state in ("running", "paused"):
            g.set_state(GuestState(ev.state))

    @staticmethod
    def _on_close(g: Guest, client: ControlClient) -> None:
        if g.control is client:
            g.control = None

    async def connect(self, g: Guest, timeout: float = 2.0) -> ControlClient:
        if g.control is not None and not g.control.closed:
            return g.control
        holder: list[ControlClient] = []
        client = await ControlClient.connect(
            self.paths.control_socket(g.name),
            on_event=lambda ev: self._on_event(g, holder[0], ev) if holder else None,
            on_close=lambda reason: self._on_close(g, holder[0]) if holder else None,
            timeout=timeout)
        holder.append(client)
        g.control = client
        return client

    async def call(self, g: Guest, command: msg.Command[msg.R], timeout: float | None = None,
                   fd: int | None = None) -> msg.R:
        if g.state not in _REACHABLE or g.pidfd is None:
            raise InvalidState(f"guest {g.name!r} is {g.state}, not running")
        t = self.request_timeout if timeout is None else timeout
        try:
            client = await self.connect(g, timeout=t)
        except (OSError, TimeoutError) as e:
            raise DMTimeout(f"cannot reach the DM of {g.name!r}: {e}") from None
        try:
            return await client.call(command, timeout=t, fd=fd)
        except ProtocolError as e:
            raise DMFault(f"DM of {g.name!r} answered {command.cmd!r} outside the protocol: {e}") from None
        except ControlClosed as e:
            raise InvalidState(f"DM of {g.name!r} closed the control connection: {e}") from None
        except ControlTimeout as e:
            raise DMTimeout(str(e)) from None
        except ControlError as e:
            raise InvalidState(f"DM refused {command.cmd!r}: {e}") from None
