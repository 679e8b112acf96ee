"""Daemon-managed vhost-user back-ends (daemon/backends.py, daemon/supervisor.py) with the REAL jailed DM and the
REAL jailed ``kvmdm-backend``: spawn before the DM, report in /health and /metrics, clean up with the guest,
restart + re-attach after a crash without rebooting the guest, NEEDS_RESET when restarts run out, adoption by a
restarted daemon, and no leaks over 20 guests. Also the control protocol's fd passing (``attach_backend``).

Process trees: kvmdmd -> zygote -> DM (pid 1 of its own pid namespace, no keeper; an exec'd DM has one), and
kvmdmd -> keeper -> back-end (daemon/jail.py step 10); /health's ``pid`` of a back-end is its keeper; killing
either kills both (PR_SET_PDEATHSIG / the keeper re-raises).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "daemon"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvmdmd_harness import pids_with_cmdline, wait_until  # noqa: E402
from test_real_dm_process_model import (  # noqa: E402
    RealDaemon,
    _links,
    _mounts,
    _settled_fds,
    children,
    is_alive,
    jailed_dm,
    proc_status,
)

from daemon import backends as bk  # noqa: E402
from daemon.config import parse_definition  # noqa: E402
from daemon.control import (  # noqa: E402
    ControlClient,
    ControlError,
    ControlServer,
    LocalProtocolError,
    RemoteProtocolError,
    validate_request,
)
from guests.build import build_guest  # noqa: E402

GUEST_SRC = Path(__file__).resolve().parents[1] / "guests" / "virtio_blk.S"
MIB = 1 << 20
BENCH_MB = 160  # phase 2 (1 MiB writes over [0, 160 MiB)) lasts long enough to kill the back-end in it
Q_FILL = b"Q-DATA-KVMDM\n"

def kvm(f: Any) -> Any:
    """Marks of the tests that run guests (the control/unit tests below them need neither KVM nor root)."""
    return pytest.mark.kvm(pytest.mark.root(pytest.mark.timeout(240)(f)))


@pytest.fixture(scope="module")
def blk_guest() -> str:
    return str(build_guest(GUEST_SRC))


@pytest.fixture(scope="module")
def uart_guest() -> str:
    return str(build_guest("uart_irq"))


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[RealDaemon]:
    d = RealDaemon(tmp_path).start()
    yield d
    d.cleanup()
    for pid in backend_pids(str(d.runtime_dir)):  # never leave a back-end behind, even when a test fails
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def backend_pids(marker: str) -> list[int]:
    return pids_with_cmdline(b"daemon.backend_main", marker.encode())


def _image(path: Path, mib: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(mib * MIB)
    return path


def _bench_image(path: Path) -> Path:
    """MiB 0..M-2 zero, MiB M-1 a known pattern Q: phase 1 reads end with Q in the guest's buffer, so phase 2
    writes Q to every MiB of [0, M): a lost write leaves a zero MiB behind."""
    _image(path, BENCH_MB + 1)
    q = (Q_FILL * (MIB // len(Q_FILL) + 1))[:MIB]
    with open(path, "r+b") as f:
        f.seek((BENCH_MB - 1) * MIB)
        f.write(q)
    return path


def _dm_log(d: RealDaemon, name: str) -> str:
    return (d.state_dir / "guests" / name / "dm.log").read_text()


def _finished(d: RealDaemon, name: str) -> dict[str, Any]:
    return wait_until(lambda: (g := d.guest(name))["state"] in ("stopped", "crashed", "failed") and g, 120, 0.1)


# --------------------------------------------------------------------------------------------- basic life


@kvm
def test_managed_blk_backend_serves_the_guest_and_is_cleaned_up_with_its_dm(
        daemon: RealDaemon, blk_guest: str, tmp_path: Path) -> None:
    img = _image(tmp_path / "disk.raw", 16)
    daemon.create("vb", blk_guest, cmdline="sectors=64", memory_mib=32,
                  disks=[{"path": str(img), "backend": "vhost-user", "serial": "VUSER1"}], restart="never")
    g = daemon.start_guest("vb")
    [b] = g["backends"]
    assert b["kind"] == "blk" and b["device"] == 0 and b["state"] == "running" and b["restarts"] == 0
    assert b["pid"] is not None
    out = _finished(daemon, "vb")
    console = daemon.console("vb").decode()
    assert out["last_exit_code"] == 0, (console, _dm_log(daemon, "vb"))
    assert "virtio_blk: serial VUSER1" in console  # GET_ID answered by the back-end, via the DM's front-end
    assert console.endswith("virtio_blk: 0 failed\n"), console
    # Stopped with its DM: process, socket, pid file and jail dir are gone; /health says so.
    assert out["backends"][0]["state"] == "stopped" and out["backends"][0]["pid"] is None
    wait_until(lambda: backend_pids(str(daemon.runtime_dir)) == [], 5)
    assert sorted(p.name for p in (daemon.runtime_dir / "guests" / "vb").iterdir()) == ["root"]
    # The guest's pattern is in the image (written through the jailed back-end).
    assert (tmp_path / "disk.raw").read_bytes()[:64 * 512].count(b"\0") < 64 * 512


def _backend_child(keeper: int) -> int:
    """The serving process: the back-end keeper's only child (enter_jail's fork into the pid namespace)."""
    kids = wait_until(lambda: children(keeper), 5.0)
    assert len(kids) == 1, kids
    return kids[0]


def _health_backend(d: RealDaemon, name: str, i: int = 0) -> dict[str, Any]:
    return d.health_of(name)["backends"][i]


@kvm
def test_backend_runs_jailed_under_a_uid_distinct_from_its_dm_and_shows_in_metrics(
        daemon: RealDaemon, uart_guest: str, tmp_path: Path) -> None:
    img = _image(tmp_path / "disk.raw", 4)
    daemon.create("j", uart_guest, cmdline="timeout=60000", memory_mib=16,
                  disks=[{"path": str(img), "backend": "vhost-user"}])
    g = daemon.start_guest("j")
    wait_until(lambda: b"READY" in daemon.console("j"), 10)
    bst = proc_status(_backend_child(g["backends"][0]["pid"]))
    dst = proc_status(jailed_dm(g["dm_pid"]))
    uid = bst["Uid"].split()[0]
    assert uid != "0" and uid != dst["Uid"].split()[0]
    assert bst["CapEff"] == "0000000000000000" and bst["NoNewPrivs"] == "1" and bst["Seccomp"] == "2"
    metrics = daemon.request("GET", "/metrics")[2].decode()
    assert 'kvmdm_backend_up{guest="j",device="0",type="blk"} 1' in metrics
    assert 'kvmdm_backend_restarts{guest="j",device="0",type="blk"} 0' in metrics


# --------------------------------------------------------------------------------- crash + re-attach


def _console_file(d: RealDaemon, name: str) -> Path:
    return d.state_dir / "guests" / name / "console.log"


def _wait_console(d: RealDaemon, name: str, marker: bytes, timeout: float = 30.0) -> None:
    f = _console_file(d, name)
    deadline = time.monotonic() + timeout
    while marker not in (f.read_bytes() if f.exists() else b""):
        assert time.monotonic() < deadline, f"{marker!r} not on the console within {timeout} s"
        time.sleep(0.001)


def _ready_count(d: RealDaemon, name: str) -> int:
    """READY lines the guest's back-end 0 printed (one per start: it prints READY once jailed and listening)."""
    f = d.state_dir / "guests" / name / "backend0.log"
    return f.read_bytes().count(b"\nREADY ") + f.read_bytes().startswith(b"READY ") if f.exists() else 0


