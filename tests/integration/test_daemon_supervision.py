"""Supervision: DM exits noticed within 1 s via pidfd, restart policies, restart limits, daemon restart re-attach."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "daemon"))

from kvmdmd_harness import Daemon, reap, wait_until  # noqa: E402


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path).start()
    yield d
    d.cleanup()


def test_kill_9_of_a_dm_is_detected_within_1s_and_restarted(daemon: Daemon) -> None:
    pid = daemon.create_and_start("k9")["dm_pid"]
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    g = wait_until(lambda: (x := daemon.guest("k9"))["last_exit_reason"] and x, 1.0, 0.01)
    assert time.monotonic() - t0 < 1.0
    assert "SIGKILL" in g["last_exit_reason"]
    g = wait_until(lambda: (x := daemon.guest("k9"))["state"] == "running" and x["dm_pid"] != pid and x, 5)
    assert g["restarts"] == 1 and g["dm_pid"] in daemon.dm_pids()
    h = daemon.json("GET", "/health")
    assert h["guests"][0]["restarts"] == 1 and "SIGKILL" in h["guests"][0]["last_exit_reason"]
    assert 'kvmdm_guest_restarts_total{guest="k9"} 1' in daemon.request("GET", "/metrics")[2].decode()


@pytest.mark.parametrize("policy, code, restarted, final", [
    ("never", 4, False, "crashed"),
    ("on-failure", 4, True, None),
    ("on-failure", 1, True, None),
    ("on-failure", 0, False, "stopped"),
    ("always", 0, True, None),
    ("on-failure", 3, True, None),  # guest reset: re-spawn at once
    ("never", 3, False, "stopped"),
])
def test_restart_policy_by_exit_code(daemon: Daemon, policy: str, code: int, restarted: bool,
                                     final: str | None) -> None:
    # exit_after is long enough that the restarted DM is observed running before it exits again
    pid = daemon.create_and_start("p", restart=policy, cmdline=f"fake.exit_after=0.3 fake.exit_code={code}")["dm_pid"]
    wait_until(lambda: daemon.guest("p")["last_exit_code"] == code, 3)
    if restarted:
        g = wait_until(lambda: (x := daemon.guest("p"))["dm_pid"] not in (None, pid) and x, 3)
        assert g["restarts"] >= 1
    else:
        time.sleep(0.5)
        g = daemon.guest("p")
        assert g["state"] == final and g["restarts"] == 0 and g["dm_pid"] is None


def test_restart_limit_marks_guest_failed(daemon: Daemon) -> None:
    daemon.create_and_start("flap", max_restarts=2, cmdline="fake.exit_after=0.05 fake.exit_code=4")
    g = wait_until(lambda: (x := daemon.guest("flap"))["state"] == "failed" and x, 10)
    assert g["restarts"] == 2 and "restart limit reached" in g["last_exit_reason"]
    assert daemon.dm_pids() == []
    # an operator start opens a new window
    assert daemon.json("POST", "/v1/guests/flap/start")["state"] in ("running", "restarting", "crashed")


def test_daemon_restart_reattaches_to_running_dms(tmp_path: Path) -> None:
    d = Daemon(tmp_path).start()
    try:
        pids = {n: d.create_and_start(n)["dm_pid"] for n in ("ra", "rb")}
        d.json("POST", "/v1/guests/rb/pause")
        assert d.stop() == 0
        # the DMs survived the daemon
        assert sorted(d.dm_pids()) == sorted(pids.values())
        d.start()
        for n, pid in pids.items():
            g = d.guest(n)
            assert g["dm_pid"] == pid and g["state"] in ("running", "paused")
        wait_until(lambda: d.guest("rb")["state"] == "paused", 2)  # replayed state event
        assert d.json("GET", "/v1/guests/ra/stats")["state"] == "running"
        assert d.json("POST", "/v1/guests/rb/resume")["state"] == "running"
        # still supervised: a kill -9 is noticed through the pidfd although the DM is not our child
        os.kill(pids["ra"], signal.SIGKILL)
        g = wait_until(lambda: (x := d.guest("ra"))["last_exit_reason"] and x, 1.0, 0.01)
        assert "exit status unknown" in g["last_exit_reason"]
        reap([pids["ra"]])
        wait_until(lambda: d.guest("ra")["state"] == "running" and d.guest("ra")["dm_pid"] != pids["ra"], 5)
        # and a graceful stop of the re-attached DM works
        g = d.json("POST", "/v1/guests/rb/stop")
        assert g["state"] == "stopped"
        reap([pids["rb"]])
    finally:
        d.cleanup()


def test_dm_that_died_while_daemon_was_down_is_restarted_per_policy(tmp_path: Path) -> None:
    d = Daemon(tmp_path).start()
    try:
        pid = d.create_and_start("away")["dm_pid"]
        d.stop()
        os.kill(pid, signal.SIGKILL)
        reap([pid])
        d.start()
        g = wait_until(lambda: (x := d.guest("away"))["state"] == "running" and x, 5)
        assert g["dm_pid"] != pid and "while the daemon was not running" in g["last_exit_reason"]
    finally:
        d.cleanup()


def test_stale_pid_file_of_unrelated_process_is_not_adopted_or_killed(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    gdir = d.runtime_dir / "guests" / "stale"
    gdir.mkdir(parents=True)
    (gdir / "dm.pid").write_text(str(os.getpid()))  # this pytest process: alive, but not a DM
    orphan = d.runtime_dir / "guests" / "orphan"
    orphan.mkdir()
    (orphan / "dm.pid").write_text(str(os.getpid()))
    (d.state_dir / "guests").mkdir(parents=True)
    (d.state_dir / "guests" / "stale.json").write_text(json.dumps(
        {"name": "stale", "kernel": str(d.kernel), "restart": "never"}))
    d.start()
    try:
        g = d.guest("stale")
        assert g["state"] == "crashed" and g["dm_pid"] is None  # we are alive, so not killed
        assert not orphan.exists() and not (gdir / "dm.pid").exists()
    finally:
        d.cleanup()


def test_destroy_of_running_guest_kills_dm_and_removes_runtime(daemon: Daemon) -> None:
    pid = daemon.create_and_start("gone")["dm_pid"]
    daemon.json("DELETE", "/v1/guests/gone")
    assert pid not in daemon.dm_pids()
    assert not (daemon.runtime_dir / "guests" / "gone").exists()


def test_sd_notify_ready_and_watchdog_are_sent(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(5)
    d = Daemon(tmp_path)
    d.start(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"})
    try:
        msgs = [s.recv(4096).decode() for _ in range(3)]
        assert any("READY=1" in m for m in msgs) and any(m == "WATCHDOG=1" for m in msgs)
    finally:
        d.cleanup()
        s.close()
