"""The kvmdm CLI against a real daemon: exit codes (0 ok, 1 API error, 2 usage, 3 no daemon, 4 not found), --json."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "daemon"))

from kvmdmd_harness import REPO, Daemon  # noqa: E402


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path).start()
    yield d
    d.cleanup()


def kvmdm(sock: Path | str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon.cli", "--socket", str(sock), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_full_cli_workflow_with_toml_and_json_output(daemon: Daemon, tmp_path: Path) -> None:
    (tmp_path / "g.toml").write_text(f'name = "cli1"\nkernel = "{daemon.kernel.name}"\nvcpus = 2\n')
    r = kvmdm(daemon.sock, "create", str(tmp_path / "g.toml"))
    assert r.returncode == 0 and "created guest cli1" in r.stdout
    assert kvmdm(daemon.sock, "start", "cli1").returncode == 0
    r = kvmdm(daemon.sock, "list")
    assert r.returncode == 0 and "cli1" in r.stdout and "running" in r.stdout and "NAME" in r.stdout
    r = kvmdm(daemon.sock, "--json", "list")
    data = json.loads(r.stdout)
    assert data["guests"][0]["definition"]["vcpus"] == 2
    assert json.loads(kvmdm(daemon.sock, "health", "--json").stdout)["status"] == "ok"
    for cmd in ("pause", "resume", "reset"):
        assert kvmdm(daemon.sock, cmd, "cli1").returncode == 0, cmd
    r = kvmdm(daemon.sock, "console", "cli1")
    assert r.returncode == 0 and "fake-dm: booting cli1" in r.stdout
    assert kvmdm(daemon.sock, "console", "cli1", "--input", "hello").returncode == 0
    r = kvmdm(daemon.sock, "logs", "cli1")
    assert r.returncode == 0 and "DM spawned" in r.stdout
    assert "kvmdm_guest_state" in kvmdm(daemon.sock, "metrics").stdout
    assert "EXIT" in kvmdm(daemon.sock, "stats", "cli1").stdout
    assert kvmdm(daemon.sock, "stop", "cli1").returncode == 0
    assert kvmdm(daemon.sock, "start", "cli1").returncode == 0
    assert kvmdm(daemon.sock, "kill", "cli1").returncode == 0
    assert kvmdm(daemon.sock, "destroy", "cli1").returncode == 0
    assert "no guests" in kvmdm(daemon.sock, "list").stdout


def test_exit_code_4_for_unknown_guest(daemon: Daemon) -> None:
    for cmd in ("start", "stop", "destroy", "console", "logs", "show"):
        r = kvmdm(daemon.sock, cmd, "ghost")
        assert r.returncode == 4 and "guest 'ghost' not found" in r.stderr, cmd


def test_exit_code_1_for_api_errors_with_message(daemon: Daemon, tmp_path: Path) -> None:
    f = tmp_path / "bad.json"
    f.write_text(json.dumps({"name": "bad", "kernel": "/nonexistent", "vcpus": 99}))
    r = kvmdm(daemon.sock, "create", str(f))
    assert r.returncode == 1 and "kernel: file does not exist" in r.stderr and "vcpus" in r.stderr
    daemon.json("POST", "/v1/guests", daemon.definition("idle"), expect=201)
    r = kvmdm(daemon.sock, "pause", "idle")
    assert r.returncode == 1 and "error 409" in r.stderr


def test_exit_code_3_when_daemon_is_not_running(tmp_path: Path) -> None:
    r = kvmdm(tmp_path / "nope.sock", "list")
    assert r.returncode == 3 and "daemon not running" in r.stderr


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["start"], ["stop", "a", "--timeout", "x"]])
def test_exit_code_2_for_usage_errors(tmp_path: Path, args: list[str]) -> None:
    assert kvmdm(tmp_path / "s", *args).returncode == 2


def test_create_with_unreadable_file_is_usage_error(tmp_path: Path) -> None:
    r = kvmdm(tmp_path / "s", "create", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "cannot read" in r.stderr