def _freeze_and_kill(keeper: int) -> None:
    """SIGSTOP the serving back-end (so it is caught with a request in flight), then SIGKILL it."""
    child = _backend_child(keeper)
    os.kill(child, signal.SIGSTOP)
    time.sleep(0.3)  # the guest keeps kicking into a dead ring meanwhile
    os.kill(child, signal.SIGKILL)


@kvm
def test_kill_9_of_the_blk_backend_mid_io_is_restarted_and_reattached_without_losing_a_request(
        daemon: RealDaemon, blk_guest: str, tmp_path: Path) -> None:
    img = _bench_image(tmp_path / "bench.raw")
    daemon.create("io", blk_guest, cmdline=f"bench=1 mb={BENCH_MB} rand=256", memory_mib=32,
                  disks=[{"path": str(img), "backend": "vhost-user"}])
    g = daemon.start_guest("io")
    dm_pid, keeper = g["dm_pid"], g["backends"][0]["pid"]
    _wait_console(daemon, "io", b"><")  # phase 2 (the writes) has started
    _freeze_and_kill(keeper)
    out = _finished(daemon, "io")
    console = daemon.console("io").decode()
    assert console.endswith("virtio_blk: bench done\nvirtio_blk: 0 failed\n"), (console, _dm_log(daemon, "io"))
    assert out["last_exit_code"] == 0 and out["restarts"] == 0  # the same DM ran the guest to the end: no reboot
    assert console.count("virtio_blk: capacity") == 1
    ev = [e["event"] for e in daemon.json("GET", "/v1/guests/io/events")["events"]]
    assert any("re-attached to the DM (rings resumed)" in e for e in ev), ev
    assert any(f"DM pid {dm_pid} exited" in e for e in ev) and sum("DM spawned" in e for e in ev) == 1
    assert out["backends"][0]["restarts"] == 1
    assert "killed by signal SIGKILL" in (out["backends"][0]["last_exit_reason"] or "")
    # Every write landed: each MiB of [0, BENCH_MB) now holds Q (a lost write would leave zeros).
    q = (Q_FILL * (MIB // len(Q_FILL) + 1))[:MIB]
    with open(img, "rb") as f:
        bad = [i for i in range(BENCH_MB) if f.read(MIB) != q]
    assert bad == []
    assert "rings resumed at used idx" in _dm_log(daemon, "io")


@kvm
def test_restart_count_shows_in_health_while_the_guest_keeps_running(
        daemon: RealDaemon, uart_guest: str, tmp_path: Path) -> None:
    img = _image(tmp_path / "disk.raw", 4)
    daemon.create("h", uart_guest, cmdline="timeout=60000", memory_mib=16,
                  disks=[{"path": str(img), "backend": "vhost-user"}])
    g = daemon.start_guest("h")
    wait_until(lambda: b"READY" in daemon.console("h"), 10)
    old = g["backends"][0]["pid"]
    os.kill(_backend_child(old), signal.SIGKILL)
    b = wait_until(lambda: (x := _health_backend(daemon, "h"))["restarts"] == 1 and x["state"] == "running"
                   and x["pid"] != old and x, 10)
    assert is_alive(b["pid"]) and not is_alive(old)
    h = daemon.health_of("h")
    assert h["state"] == "running" and h["dm_pid"] == g["dm_pid"] and h["restarts"] == 0
    metrics = daemon.request("GET", "/metrics")[2].decode()
    assert 'kvmdm_backend_restarts{guest="h",device="0",type="blk"} 1' in metrics


@kvm
def test_backend_that_keeps_crashing_leaves_the_device_needs_reset_and_the_dm_running(
        daemon: RealDaemon, blk_guest: str, tmp_path: Path) -> None:
    img = _bench_image(tmp_path / "bench.raw")
    daemon.create("cr", blk_guest, cmdline=f"bench=1 mb={BENCH_MB} rand=256", memory_mib=32,
                  max_restarts=2, restart_window_s=600,
                  disks=[{"path": str(img), "backend": "vhost-user"}])
    g = daemon.start_guest("cr")
    _wait_console(daemon, "cr", b"<")  # the rings run
    n = _ready_count(daemon, "cr")
    _freeze_and_kill(g["backends"][0]["pid"])
    for _ in range(2):  # each restarted back-end is frozen as soon as it is READY (jailed), then killed
        wait_until(lambda n=n: _ready_count(daemon, "cr") > n, 10, 0.002)  # type: ignore[misc]
        n = _ready_count(daemon, "cr")
        _freeze_and_kill(_health_backend(daemon, "cr")["pid"])
    b = wait_until(lambda: (x := _health_backend(daemon, "cr"))["state"] == "failed" and x, 10)
    assert b["restarts"] == 2 and "restart limit reached (2 in 600 s)" in b["last_exit_reason"]
    # The DM's grace period (5 s) plus, under load, back-to-back request timeouts (5 s each) of a re-attach that
    # met a frozen back-end: give it room, and say what happened if it still does not come.
    try:
        h = wait_until(lambda: "needs reset" in ((x := daemon.health_of("cr"))["last_event"] or "") and x, 40)
    except AssertionError:
        events = daemon.json("GET", "/v1/guests/cr/events")
        log = (daemon.state_dir / "guests" / "cr" / "dm.log").read_text()[-3000:]
        raise AssertionError(f"no NEEDS_RESET event; health={daemon.health_of('cr')} events={events} "
                             f"dm.log tail:\n{log}") from None
    assert "vhost-user back-end disconnected and not re-attached within 5 s" in h["last_event"]
    assert h["state"] == "running" and h["dm_pid"] == g["dm_pid"] and is_alive(g["dm_pid"])
    assert b"bench done" not in daemon.console("cr")


@kvm
def test_backend_with_restart_policy_never_is_not_restarted(
        daemon: RealDaemon, uart_guest: str, tmp_path: Path) -> None:
    img = _image(tmp_path / "disk.raw", 4)
    daemon.create("nv", uart_guest, cmdline="timeout=60000", memory_mib=16, restart="never",
                  disks=[{"path": str(img), "backend": "vhost-user"}])
    g = daemon.start_guest("nv")
    os.kill(_backend_child(g["backends"][0]["pid"]), signal.SIGKILL)
    b = wait_until(lambda: (x := _health_backend(daemon, "nv"))["state"] == "failed" and x, 10)
    assert b["restarts"] == 0 and b["pid"] is None
    assert daemon.health_of("nv")["state"] == "running"


# --------------------------------------------------------------------------------- daemon restart


@kvm
def test_restarted_daemon_adopts_running_backends_and_still_restarts_them(
        daemon: RealDaemon, uart_guest: str, tmp_path: Path) -> None:
    img = _image(tmp_path / "disk.raw", 4)
    daemon.create("ad", uart_guest, cmdline="timeout=60000", memory_mib=16,
                  disks=[{"path": str(img), "backend": "vhost-user"}])
    g = daemon.start_guest("ad")
    wait_until(lambda: b"READY" in daemon.console("ad"), 10)
    keeper = g["backends"][0]["pid"]
    daemon.stop()
    assert is_alive(keeper) and is_alive(g["dm_pid"])  # a daemon exit leaves guests and back-ends running
    daemon.start()
    b = _health_backend(daemon, "ad")
    assert b["pid"] == keeper and b["state"] == "running"
    os.kill(_backend_child(keeper), signal.SIGKILL)  # not the new daemon's child: noticed through its pidfd
    b = wait_until(lambda: (x := _health_backend(daemon, "ad"))["restarts"] == 1 and x["state"] == "running"
                   and x, 10)
    # The back-end shows "running" as soon as it is spawned, before the DM has taken it: wait for that event.
    def reattached() -> bool:
        ev = [e["event"] for e in daemon.json("GET", "/v1/guests/ad/events")["events"]]
        return any("re-attached to the DM (no rings resumed)" in e for e in ev)

    wait_until(reattached, 10)
    daemon.json("DELETE", "/v1/guests/ad")
    wait_until(lambda: backend_pids(str(daemon.runtime_dir)) == [], 5)


# --------------------------------------------------------------------------------- net back-end


@kvm
def test_vhost_user_nic_gets_a_net_backend_on_a_daemon_tap_removed_with_the_guest(
        daemon: RealDaemon, uart_guest: str) -> None:
    links0 = _links()
    daemon.create("vn", uart_guest, cmdline="timeout=60000", memory_mib=16, nics=[{"backend": "vhost-user"}])
    g = daemon.start_guest("vn")
    wait_until(lambda: b"READY" in daemon.console("vn"), 10)
    assert g["backends"][0]["kind"] == "net" and g["backends"][0]["state"] == "running"
    assert len(_links() - links0) == 1
    daemon.json("DELETE", "/v1/guests/vn")
    wait_until(lambda: _links() == links0 and backend_pids(str(daemon.runtime_dir)) == [], 5)


# --------------------------------------------------------------------------------- 20-guest leak test


@kvm
def test_20_guests_with_a_vhost_user_disk_each_leak_no_backend_process_socket_or_jail_dir(
        daemon: RealDaemon, blk_guest: str, tmp_path: Path) -> None:
    assert daemon.proc is not None
    dpid = daemon.proc.pid
    img = _image(tmp_path / "disk.raw", 4)
    disk = [{"path": str(img), "backend": "vhost-user"}]
    daemon.create("warm", blk_guest, cmdline="sectors=8", memory_mib=16, disks=disk)
    daemon.start_guest("warm")
    _finished(daemon, "warm")
    daemon.request("DELETE", "/v1/guests/warm")
    fds0, mounts0 = _settled_fds(dpid), _mounts()
    kids0 = set(children(os.getpid()))
    for i in range(20):
        name = f"v{i}"
        daemon.create(name, blk_guest, cmdline="sectors=8", memory_mib=16, disks=disk)
        daemon.start_guest(name)
        out = _finished(daemon, name)
        assert out["last_exit_code"] == 0 and daemon.console(name).endswith(b"virtio_blk: 0 failed\n")
        assert daemon.json("DELETE", f"/v1/guests/{name}") == {"deleted": name}
    wait_until(lambda: backend_pids(str(daemon.runtime_dir)) == [] and daemon.dm_pids() == [], 5)
    assert list((daemon.runtime_dir / "guests").iterdir()) == []  # sockets, pid files, jail dirs
    assert _settled_fds(dpid) == fds0
    assert _mounts() == mounts0
    assert set(children(os.getpid())) - kids0 == set()


# ---------------------------------------------------------------------- definitions (no KVM needed)


def test_vhost_user_disk_path_kinds_choose_managed_or_external_backends(tmp_path: Path) -> None:
    img = _image(tmp_path / "disk.raw", 1)
    sock_path = tmp_path / "ext.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock_path))
    try:
        d = parse_definition({"name": "x", "kernel": "demo", "disks": [
            {"path": str(img)},
            {"path": str(img), "backend": "vhost-user", "read_only": True},
            {"path": str(sock_path), "backend": "vhost-user"}],
            "nics": [{}, {"backend": "vhost-user", "mac": "52:54:00:00:00:07"}]})
        specs = bk.specs_for(d)
    finally:
        s.close()
    assert [(x.device, x.kind, x.managed) for x in specs] == [(0, "blk", True), (1, "blk", False), (2, "net", True)]
    assert specs[0].read_only and specs[2].nic_index == 1 and specs[2].mac == "52:54:00:00:00:07"


def test_backend_argv_is_jailed_under_the_runtime_dir_with_the_given_uid(tmp_path: Path) -> None:
    b = bk.Backend(bk.BackendSpec(3, "blk", True, path="/img", read_only=True, serial="S1"), tmp_path, tmp_path)
    argv = b.argv(["kvmdm-backend"], 205000)
    assert argv == ["kvmdm-backend", "blk", "--socket", str(tmp_path / "bk3.sock"), "--image", "/img",
                    "--readonly", "--serial", "S1", "--jail-root", str(tmp_path / "bk3"), "--uid", "205000",
                    "--gid", "205000"]
    assert b.argv(["x"], None)[-1] == "--no-jail"


def test_backend_that_never_prints_ready_fails_the_start_with_a_clear_message(tmp_path: Path) -> None:
    b = bk.Backend(bk.BackendSpec(0, "blk", True, path="/img"), tmp_path / "r", tmp_path / "s")
    with pytest.raises(bk.BackendStartError, match="did not print READY within 0.5 s"):
        bk.spawn(b, [sys.executable, "-c", "import time; print('starting'); time.sleep(30)"], None, 0.5)
    assert b.popen is not None and b.popen.returncode is not None  # killed and reaped


def test_backend_that_exits_before_ready_fails_the_start_with_its_output(tmp_path: Path) -> None:
    b = bk.Backend(bk.BackendSpec(0, "blk", True, path="/img"), tmp_path / "r", tmp_path / "s")
    with pytest.raises(bk.BackendStartError, match=r"exited with status 1 before READY: .*no such image"):
        bk.spawn(b, [sys.executable, "-c", "import sys; sys.exit('kvmdm-backend: no such image')"], None, 5)


def test_pid_file_round_trips_and_garbage_is_refused(tmp_path: Path) -> None:
    b = bk.Backend(bk.BackendSpec(0, "net", True), tmp_path, tmp_path, tap="kvmdm-x-0", pid=1234, restarts=2)
    bk.write_pid_file(b)
    assert bk.read_pid_file(b) == (1234, 2, "kvmdm-x-0")
    for bad in ("", "1 2", "x 1 -", "1 0 -", "5 -1 -", "5 1 " + "t" * 16):
        b.pid_file.write_text(bad)
        assert bk.read_pid_file(b) is None, bad


def test_is_our_backend_refuses_a_process_that_is_not_this_backend(tmp_path: Path) -> None:
    b = bk.Backend(bk.BackendSpec(0, "blk", True), tmp_path, tmp_path)
    assert not bk.is_our_backend(os.getpid(), b)


# -------------------------------------------------------------------- control: attach_backend fd passing


class _Server:
    """A ControlServer in a thread on a listening socket in ``tmp``; records what fd_handler got."""

    def __init__(self, tmp: Path, with_fd_handler: bool = True) -> None:
        self.path = tmp / "ctl.sock"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.path))
        self.listener.listen(1)
        self.got: list[tuple[int, bytes]] = []
        self.server = ControlServer(self.listener.detach(), lambda c, a: {"pong": True},
                                    self.fd_handler if with_fd_handler else None)
        import threading

        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def fd_handler(self, cmd: str, args: dict[str, Any], fd: int) -> dict[str, Any]:
        s = socket.socket(fileno=fd)
        s.settimeout(2)
        self.got.append((args["device"], s.recv(16)))
        s.close()
        return {"device": args["device"]}

    def close(self) -> None:
        self.server.stop()
        self.thread.join(2)
        self.server.close()


