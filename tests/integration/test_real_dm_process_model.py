"""The process model end to end with the REAL device model: kvmdmd spawns ``python -m daemon.dm`` jailed (the
default dm_command), the DM builds a KVM VM and runs a real guest.

Guests: ``demo`` (prints 4 lines, powers off), ``loop`` with ``loops=2000000000`` (port-I/O exits at CPL3 for
minutes: its exit counter proves the vCPU runs), ``uart_irq`` (prints READY, echoes console input; waits without
CPU), ``triple`` (triple fault -> KVM_EXIT_SHUTDOWN -> DM exit 4).

Process tree of a jailed guest (daemon/jail.py step 10) with kvmdmd's default ``--dm-spawn zygote``: kvmdmd ->
zygote -> DM (/health's dm_pid, born pid 1 of its own pid namespace: no keeper); with an exec'd DM (``--dm-spawn
exec``): kvmdmd -> keeper (the pid the daemon spawned, /health's dm_pid) -> DM (pid 1 of its pid namespace, the
process that runs the VM). The tests below call both the dm_pid "keeper" and find the DM with :func:`jailed_dm`,
which is the same process without a keeper.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "daemon"))

from kvmdmd_harness import Daemon, pids_with_cmdline, reap, wait_until  # noqa: E402

from guests.build import build_guest  # noqa: E402

pytestmark = [pytest.mark.kvm, pytest.mark.root, pytest.mark.timeout(180)]

DEMO_BANNER = b"kvmdm demo guest: hello from CPL3"
LONG_LOOP = "loops=2000000000"


class RealDaemon(Daemon):
    """kvmdmd with its default dm_command (the real, jailed DM); DMs are found by the runtime dir in their argv
    (``--jail-root <runtime>/guests/<name>/root``), which is unique per test."""

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "daemon.server", "--state-dir", str(self.state_dir), "--runtime-dir",
                str(self.runtime_dir), "--log-level", "DEBUG", *self.extra]

    def dm_pids(self) -> list[int]:
        """Keepers and DMs (both carry the DM argv: the DM is a fork of the keeper)."""
        return dm_processes(str(self.runtime_dir))

    def create(self, name: str, kernel: str, **kw: Any) -> dict[str, Any]:
        return self.json("POST", "/v1/guests", {"name": name, "kernel": kernel, **kw}, expect=201)

    def start_guest(self, name: str) -> dict[str, Any]:
        return self.json("POST", f"/v1/guests/{name}/start")

    def console(self, name: str) -> bytes:
        return self.request("GET", f"/v1/guests/{name}/console")[2]

    def exits(self, name: str) -> int:
        return sum(self.json("GET", f"/v1/guests/{name}/stats")["exits"].values())

    def health_of(self, name: str) -> dict[str, Any]:
        return next(g for g in self.json("GET", "/health")["guests"] if g["name"] == name)


def dm_processes(marker: str) -> list[int]:
    return pids_with_cmdline(b"daemon.dm", b"--control-fd", marker.encode())


def children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            kids += [int(x) for x in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
    except OSError:
        pass
    return kids


def jailed_dm(keeper: int) -> int:
    """The DM proper: ``keeper`` itself when it is pid 1 of a pid namespace already (a zygote-forked DM has no
    keeper), else the keeper's only child (waits for the fork of enter_jail)."""
    if proc_status(keeper)["NSpid"].split()[1:] == ["1"]:
        return keeper
    kids = wait_until(lambda: children(keeper), 5.0)
    assert len(kids) == 1, kids
    return kids[0]


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def is_alive(pid: int) -> bool:
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return st.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def elves() -> dict[str, str]:
    return {n: str(build_guest(n)) for n in ("loop", "uart_irq", "triple")}


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[RealDaemon]:
    d = RealDaemon(tmp_path).start()
    yield d
    d.cleanup()


def _growing(d: RealDaemon, name: str, within: float = 3.0) -> bool:
    a = d.exits(name)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        time.sleep(0.1)
        if d.exits(name) > a:
            return True
    return False


# ------------------------------------------------------------------------------------------------ basic run


