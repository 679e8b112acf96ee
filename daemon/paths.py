"""Where kvmdm keeps things on disk: one class, so no other module builds paths by hand.

State (durable, survives reboots): ``<state_dir>/guests/<name>.json`` (the definition) and
``<state_dir>/guests/<name>/console.log`` (the console of the last runs).
Runtime (tmpfs, dies with the host): ``<runtime_dir>/kvmdmd.sock`` and ``<runtime_dir>/guests/<name>/`` holding
``control.sock`` (the DM's control socket), ``dm.pid`` and ``meta.json`` (what a restarted daemon needs to
re-attach: uid, start time), and ``root/`` (the empty directory a jailed DM pivots into).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STATE_DIR = Path("/var/lib/kvmdm")
DEFAULT_RUNTIME_DIR = Path("/run/kvmdm")
SOCKET_NAME = "kvmdmd.sock"


@dataclass(frozen=True)
class Paths:
    state_dir: Path
    runtime_dir: Path

    @property
    def definitions_dir(self) -> Path:
        return self.state_dir / "guests"

    @property
    def runtime_guests_dir(self) -> Path:
        return self.runtime_dir / "guests"

    @property
    def default_socket(self) -> Path:
        return self.runtime_dir / SOCKET_NAME

    def definition_file(self, name: str) -> Path:
        return self.definitions_dir / f"{name}.json"

    def guest_state_dir(self, name: str) -> Path:
        return self.definitions_dir / name

    def console_log(self, name: str) -> Path:
        return self.guest_state_dir(name) / "console.log"

    def guest_runtime_dir(self, name: str) -> Path:
        return self.runtime_guests_dir / name

    def control_socket(self, name: str) -> Path:
        return self.guest_runtime_dir(name) / "control.sock"

    def dm_pid_file(self, name: str) -> Path:
        return self.guest_runtime_dir(name) / "dm.pid"

    def meta_file(self, name: str) -> Path:
        return self.guest_runtime_dir(name) / "meta.json"

    def jail_root(self, name: str) -> Path:
        return self.guest_runtime_dir(name) / "root"

    def ensure(self) -> None:
        """Create the top-level directories; 0700 since only root (the daemon) has business in them."""
        for d in (self.definitions_dir, self.runtime_guests_dir):
            d.mkdir(parents=True, exist_ok=True)
        for d in (self.state_dir, self.runtime_dir):
            os.chmod(d, 0o755)  # the API socket lives in runtime_dir and must be reachable by the group
        os.chmod(self.definitions_dir, 0o700)
        os.chmod(self.runtime_guests_dir, 0o700)