async def _client_request(path: Path, cmd: str, args: dict[str, Any], fd: int | None) -> dict[str, Any]:
    c = await ControlClient.connect(path)
    try:
        return await c.request(cmd, args, timeout=3, fd=fd)
    finally:
        await c.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_attach_backend_carries_a_connected_socket_to_the_dm_handler(tmp_path: Path) -> None:
    srv = _Server(tmp_path)
    a, b = socket.socketpair()
    try:
        a.send(b"hello-backend")
        res = asyncio.run(_client_request(srv.path, "attach_backend", {"device": 2}, b.fileno()))
        assert res == {"device": 2}
        assert srv.got == [(2, b"hello-backend")]  # the handler read from the very socket we passed
    finally:
        a.close()
        b.close()
        srv.close()


@pytest.mark.parametrize("kind", ["pipe", "dgram", "tcp"])
def test_attach_backend_refuses_an_fd_that_is_not_a_unix_stream_socket(tmp_path: Path, kind: str) -> None:
    srv = _Server(tmp_path)
    if kind == "pipe":
        r, w = os.pipe()
        fds = [r, w]
        fd = r
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if kind == "dgram" else socket.socket()
        fds = [s.detach()]
        fd = fds[0]
    n0 = _open_fds()
    try:
        with pytest.raises(ControlError, match="not a socket" if kind == "pipe" else "not a unix stream socket"):
            asyncio.run(_client_request(srv.path, "attach_backend", {"device": 0}, fd))
        assert srv.got == []
        wait_until(lambda: _open_fds() <= n0, 2)  # the DM side closed the refused fd
    finally:
        for x in fds:
            os.close(x)
        srv.close()


