"""Contract tests: schemathesis drives every operation of /openapi.json; no 5xx, responses match the document.

Runs over the loopback TCP listener with a bearer token (which also exercises that listener); the document is
fetched over the unix socket and handed to schemathesis as a file.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "daemon"))

from kvmdmd_harness import Daemon  # noqa: E402

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tcp_daemon(tmp_path: Path) -> Daemon:
    token = tmp_path / "token"
    token.write_text("t0k3n-0123456789abcdef")
    token.chmod(0o600)
    port = _free_port()
    d = Daemon(tmp_path, ["--tcp", f"127.0.0.1:{port}", "--token-file", str(token)])
    d.port = port  # type: ignore[attr-defined]
    d.token = token.read_text()  # type: ignore[attr-defined]
    d.start()
    yield d
    d.cleanup()


def _http(port: int, path: str, token: str | None) -> int:
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
    return c.getresponse().status


def test_tcp_listener_requires_the_bearer_token(tcp_daemon: Daemon) -> None:
    port = tcp_daemon.port  # type: ignore[attr-defined]
    assert _http(port, "/health", None) == 401
    assert _http(port, "/health", "wrong") == 401
    assert _http(port, "/health", tcp_daemon.token) == 200  # type: ignore[attr-defined]
    assert tcp_daemon.request("GET", "/health")[0] == 200  # the unix socket needs none


@pytest.mark.parametrize("spec", ["0.0.0.0:8080", "10.0.0.1:80", "localhost:80", "[::]:80"])
def test_daemon_refuses_non_loopback_tcp(tmp_path: Path, spec: str) -> None:
    token = tmp_path / "token"
    token.write_text("t0k3n-0123456789abcdef")
    token.chmod(0o600)
    d = Daemon(tmp_path, ["--tcp", spec, "--token-file", str(token)])
    r = subprocess.run(d.argv(), capture_output=True, timeout=20, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 1 and b"loopback" in r.stderr


@pytest.mark.slow
@pytest.mark.skipif(not SCHEMATHESIS.exists() and shutil.which("schemathesis") is None,
                    reason="schemathesis not installed")
def test_schemathesis_finds_no_server_errors_and_no_contract_drift(tcp_daemon: Daemon, tmp_path: Path) -> None:
    # A running guest so that stats/pause/console paths are reachable with its name.
    tcp_daemon.create_and_start("st")
    schema = tmp_path / "openapi.json"
    schema.write_bytes(tcp_daemon.request("GET", "/openapi.json")[2])
    exe = str(SCHEMATHESIS) if SCHEMATHESIS.exists() else "schemathesis"
    cmd = [exe, "run", str(schema), "--url", f"http://127.0.0.1:{tcp_daemon.port}",  # type: ignore[attr-defined]
           "-H", f"Authorization: Bearer {tcp_daemon.token}",  # type: ignore[attr-defined]
           "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                       "response_schema_conformance",
           "--exclude-operation-id", "consoleStream",  # an endless stream by design (tested separately)
           "--max-examples", "40", "--workers", "2", "--request-timeout", "30",
           "--suppress-health-check", "all", "--phases", "examples,coverage,fuzzing"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    out = r.stdout + r.stderr
    failures = out[out.find("FAILURES"):][:6000] if "FAILURES" in out else out[-6000:]
    assert r.returncode == 0, failures
    # make sure it really exercised the API (a filter mistake would otherwise pass vacuously)
    assert "createGuest" in out or "POST /v1/guests" in out, out[-3000:]
