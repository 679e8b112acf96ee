"""DMs forked by the zygote (kvmdmd's default ``--dm-spawn zygote``, daemon.zygote) against DMs exec'd as before
(``--dm-spawn exec``), with the real, jailed device model: a forked DM must be indistinguishable from an exec'd
one from the outside (fds, jail, identity, command line), share nothing with its siblings, survive the zygote's
death, and the zygote must come back for the next guest.

Process trees: with the zygote kvmdmd -> zygote -> DM (the guest's dm_pid; the zygote forks it as pid 1 of a new
pid namespace, so its jail forks no keeper: daemon/jail.py step 10); exec'd, kvmdmd -> keeper (the guest's dm_pid)
-> DM (pid 1 of its namespace).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "daemon"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvmdmd_harness import reap, wait_until  # noqa: E402
from test_real_dm_process_model import (  # noqa: E402
    DEMO_BANNER,
    RealDaemon,
    _fds,
    _links,
    _mounts,
    _settled_fds,
    children,
    is_alive,
    jailed_dm,
    proc_status,
)

from daemon.net import tap_name  # noqa: E402
from guests.build import build_guest  # noqa: E402

pytestmark = [pytest.mark.kvm, pytest.mark.root, pytest.mark.timeout(240)]


class ModeDaemon(RealDaemon):
    mode = "zygote"

    def argv(self) -> list[str]:
        return [*super().argv(), "--dm-spawn", self.mode]

    def zygotes(self) -> list[int]:
        assert self.proc is not None
        return [p for p in children(self.proc.pid) if b"daemon.zygote" in Path(f"/proc/{p}/cmdline").read_bytes()]

    def zygote(self) -> int:
        z = wait_until(self.zygotes, 30)
        assert len(z) == 1, z
        return int(z[0])


@pytest.fixture(scope="module")
def uart() -> str:
    return str(build_guest("uart_irq"))


def _daemon(tmp: Path, mode: str) -> ModeDaemon:
    tmp.mkdir(exist_ok=True)
    d = ModeDaemon(tmp)
    d.mode = mode
    return d.start()


@pytest.fixture
def zdaemon(tmp_path: Path) -> Iterator[ModeDaemon]:
    d = _daemon(tmp_path / "z", "zygote")
    yield d
    d.cleanup()


def _start_uart(d: ModeDaemon, name: str, uart: str) -> tuple[int, int]:
    """(the guest's dm_pid, the DM): the same process with the zygote, the keeper and its child exec'd."""
    d.create(name, uart, cmdline="timeout=120000", memory_mib=16)
    keeper = d.start_guest(name)["dm_pid"]
    dm = jailed_dm(keeper)
    wait_until(lambda: b"READY" in d.console(name), 10)
    return keeper, dm


def _kinds(pid: int, tmp: Path) -> list[str]:
    """What a process's fds are, without what differs from run to run (inodes, fd numbers, the temp dir)."""
    return sorted(re.sub(r"\[\d+\]", "[]", link).replace(str(tmp), "TMP") for link in _fds(pid).values())


def _identity(pid: int, tmp: Path) -> dict[str, Any]:
    st = proc_status(pid)
    keys = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp", "Uid", "Gid", "Groups",
            "Threads")
    out: dict[str, Any] = {k: st[k] for k in keys}
    out["Uid"] = len(set(out["Uid"].split()))  # one id in all four fields (its value differs per guest)
    out["Gid"] = len(set(out["Gid"].split()))
    out["NSpid depth"] = len(st["NSpid"].split())
    out["argv"] = ["N" if a.isdigit() else a.replace(str(tmp), "TMP")
                   for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0") if a]
    return out


def test_a_forked_dm_looks_exactly_like_an_execd_one_fds_jail_identity_and_command_line(
        tmp_path: Path, uart: str) -> None:
    seen: dict[str, Any] = {}
    for mode in ("exec", "zygote"):
        d = _daemon(tmp_path / mode, mode)
        try:
            keeper, dm = _start_uart(d, "same", uart)
            if mode == "zygote":
                # No keeper: the pid the daemon holds is the DM, pid 1 of its namespace, the zygote's child.
                assert dm == keeper and children(dm) == [] and proc_status(dm)["NSpid"].split() == [str(dm), "1"]
                assert int(proc_status(dm)["PPid"]) == d.zygote()
            else:
                assert d.proc is not None and int(proc_status(keeper)["PPid"]) == d.proc.pid
                assert dm != keeper and proc_status(keeper)["NSpid"].split() == [str(keeper)]
                assert _identity(keeper, d.tmp)["argv"] == _identity(dm, d.tmp)["argv"]
            tmp = d.tmp
            seen[mode] = {"dm fds": _kinds(dm, tmp), "dm": _identity(dm, tmp)}
            argv = seen[mode]["dm"]["argv"]
            assert argv[:3] == [sys.executable, "-m", "daemon.dm"] and "--control-fd" in argv, argv
            assert "TMP/run/guests/same/root" in argv, argv
        finally:
            d.cleanup()
    assert seen["zygote"] == seen["exec"]
    assert seen["zygote"]["dm"]["CapEff"] == "0000000000000000" and seen["zygote"]["dm"]["Seccomp"] == "2"


def test_two_forked_dms_share_no_namespace_no_uid_and_nothing_with_the_zygote(zdaemon: ModeDaemon, uart: str) -> None:
    _ka, a = _start_uart(zdaemon, "a", uart)
    _kb, b = _start_uart(zdaemon, "b", uart)
    z = zdaemon.zygote()
    for ns in ("mnt", "net", "ipc", "uts", "pid", "cgroup"):
        links = {p: os.readlink(f"/proc/{p}/ns/{ns}") for p in (a, b, z)}
        assert len(set(links.values())) == 3, (ns, links)
    # Each DM is pid 1 of a namespace the zygote made for it before the fork; the zygote's own next children go
    # into its own namespace again (the daemon's), never into a DM's.
    assert a == _ka and b == _kb
    assert os.readlink(f"/proc/{z}/ns/pid_for_children") == os.readlink(f"/proc/{z}/ns/pid") \
        == os.readlink("/proc/self/ns/pid")
    assert proc_status(a)["Uid"] != proc_status(b)["Uid"]
    # The zygote holds nothing of either guest: no guest RAM, no KVM fd, no control socket.
    zfds = _fds(z).values()
    assert not [f for f in zfds if f == "/dev/kvm" or "anon_inode:kvm" in f or "memfd" in f or "control.sock" in f
                or "/dev/net/tun" in f], zfds
    zmaps = Path(f"/proc/{z}/maps").read_text()
    assert "kvmdm-guest-ram" not in zmaps and "kvm-vcpu" not in zmaps
    assert proc_status(z)["Threads"] == "1"


def test_a_killed_zygote_is_restarted_the_next_guest_starts_and_running_guests_live_on(
        zdaemon: ModeDaemon, uart: str) -> None:
    keeper, dm = _start_uart(zdaemon, "before", uart)
    z0 = zdaemon.zygote()
    os.kill(z0, signal.SIGKILL)
    wait_until(lambda: not is_alive(z0), 5)
    # The guest that was running goes on (re-parented: to us, the tests' child subreaper).
    assert is_alive(keeper) and is_alive(dm)
    zdaemon.json("POST", "/v1/guests/before/console", {"text": "ping\n"})
    wait_until(lambda: b"ping" in zdaemon.console("before").split(b"READY", 1)[1], 5)
    # The next guest starts, from a new zygote.
    zdaemon.create("after", "demo")
    zdaemon.start_guest("after")
    wait_until(lambda: zdaemon.guest("after")["state"] == "stopped", 15)
    g = zdaemon.guest("after")
    assert g["last_exit_code"] == 0 and DEMO_BANNER in zdaemon.console("after"), g
    z1 = zdaemon.zygote()
    assert z1 != z0
    # The orphaned guest's exit is still noticed; only its status is unknown (nobody left to report it).
    g = zdaemon.json("POST", "/v1/guests/before/stop")
    assert g["state"] == "stopped" and "exit status unknown" in g["last_exit_reason"], g
    wait_until(lambda: not is_alive(keeper), 5)
    reap([keeper])
    assert zdaemon.dm_pids() == []


def test_churn_of_12_forked_guests_leaks_no_fd_process_mount_or_tap(zdaemon: ModeDaemon) -> None:
    assert zdaemon.proc is not None
    dpid = zdaemon.proc.pid
    zdaemon.create("warm", "demo")
    zdaemon.start_guest("warm")
    wait_until(lambda: zdaemon.guest("warm")["state"] == "stopped", 10)
    zdaemon.request("DELETE", "/v1/guests/warm")
    z = zdaemon.zygote()
    fds0, zfds0 = _settled_fds(dpid), _fds(z)
    mounts0, links0 = _mounts(), _links()
    kids0 = set(children(os.getpid()))
    for i in range(12):
        name = f"c{i}"
        zdaemon.create(name, "demo", nics=[{}] if i % 2 else [])
        zdaemon.start_guest(name)
        wait_until(lambda n=name: zdaemon.guest(n)["state"] == "stopped", 10)  # type: ignore[misc]
        g = zdaemon.guest(name)
        assert g["last_exit_code"] == 0 and "powered off" in g["last_exit_reason"], g  # the zygote's report
        assert zdaemon.json("DELETE", f"/v1/guests/{name}") == {"deleted": name}
    time.sleep(0.2)
    assert zdaemon.zygote() == z
    assert children(z) == []  # every DM reaped by the zygote
    assert _fds(z) == zfds0  # the zygote kept no guest's fd
    assert _settled_fds(dpid) == fds0
    assert zdaemon.dm_pids() == []
    # Other tests on this host add and remove mounts and links meanwhile: compare ours (the jail roots live under
    # tmp_path; taps are named after the guests, daemon.net.tap_name).
    assert [m for m in _mounts() if str(zdaemon.tmp) in m] == [m for m in mounts0 if str(zdaemon.tmp) in m] == []
    ours = {tap_name(f"c{i}", 0) for i in range(12)}
    assert _links() & ours == links0 & ours == set()
    assert list((zdaemon.runtime_dir / "guests").iterdir()) == []
    assert set(children(os.getpid())) - kids0 == set()  # nothing orphaned to us
