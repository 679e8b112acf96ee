"""The supervisor's errors; ``status`` is the HTTP status the REST API answers with."""

from __future__ import annotations

from daemon.config import ConfigError


class SupervisorError(Exception):
    """Base; ``status`` is the HTTP status the API answers with."""

    status = 409


class GuestNotFound(SupervisorError):
    status = 404

    def __init__(self, name: str) -> None:
        super().__init__(f"guest {name!r} not found")


class GuestExists(SupervisorError):
    status = 409


class InvalidState(SupervisorError):
    """The operation is not possible in the guest's current state."""

    status = 409


class StartFailed(SupervisorError):
    """The DM could not be prepared or did not come up (message says why)."""

    status = 422


class DMFault(SupervisorError):
    """The DM misbehaved (invalid answer): a fault of the upstream process, not of the client."""

    status = 502


class DMTimeout(DMFault):
    """The DM did not answer a control request in time (a DM fault, not the client's)."""

    status = 504


class InvalidDefinition(SupervisorError):
    status = 422

    def __init__(self, err: ConfigError) -> None:
        super().__init__(str(err))
        self.errors = err.errors