def test_demo_guest_prints_its_banner_and_health_reports_powered_off(daemon: RealDaemon) -> None:
    daemon.create("demo", "demo")
    g = daemon.start_guest("demo")
    assert g["dm_pid"] is not None
    wait_until(lambda: daemon.guest("demo")["state"] == "stopped", 10)
    out = daemon.console("demo")
    assert out.startswith(DEMO_BANNER + b"\n") and out.endswith(b"bye\n"), out
    assert len(out.splitlines()) == 4
    h = daemon.health_of("demo")
    assert h["state"] == "stopped" and h["last_exit_code"] == 0
    assert "powered off" in h["last_exit_reason"]
    assert h["restarts"] == 0  # on-failure (default) does not restart a clean power-off
    assert daemon.dm_pids() == []


def test_dm_runs_jailed_unprivileged_without_caps_with_nnp_and_seccomp(daemon: RealDaemon,
                                                                        elves: dict[str, str]) -> None:
    daemon.create("j", elves["loop"], cmdline=LONG_LOOP, memory_mib=16)
    keeper = daemon.start_guest("j")["dm_pid"]
    dm = jailed_dm(keeper)
    assert _growing(daemon, "j")  # the jailed child is really running the guest
    st = proc_status(dm)
    uid = daemon.guest("j")["uid"]
    assert uid not in (None, 0)
    assert st["Uid"].split() == [str(uid)] * 4 and st["Gid"].split() == [str(uid)] * 4
    assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0 and int(st["CapBnd"], 16) == 0
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"  # SECCOMP_MODE_FILTER
    assert st["NSpid"].split()[-1] == "1"  # pid 1 of its own pid namespace
    for ns in ("mnt", "net", "pid", "ipc", "uts"):
        assert os.readlink(f"/proc/{dm}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    # The keeper is unprivileged and filtered too: killing the whole jail needs no special rights.
    kst = proc_status(keeper)
    assert int(kst["CapEff"], 16) == 0 and kst["Seccomp"] == "2" and kst["NoNewPrivs"] == "1"


# ---------------------------------------------------------------------------------------- control of a live DM


def test_pause_freezes_the_exit_counter_and_resume_unfreezes_it(daemon: RealDaemon, elves: dict[str, str]) -> None:
    daemon.create("p", elves["loop"], cmdline=LONG_LOOP, memory_mib=16)
    daemon.start_guest("p")
    assert _growing(daemon, "p")
    assert daemon.json("POST", "/v1/guests/p/pause")["state"] == "paused"
    a = daemon.exits("p")
    time.sleep(0.5)
    assert daemon.exits("p") == a
    assert daemon.json("GET", "/v1/guests/p/stats")["state"] == "paused"
    assert daemon.json("POST", "/v1/guests/p/resume")["state"] == "running"
    assert _growing(daemon, "p")
    # pausing twice is refused by the daemon's state machine (409), not forwarded
    daemon.json("POST", "/v1/guests/p/pause")
    assert daemon.request("POST", "/v1/guests/p/pause")[0] == 409


def test_console_input_reaches_the_uart_guest_and_is_echoed(daemon: RealDaemon, elves: dict[str, str]) -> None:
    daemon.create("u", elves["uart_irq"], cmdline="timeout=60000", memory_mib=16)
    daemon.start_guest("u")
    wait_until(lambda: b"READY" in daemon.console("u"), 10)
    assert daemon.json("POST", "/v1/guests/u/console", {"text": "hello kvmdm\n"}) == {"written": 12}
    wait_until(lambda: b"hello kvmdm" in daemon.console("u").split(b"READY", 1)[1], 5)
    daemon.json("POST", "/v1/guests/u/console", {"text": "quit\n"})
    wait_until(lambda: daemon.guest("u")["state"] == "stopped", 10)
    out = daemon.console("u")
    assert b"IRQS tx=ok rx=ok" in out, out
    assert daemon.guest("u")["last_exit_code"] == 0


def test_stop_makes_the_dm_exit_0_within_a_few_seconds(daemon: RealDaemon, elves: dict[str, str]) -> None:
    daemon.create("s", elves["loop"], cmdline=LONG_LOOP, memory_mib=16)
    keeper = daemon.start_guest("s")["dm_pid"]
    dm = jailed_dm(keeper)
    assert _growing(daemon, "s")
    t0 = time.monotonic()
    g = daemon.json("POST", "/v1/guests/s/stop")
    assert time.monotonic() - t0 < 3.0
    assert g["state"] == "stopped" and g["last_exit_code"] == 0, g
    assert "SIGKILL" not in str(daemon.json("GET", "/v1/guests/s/events"))  # graceful, not the kill fallback
    wait_until(lambda: not is_alive(dm) and not is_alive(keeper), 2)
    assert daemon.dm_pids() == []


def test_reset_makes_the_dm_exit_3_and_the_daemon_respawns_it(daemon: RealDaemon) -> None:
    # The demo powers off after ~0.3 s; "always" keeps the test from racing that: a reset or a power-off
    # both bring it back, and only the reset sets last_exit_code 3.
    daemon.create("r", "demo", restart="always", max_restarts=100)
    daemon.start_guest("r")
    code = None
    for _ in range(20):
        st, _, _ = daemon.request("POST", "/v1/guests/r/reset")
        if st == 200:
            code = wait_until(lambda: (c := daemon.guest("r")["last_exit_code"]) is not None and
                              daemon.guest("r")["restarts"] > 0 and [c], 5)[0]
            if code == 3:
                break
        time.sleep(0.05)
    assert code == 3, "no reset hit a running demo in 20 attempts"
    assert "reset" in daemon.guest("r")["last_exit_reason"]
    wait_until(lambda: DEMO_BANNER in daemon.console("r"), 5)  # the re-spawned guest booted again


def test_reset_of_a_long_guest_reboots_it_and_its_console_shows_the_banner_again(
        daemon: RealDaemon, elves: dict[str, str]) -> None:
    daemon.create("r2", elves["uart_irq"], cmdline="timeout=60000", memory_mib=16)
    keeper = daemon.start_guest("r2")["dm_pid"]
    wait_until(lambda: b"READY" in daemon.console("r2"), 10)
    daemon.json("POST", "/v1/guests/r2/reset")
    g = wait_until(lambda: (x := daemon.guest("r2"))["restarts"] == 1 and x["state"] == "running" and x, 5)
    assert g["last_exit_code"] == 3 and g["dm_pid"] != keeper  # a reset is not a failure, yet on-failure re-spawns
    # A reset reboots the same machine: the second boot continues the console log (issue 10), as QEMU's does.
    wait_until(lambda: daemon.console("r2").count(b"READY") == 2, 10)
    assert not (daemon.state_dir / "guests" / "r2" / "console.log.1").exists()


# ------------------------------------------------------------------------------------------------- crashes


@pytest.mark.parametrize("target", ["dm", "keeper"])
@pytest.mark.parametrize("policy", ["on-failure", "always", "never"])
def test_kill_9_of_a_running_dm_is_detected_within_1s_and_handled_per_policy(
        daemon: RealDaemon, elves: dict[str, str], target: str, policy: str) -> None:
    daemon.create("k", elves["uart_irq"], cmdline="timeout=60000", memory_mib=16, restart=policy)
    keeper = daemon.start_guest("k")["dm_pid"]
    dm = jailed_dm(keeper)
    wait_until(lambda: b"READY" in daemon.console("k"), 10)
    t0 = time.monotonic()
    os.kill(dm if target == "dm" else keeper, signal.SIGKILL)
    g = wait_until(lambda: (x := daemon.guest("k"))["last_exit_reason"] and x, 1.0, 0.01)
    assert time.monotonic() - t0 < 1.0
    # The keeper re-raises the DM's fatal signal on itself; without a keeper the zygote reaps the DM's own.
    assert "SIGKILL" in g["last_exit_reason"], g
    wait_until(lambda: not is_alive(dm) and not is_alive(keeper), 2)  # PDEATHSIG takes the DM with the keeper
    if policy == "never":
        time.sleep(0.6)  # longer than the first restart backoff
        h = daemon.health_of("k")
        assert h["state"] == "crashed" and h["restarts"] == 0 and h["dm_pid"] is None
        assert daemon.dm_pids() == []
        metrics = daemon.request("GET", "/metrics")[2].decode()
        assert 'kvmdm_guest_state{guest="k",state="crashed"} 1' in metrics
        return
    g = wait_until(lambda: (x := daemon.guest("k"))["state"] == "running" and x["dm_pid"] != keeper and x, 5)
    h = daemon.health_of("k")
    assert h["restarts"] == 1 and "SIGKILL" in h["last_exit_reason"]
    metrics = daemon.request("GET", "/metrics")[2].decode()
    assert 'kvmdm_guest_restarts_total{guest="k"} 1' in metrics
    wait_until(lambda: b"READY" in daemon.console("k"), 10)  # the new DM booted the guest again
    assert daemon.json("GET", "/health")["status"] == "ok"


@pytest.mark.parametrize("policy, restarted", [("never", False), ("on-failure", True)])
def test_triple_fault_is_dm_exit_4_crashed_with_a_reason_and_restarted_per_policy(
        daemon: RealDaemon, elves: dict[str, str], policy: str, restarted: bool) -> None:
    daemon.create("t", elves["triple"], memory_mib=16, restart=policy, max_restarts=1)
    daemon.start_guest("t")
    g = wait_until(lambda: (x := daemon.guest("t"))["last_exit_code"] == 4 and x, 10)
    assert "crash" in g["last_exit_reason"]
    events = str(daemon.json("GET", "/v1/guests/t/events"))
    assert "exit 4" in events
    if restarted:
        # it triple-faults again after the restart; max_restarts=1 then gives up
        g = wait_until(lambda: (x := daemon.guest("t"))["state"] == "failed" and x, 10)
        assert g["restarts"] == 1 and "restart limit" in g["last_exit_reason"]
    else:
        time.sleep(0.5)
        g = daemon.guest("t")
        assert g["state"] == "crashed" and g["restarts"] == 0
    assert b"tripling" in daemon.console("t")


# ------------------------------------------------------------------------------------------ daemon restart


def test_daemon_restart_leaves_the_guest_running_and_the_new_daemon_controls_it(
        daemon: RealDaemon, elves: dict[str, str]) -> None:
    daemon.create("dr", elves["loop"], cmdline=LONG_LOOP, memory_mib=16)
    keeper = daemon.start_guest("dr")["dm_pid"]
    dm = jailed_dm(keeper)
    assert _growing(daemon, "dr")
    assert daemon.stop(signal.SIGTERM) == 0
    # No daemon now: the DM must keep running the guest on its own.
    t = proc_status(dm)
    time.sleep(0.3)
    assert is_alive(keeper) and is_alive(dm) and proc_status(dm)["voluntary_ctxt_switches"] != \
        t["voluntary_ctxt_switches"]
    daemon.start()
    g = daemon.guest("dr")
    assert g["state"] == "running" and g["dm_pid"] == keeper
    assert _growing(daemon, "dr")
    assert daemon.json("POST", "/v1/guests/dr/pause")["state"] == "paused"
    a = daemon.exits("dr")
    time.sleep(0.3)
    assert daemon.exits("dr") == a
    daemon.json("POST", "/v1/guests/dr/resume")
    assert _growing(daemon, "dr")
    g = daemon.json("POST", "/v1/guests/dr/stop")
    assert g["state"] == "stopped", g
    # not our child any more: the reason comes from the DM's last state event
    assert "stopped" in g["last_exit_reason"], g
    wait_until(lambda: not is_alive(keeper) and not is_alive(dm), 3)
    reap([keeper])  # re-parented to the test process (child subreaper)
    assert daemon.dm_pids() == []


# ------------------------------------------------------------------------------------------------ leaks


def _mounts() -> list[str]:
    return sorted(line.split(" ", 4)[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())


def _links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def _fds(pid: int) -> dict[str, str]:
    out = {}
    for f in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[f] = os.readlink(f"/proc/{pid}/fd/{f}")
        except OSError:
            pass  # closed between listdir and readlink
    return out


def _settled_fds(pid: int) -> dict[str, str]:
    """The daemon's fds once the HTTP connection of the last request is gone (its close is asynchronous)."""
    prev: dict[str, str] = {}
    for _ in range(50):
        time.sleep(0.1)
        cur = _fds(pid)
        if cur == prev:
            return cur
        prev = cur
    return prev


@pytest.mark.parametrize("nics", [[], [{}]], ids=["no-nic", "tap-nic"])
def test_20_real_guests_created_run_and_destroyed_leak_nothing(daemon: RealDaemon, nics: list[Any]) -> None:
    assert daemon.proc is not None
    dpid = daemon.proc.pid
    # Warm up once: the daemon's first start imports and opens things that stay (log file, kernel cache).
    daemon.create("warm", "demo")
    daemon.start_guest("warm")
    wait_until(lambda: daemon.guest("warm")["state"] == "stopped", 10)
    daemon.request("DELETE", "/v1/guests/warm")
    fds0 = _settled_fds(dpid)
    mounts0, links0 = _mounts(), _links()
    threads0 = len(os.listdir(f"/proc/{dpid}/task"))
    kids0 = set(children(os.getpid()))
    for i in range(20):
        name = f"g{i}"
        daemon.create(name, "demo", nics=nics)
        daemon.start_guest(name)
        wait_until(lambda n=name: daemon.guest(n)["state"] == "stopped", 10)  # type: ignore[misc]
        assert daemon.guest(name)["last_exit_code"] == 0
        assert DEMO_BANNER in daemon.console(name)
        assert daemon.json("DELETE", f"/v1/guests/{name}") == {"deleted": name}
    assert daemon.dm_pids() == []
    assert _settled_fds(dpid) == fds0
    assert len(os.listdir(f"/proc/{dpid}/task")) <= threads0 + 1  # asyncio.to_thread's pool may grow by one
    assert list((daemon.runtime_dir / "guests").iterdir()) == []
    assert sorted(p.name for p in daemon.runtime_dir.iterdir()) == ["guests", "kvmdmd.sock"]
    assert list((daemon.state_dir / "guests").iterdir()) == []
    assert _mounts() == mounts0
    assert _links() == links0
    # keepers/DMs orphaned by the daemon would be re-parented to us (child subreaper): none were
    assert set(children(os.getpid())) - kids0 == set(), [Path(f"/proc/{p}/cmdline").read_bytes()
                                                         for p in set(children(os.getpid())) - kids0]


# ------------------------------------------------------------------------------------- what the DM loads

WEB_FRAMEWORKS = ("aiohttp", "multidict", "yarl", "frozenlist", "aiosignal", "fastapi", "starlette", "uvicorn",
                  "httpx", "http.server", "asyncio")


def test_dm_module_set_has_no_web_framework_nor_asyncio() -> None:
    """What the DM imports before its jail (daemon.dm, then daemon.jail lazily in _enter_jail): no web
    framework and no event loop, which belong to the daemon (issue #3: "no web framework imported in the DM")."""
    code = ("import sys, daemon.dm, daemon.jail; "
            "print('\\n'.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], check=True,
                         capture_output=True, text=True).stdout.split()
    assert "daemon.dm" in out and "daemon.vmm" in out  # the probe really loaded the DM
    bad = [m for m in out if m.split(".")[0] in WEB_FRAMEWORKS or m in WEB_FRAMEWORKS]
    assert bad == []
    assert "daemon.api" not in out and "daemon.supervisor" not in out and "daemon.server" not in out


def test_running_jailed_dm_maps_no_web_framework_and_reports_its_module_count(
        daemon: RealDaemon, elves: dict[str, str]) -> None:
    daemon.create("m", elves["uart_irq"], cmdline="timeout=60000", memory_mib=16)
    dm = jailed_dm(daemon.start_guest("m")["dm_pid"])
    wait_until(lambda: b"READY" in daemon.console("m"), 10)
    maps = Path(f"/proc/{dm}/maps").read_text()
    assert "libpython" in maps or "/python" in maps  # the probe reads the right process
    assert [w for w in WEB_FRAMEWORKS if f"/{w}/" in maps] == []
    log = (daemon.state_dir / "guests" / "m" / "dm.log").read_text()
    assert "startup timeline" in log
    modules = int(log.rsplit("modules=", 1)[1].split()[0])
    assert 50 < modules < 400, modules


def test_guest_with_a_disk_starts_jailed_because_virtio_is_imported_before_the_jail(
        daemon: RealDaemon, tmp_path: Path) -> None:
    """The DM imports the virtio modules only for guests with virtio devices (startup time): they must still
    be imported before the jail, where importing fails (empty root, open denied)."""
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\0" * (1 << 20))
    daemon.create("dk", "demo", disks=[{"path": str(disk)}])
    daemon.start_guest("dk")
    g = wait_until(lambda: (x := daemon.guest("dk"))["state"] in ("stopped", "crashed", "failed") and x, 10)
    assert g["last_exit_code"] == 0, (g, (daemon.state_dir / "guests" / "dk" / "dm.log").read_text())
    assert DEMO_BANNER in daemon.console("dk")
    assert "pv.blk" not in (daemon.state_dir / "guests" / "dk" / "dm.log").read_text()


def test_a_running_guests_tap_exists_and_is_gone_after_destroy(daemon: RealDaemon, elves: dict[str, str]) -> None:
    links0 = _links()
    daemon.create("n", elves["uart_irq"], cmdline="timeout=60000", memory_mib=16, nics=[{}])
    daemon.start_guest("n")
    wait_until(lambda: b"READY" in daemon.console("n"), 10)
    assert len(_links() - links0) == 1  # the daemon made a tap and handed it to the jailed DM
    daemon.json("DELETE", "/v1/guests/n")
    wait_until(lambda: _links() == links0, 3)
