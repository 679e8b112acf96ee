"""The supervisor's configuration (kvmdmd's command line fills it)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Literal

from daemon import backends as bk
from daemon.paths import Paths

DEFAULT_DM_COMMAND = [sys.executable, "-m", "daemon.dm"]


@dataclass
class SupervisorConfig:
    paths: Paths
    dm_command: list[str] = field(default_factory=lambda: list(DEFAULT_DM_COMMAND))
    # How DMs start: "zygote" forks them from a pre-imported process (daemon.zygote), "exec" runs dm_command.
    # The zygote runs daemon.dm itself, so a custom dm_command (the tests' fake DM) always means exec.
    dm_spawn: Literal["exec", "zygote"] = "zygote"
    kvm_device: str = "/dev/kvm"
    no_jail: bool = False
    uid_base: int = 200000
    uid_count: int = 10000
    start_timeout: float = 10.0
    stop_timeout: float = 10.0
    request_timeout: float = 5.0
    backoff_initial: float = 0.2
    backoff_max: float = 10.0
    backend_command: list[str] = field(default_factory=lambda: list(bk.BACKEND_COMMAND))
    backend_ready_timeout: float = bk.READY_TIMEOUT
    # Back-end restarts back off too, but stay well under the front-end's re-attach grace (5 s).
    backend_backoff_max: float = 1.0

    @property
    def uses_zygote(self) -> bool:
        return self.dm_spawn == "zygote" and self.dm_command == DEFAULT_DM_COMMAND
