"""REST end to end: a real kvmdmd process on a real unix socket, driving fake DMs (tests/unit/daemon/fake_dm.py)."""

from __future__ import annotations

import base64
import os
import re
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "daemon"))

from kvmdmd_harness import Daemon, wait_until  # noqa: E402


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path).start()
    yield d
    d.cleanup()


def test_api_socket_is_mode_0660(daemon: Daemon) -> None:
    st = os.stat(daemon.sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660


def test_create_start_stop_destroy_lifecycle(daemon: Daemon) -> None:
    g = daemon.json("POST", "/v1/guests", daemon.definition("web1", vcpus=2), expect=201)
    assert g["state"] == "stopped" and g["definition"]["vcpus"] == 2
    assert daemon.json("GET", "/v1/guests")["guests"][0]["name"] == "web1"
    g = daemon.json("POST", "/v1/guests/web1/start")
    assert g["state"] == "running" and g["dm_pid"] in daemon.dm_pids()
    pid = g["dm_pid"]
    assert (daemon.runtime_dir / "guests/web1/dm.pid").read_text().strip() == str(pid)
    assert stat.S_IMODE(os.stat(daemon.runtime_dir / "guests/web1/control.sock").st_mode) == 0o600
    h = daemon.json("GET", "/health")
    assert h["guests"][0]["state"] == "running" and h["guests"][0]["dm_pid"] == pid
    g = daemon.json("POST", "/v1/guests/web1/stop")
    assert g["state"] == "stopped" and g["last_exit_code"] == 0 and g["dm_pid"] is None
    assert not (daemon.runtime_dir / "guests/web1/dm.pid").exists()
    assert daemon.json("DELETE", "/v1/guests/web1") == {"deleted": "web1"}
    assert daemon.request("GET", "/v1/guests/web1")[0] == 404
    assert not (daemon.state_dir / "guests/web1.json").exists()
    assert not (daemon.state_dir / "guests/web1").exists()
    assert daemon.dm_pids() == []


def test_dm_gets_exactly_the_contract_fds_and_jail_arguments(daemon: Daemon, tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * 4096)
    daemon.create_and_start("fds", disks=[{"path": str(disk), "read_only": True}], initrd=str(daemon.kernel))
    log = daemon.request("GET", "/v1/guests/fds/console")[2].decode()
    fds = eval(re.search(r"fds=(\[.*\])", log).group(1))  # noqa: S307 - our own fake DM's output
    # 0,1,2 + control, definition, console, kvm, kernel, initrd, disk = 10, nothing else leaked
    assert len(fds) == 10, log
    assert "jail:" + str(daemon.runtime_dir / "guests/fds/root") in log and "uid=200000 gid=200000" in log
    assert "'kvm': 'chr'" in log and "'disks': ['file']" in log


def test_console_tail_input_and_stream(daemon: Daemon) -> None:
    daemon.create_and_start("con", cmdline="fake.console_every=0.1")
    status, headers, body = daemon.request("GET", "/v1/guests/con/console?tail=10")
    assert status == 200 and len(body) == 10 and headers["content-type"].startswith("text/plain")
    r = daemon.json("POST", "/v1/guests/con/console", {"data": base64.b64encode(b"hi there").decode()})
    assert r == {"written": 8}
    wait_until(lambda: b"fake-dm: input hi there" in daemon.request("GET", "/v1/guests/con/console")[2])
    status, headers, body = daemon.request("GET", "/v1/guests/con/console/stream?tail=0&max_s=0.6")
    assert status == 200 and headers.get("transfer-encoding") == "chunked"
    assert b"fake-dm: tick" in body  # new output arrived while following


def test_pause_resume_reset_and_stats(daemon: Daemon) -> None:
    daemon.create_and_start("pr")
    assert daemon.json("POST", "/v1/guests/pr/pause")["state"] == "paused"
    assert daemon.request("POST", "/v1/guests/pr/pause")[0] == 409
    assert daemon.json("GET", "/v1/guests/pr/stats")["state"] == "paused"
    assert daemon.json("POST", "/v1/guests/pr/resume")["state"] == "running"
    assert daemon.json("POST", "/v1/guests/pr/reset")["state"] == "running"
    st = daemon.json("GET", "/v1/guests/pr/stats")
    assert st["exits"]["io"] > 0 and st["vcpus"] == 1
    metrics = daemon.request("GET", "/metrics")[2].decode()
    assert 'kvmdm_guest_vm_exits_total{guest="pr",reason="io"}' in metrics
    assert 'kvmdm_guest_state{guest="pr",state="running"} 1' in metrics
    assert re.search(r'kvmdm_guest_dm_rss_bytes\{guest="pr"\} \d+', metrics)
    assert 'kvmdm_guest_device_events_total{guest="pr",device="serial0",counter="tx_bytes"} 42' in metrics


def test_lifecycle_state_errors_are_409_and_unknown_guest_404(daemon: Daemon) -> None:
    daemon.json("POST", "/v1/guests", daemon.definition("idle"), expect=201)
    for action in ("stop", "kill", "pause", "resume", "reset"):
        assert daemon.request("POST", f"/v1/guests/idle/{action}")[0] == 409, action
    assert daemon.request("GET", "/v1/guests/idle/stats")[0] == 409
    assert daemon.request("POST", "/v1/guests/idle/console", {"text": "x"})[0] == 409
    assert daemon.request("POST", "/v1/guests", daemon.definition("idle"))[0] == 409
    for method, path in (("GET", "/v1/guests/nope"), ("POST", "/v1/guests/nope/start"),
                         ("DELETE", "/v1/guests/nope"), ("GET", "/v1/guests/nope/console")):
        status, headers, body = daemon.request(method, path)
        assert status == 404 and headers["content-type"].startswith("application/json"), (method, path)
    daemon.json("POST", "/v1/guests/idle/start")
    assert daemon.request("POST", "/v1/guests/idle/start")[0] == 409


@pytest.mark.parametrize("raw, ctype, status", [
    (b"{nope", "application/json", 400),
    (b"\xff\xfe", "application/json", 400),
    (b"[" * 60000, "application/json", 400),
    (b"1" * 5000, "application/json", 400),
    (b'{"name": "x", "kernel": "demo"}', "text/plain", 415),
    (b"[]", "application/json", 422),
    (b'{"name": "BAD", "kernel": "/nonexistent"}', "application/json", 422),
    (b'{"name": "a", "kernel": "demo", "x": ' + b'"' + b"a" * 70000 + b'"}', "application/json", 413),
])
def test_bad_bodies_get_4xx_json_errors_never_5xx(daemon: Daemon, raw: bytes, ctype: str, status: int) -> None:
    got, headers, body = daemon.request("POST", "/v1/guests", raw=raw, headers={"Content-Type": ctype})
    assert got == status, body
    assert headers["content-type"].startswith("application/json") and b'"error"' in body


def test_validation_error_lists_every_field(daemon: Daemon) -> None:
    r = daemon.json("POST", "/v1/guests", {"name": "v", "kernel": "/nonexistent", "vcpus": 0}, expect=422)
    assert "kernel: file does not exist" in r["errors"] and any("vcpus" in e for e in r["errors"])


@pytest.mark.parametrize("query", ["tail=-1", "tail=abc", f"tail={(8 << 20) + 1}"])
def test_bad_query_parameters_are_400(daemon: Daemon, query: str) -> None:
    daemon.json("POST", "/v1/guests", daemon.definition("q"), expect=201)
    assert daemon.request("GET", f"/v1/guests/q/console?{query}")[0] == 400
    assert daemon.request("GET", f"/v1/guests/q/console/stream?{query}")[0] == 400


@pytest.mark.parametrize("body, status", [({"data": "!!"}, 422), ({"text": 5}, 422), ({}, 422),
                                          ({"data": "", "text": ""}, 422), ({"text": "x" * 5000}, 413)])
def test_console_input_validation(daemon: Daemon, body: object, status: int) -> None:
    daemon.create_and_start("ci")
    assert daemon.request("POST", "/v1/guests/ci/console", body)[0] == status


def test_start_failure_when_image_vanished_is_422_with_reason(daemon: Daemon, tmp_path: Path) -> None:
    k = tmp_path / "gone.bin"
    k.write_bytes(b"k")
    daemon.json("POST", "/v1/guests", {"name": "gone", "kernel": str(k)}, expect=201)
    k.unlink()
    r = daemon.json("POST", "/v1/guests/gone/start", expect=422)
    assert "No such file" in r["error"]
    assert daemon.guest("gone")["state"] == "stopped"


def test_stop_falls_back_to_sigkill_when_dm_ignores_it(daemon: Daemon) -> None:
    daemon.create_and_start("stubborn", cmdline="fake.ignore_stop=1")
    t0 = time.monotonic()
    g = daemon.json("POST", "/v1/guests/stubborn/stop?timeout=0.5")
    assert g["state"] == "stopped" and "SIGKILL" in g["last_exit_reason"]
    assert time.monotonic() - t0 < 5


def test_dm_that_never_answers_ping_is_killed_and_start_fails_422(tmp_path: Path) -> None:
    d = Daemon(tmp_path, ["--start-timeout", "1"]).start()
    try:
        d.json("POST", "/v1/guests", d.definition("hung", cmdline="fake.hang=1", restart="never"), expect=201)
        status, _, body = d.request("POST", "/v1/guests/hung/start")
        assert status == 422 and b"did not start" in body
        g = d.guest("hung")
        assert g["state"] == "stopped" and "SIGKILL" in g["last_exit_reason"] and d.dm_pids() == []
    finally:
        d.cleanup()


def test_guest_exit_code_contract_is_reported(daemon: Daemon) -> None:
    daemon.create_and_start("off", cmdline="fake.exit_after=0.2 fake.exit_code=0 fake.guest_status=7")
    g = wait_until(lambda: (x := daemon.guest("off"))["state"] == "stopped" and x, 5)
    assert g["last_exit_code"] == 0 and g["guest_status"] == 7 and g["restarts"] == 0


@pytest.mark.parametrize("code", [0, 3])
def test_a_guest_over_before_its_first_ping_still_started(daemon: Daemon, code: int) -> None:
    """A DM that powers off (or resets) before the daemon's first ping got through ran its guest: start is a 200."""
    body = daemon.definition(f"quick{code}", cmdline=f"fake.exit_now={code}", restart="never")
    daemon.json("POST", "/v1/guests", body, expect=201)
    daemon.json("POST", f"/v1/guests/quick{code}/start")
    g = wait_until(lambda: (x := daemon.guest(f"quick{code}"))["state"] == "stopped" and x, 5)
    assert g["last_exit_code"] == code, g


def test_a_dm_that_fails_before_its_first_ping_fails_the_start_422(daemon: Daemon) -> None:
    daemon.json("POST", "/v1/guests", daemon.definition("broken", cmdline="fake.exit_now=1", restart="never"),
                expect=201)
    status, _, body = daemon.request("POST", "/v1/guests/broken/start")
    assert status == 422 and b"DM error (DM exit 1)" in body, body
    assert daemon.guest("broken")["state"] in ("stopped", "crashed")


def test_corrupt_definition_is_reported_in_health_and_daemon_still_serves(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    (d.state_dir / "guests").mkdir(parents=True)
    (d.state_dir / "guests" / "broken.json").write_text("{")
    d.start()
    try:
        h = d.json("GET", "/health")
        assert h["store_errors"][0]["path"].endswith("broken.json") and h["guests"] == []
        assert "kvmdm_store_errors 1" in d.request("GET", "/metrics")[2].decode()
    finally:
        d.cleanup()


def test_openapi_document_lists_every_route(daemon: Daemon) -> None:
    doc = daemon.json("GET", "/openapi.json")
    assert doc["openapi"].startswith("3.0")
    for p in ("/health", "/metrics", "/v1/guests", "/v1/guests/{name}", "/v1/guests/{name}/console/stream",
              *(f"/v1/guests/{{name}}/{a}" for a in ("start", "stop", "kill", "pause", "resume", "reset"))):
        assert p in doc["paths"], p
