"""20 guests created, started and destroyed in a loop: no leaked processes, fds or files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "daemon"))

from kvmdmd_harness import Daemon, wait_until  # noqa: E402


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_twenty_guests_loop_leaks_nothing(tmp_path: Path) -> None:
    d = Daemon(tmp_path).start()
    try:
        assert d.proc is not None
        dpid = d.proc.pid
        # one warm-up round so lazily created objects (thread pool, ...) do not count as leaks
        d.create_and_start("warm")
        d.json("DELETE", "/v1/guests/warm")
        fds0 = _fd_count(dpid)
        files0 = _files(d.state_dir) | _files(d.runtime_dir)
        for rnd in range(2):
            names = [f"g{rnd}-{i}" for i in range(20)]
            for n in names:
                d.create_and_start(n)
            assert len(d.dm_pids()) == 20
            assert len(d.json("GET", "/health")["guests"]) == 20
            for i, n in enumerate(names):
                if i % 2:
                    d.json("POST", f"/v1/guests/{n}/stop")
                d.json("DELETE", f"/v1/guests/{n}")
            assert d.dm_pids() == []
        wait_until(lambda: _fd_count(dpid) <= fds0, 3)
        assert _files(d.state_dir) | _files(d.runtime_dir) == files0
        # no zombies left under the daemon
        children = Path(f"/proc/{dpid}/task/{dpid}/children").read_text().split()
        assert children == []
    finally:
        d.cleanup()
