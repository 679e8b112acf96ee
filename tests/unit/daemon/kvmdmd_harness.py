"""Test harness: run a real ``kvmdmd`` process with temp dirs and the fake DM, talk HTTP over its unix socket.

Shared by tests/unit/daemon and tests/integration/test_daemon_*.py (they add this directory to sys.path).
The test process makes itself a child subreaper (prctl(2) PR_SET_CHILD_SUBREAPER) so DMs orphaned by a killed
daemon are re-parented to it and can be reaped; every fake DM carries a unique ``--tag`` so tests find exactly
their own processes in /proc.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
FAKE_DM = Path(__file__).resolve().parent / "fake_dm.py"
PR_SET_CHILD_SUBREAPER = 36

sys.path.insert(0, str(REPO))
from daemon.cli import UnixHTTPConnection  # noqa: E402

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def wait_until(pred: Any, timeout: float = 5.0, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


class Daemon:
    start_timeout = 15.0  # until /health answers; slow machines (the real-KVM lane's TCG L1) raise it

    def __init__(self, tmp: Path, extra: list[str] | None = None) -> None:
        self.tmp = tmp
        self.state_dir = tmp / "state"
        self.runtime_dir = tmp / "run"
        self.sock = self.runtime_dir / "kvmdmd.sock"
        self.tag = f"kvmdmt-{uuid.uuid4().hex[:12]}"
        self.dm_command = f"{sys.executable} {FAKE_DM} --tag {self.tag}"
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "kvmdmd.log"
        self.kernel = tmp / "kernel.bin"
        self.kernel.write_bytes(b"\x7fELF" + b"\0" * 1020)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "daemon.server", "--state-dir", str(self.state_dir), "--runtime-dir",
                str(self.runtime_dir), "--dm-command", self.dm_command, "--log-level", "DEBUG", *self.extra]

    def start(self, env: dict[str, str] | None = None) -> Daemon:
        logf = open(self.log, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(self.argv(), cwd=REPO, stdout=logf, stderr=logf,
                                     env={**os.environ, **(env or {})})
        logf.close()

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"kvmdmd exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            try:
                return self.request("GET", "/health")[0] == 200
            except OSError:
                return False

        wait_until(up, self.start_timeout, 0.05)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        rc = self.proc.wait(15)
        self.proc = None
        return rc

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
        conn = UnixHTTPConnection(str(self.sock), timeout)
        h = dict(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            h.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=data, headers=h)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body: Any = None, expect: int | None = 200, **kw: Any) -> Any:
        status, _, data = self.request(method, path, body, **kw)
        if expect is not None:
            assert status == expect, f"{method} {path}: {status} {data[:2000]!r}"
        return json.loads(data)

    def guest(self, name: str) -> dict[str, Any]:
        return self.json("GET", f"/v1/guests/{name}")

    def definition(self, name: str, **kw: Any) -> dict[str, Any]:
        return {"name": name, "kernel": str(self.kernel), **kw}

    def create_and_start(self, name: str, **kw: Any) -> dict[str, Any]:
        self.json("POST", "/v1/guests", self.definition(name, **kw), expect=201)
        return self.json("POST", f"/v1/guests/{name}/start")

    def dm_pids(self) -> list[int]:
        return tagged_pids(self.tag)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        pids = self.dm_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        reap(pids)


def pids_with_cmdline(*needles: bytes) -> list[int]:
    """Pids of processes whose command line contains every needle (DMs, keepers, back-ends of one test)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes()
        except OSError:
            continue
        if all(n in cmd for n in needles):
            out.append(int(d))
    return out


def tagged_pids(tag: str) -> list[int]:
    """DMs (and keepers) of the daemon tagged ``tag``; not the daemon itself, whose argv has the tag too."""
    return pids_with_cmdline(tag.encode(), b"--control-fd")


def reap(pids: list[int] | None = None) -> None:
    """Reap zombies re-parented to us (subreaper) without touching subprocess.Popen children we still track."""
    for pid in pids or []:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    break
            except ChildProcessError:
                break  # not our child (its parent reaps it)
            time.sleep(0.01)