def _raw_request(path: Path, line: bytes, fds: list[int]) -> bytes:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(3)
    c.connect(str(path))
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    c.sendmsg([line], anc)
    data = b""
    while not data.endswith(b"\n"):
        data += c.recv(4096)
    c.close()
    return data


@pytest.mark.parametrize("nfds, expected", [(0, "got 0"), (2, "got 2")])
def test_attach_backend_needs_exactly_one_fd(tmp_path: Path, nfds: int, expected: str) -> None:
    srv = _Server(tmp_path)
    pairs = [socket.socketpair() for _ in range(nfds)]
    try:
        n0 = _open_fds()
        out = _raw_request(srv.path, b'{"id":1,"cmd":"attach_backend","args":{"device":0}}\n',
                           [p[0].fileno() for p in pairs])
        assert b'"ok":false' in out and f"expected exactly one fd with the request, {expected}".encode() in out
        assert srv.got == []
        wait_until(lambda: _open_fds() <= n0, 2)
    finally:
        for p in pairs:
            p[0].close()
            p[1].close()
        srv.close()


def test_attach_backend_is_refused_by_a_dm_without_an_fd_handler(tmp_path: Path) -> None:
    srv = _Server(tmp_path, with_fd_handler=False)
    a, b = socket.socketpair()
    try:
        with pytest.raises(ControlError, match="not supported"):
            asyncio.run(_client_request(srv.path, "attach_backend", {"device": 0}, b.fileno()))
    finally:
        a.close()
        b.close()
        srv.close()


def test_an_fd_goes_with_attach_backend_only(tmp_path: Path) -> None:
    srv = _Server(tmp_path)
    try:
        with pytest.raises(LocalProtocolError):
            asyncio.run(_client_request(srv.path, "attach_backend", {"device": 0}, None))
        with pytest.raises(LocalProtocolError):
            asyncio.run(_client_request(srv.path, "ping", {}, 0))
    finally:
        srv.close()


@pytest.mark.parametrize("args", [{}, {"device": -1}, {"device": 64}, {"device": "0"}, {"device": True},
                                  {"device": 0, "x": 1}])
def test_attach_backend_args_are_validated(args: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError):
        validate_request({"id": 1, "cmd": "attach_backend", "args": args})
