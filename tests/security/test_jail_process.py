"""The jailed process's life cycle: the pid-namespace keeper, exit statuses, signals, cgroup placement.

In the ``zygote`` spawn mode (conftest.py) the zygote forks the child as pid 1 of a new pid namespace and the
jail forks no keeper (daemon/jail.py step 10, ``pid_ns_ready``): the spawned pid is the jailed process itself,
and every test here that signals or waits for the spawned pid checks what the keeper gave holds without one."""

from __future__ import annotations

import ctypes
import faulthandler
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon import keeper
from daemon.jail import KEEPER_WAITS, JailConfig, run_jailed, spawn_jailed

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("spawn_mode")]  # fork and zygote (conftest.py)

Make = Callable[..., JailConfig]
UNIFIED = Path("/sys/fs/cgroup/unified")


@pytest.fixture(params=["program", "python"])
def keeper_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, spawn_mode: str) -> str:
    """The keeper as daemon/keeper.c's program (the default) and as the Python fallback (jail._keeper); "none"
    for a child the zygote forked into its own pid namespace, which has no keeper (run once, not per kind)."""
    if spawn_mode == "zygote":
        if request.param == "python":
            pytest.skip("a zygote-forked jail has no keeper: its one run is the [zygote-program] one")
        return "none"
    if request.param == "python":
        monkeypatch.setenv("KVMDM_PYTHON_KEEPER", "1")
    else:
        monkeypatch.delenv("KVMDM_PYTHON_KEEPER", raising=False)
        if keeper.program(KEEPER_WAITS) is None:
            pytest.fail("daemon/keeper.c does not build here (see the warning in the log)")
    return str(request.param)


def _read(fd: int, timeout: float = 10.0) -> bytes:
    if not select.select([fd], [], [], timeout)[0]:
        raise TimeoutError("jailed child never signalled")
    return os.read(fd, 64)


def _gone_or_zombie(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("pid_ns", [True, False])
def test_exit_code_of_the_jailed_process_reaches_the_spawner(make_config: Make, pid_ns: bool,
                                                             keeper_kind: str) -> None:
    r = run_jailed(lambda: os._exit(7), make_config(pid_ns=pid_ns))
    assert (r.exit_code, r.term_signal, r.error_type) == (7, None, "NoResult")


def test_the_keeper_is_its_small_program_undumpable_and_holding_only_its_pipe(make_config: Make,
                                                                              keeper_kind: str) -> None:
    if keeper_kind == "none":
        pytest.skip("no keeper: test_a_zygote_forked_jailed_process_is_itself_the_spawned_pid covers this mode")
    ready_r, ready_w = os.pipe()

    def fn() -> None:
        os.write(ready_w, b"r")
        time.sleep(60)

    proc = spawn_jailed(fn, make_config(keep_fds=[ready_w]))
    try:
        assert _read(ready_r) == b"r"
        kp = proc.pid
        status = dict(line.split(":", 1) for line in Path(f"/proc/{kp}/status").read_text().splitlines())
        uid = int(status["Uid"].split()[0])
        assert uid != 0 and status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"
        assert int(status["CapEff"], 16) == 0 and status["Threads"].strip() == "1"
        # Not dumpable (exec made it dumpable again; the program undoes that): the files under /proc/<pid> of a
        # non-dumpable process belong to root, not to the process's uid.
        assert os.stat(f"/proc/{kp}/status").st_uid == 0
        fds = sorted(os.readlink(f"/proc/{kp}/fd/{f}") for f in os.listdir(f"/proc/{kp}/fd"))
        assert [f.split(":")[0] for f in fds] == ["pipe"], fds  # the death pipe only
        rss_kib = int(status["VmRSS"].split()[0])
        exe = os.readlink(f"/proc/{kp}/exe")
        if keeper_kind == "program":
            assert Path(exe).name.startswith("kvmdm-keeper-"), exe
            assert rss_kib < 256, status["VmRSS"]  # a few pages, not an interpreter
        else:
            assert "python" in Path(exe).name, exe
        # The command line is the jailed process's own, in both kinds.
        assert Path(f"/proc/{kp}/cmdline").read_bytes() == Path(f"/proc/{proc.dm_pid()}/cmdline").read_bytes()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_exceptions_in_the_jail_are_reported_as_data(make_config: Make) -> None:
    def fn() -> None:
        raise FileNotFoundError(2, "nope")

    r = run_jailed(fn, make_config())
    assert (r.error_type, r.error_errno, r.exit_code) == ("FileNotFoundError", 2, 0)


def test_fatal_signal_of_the_dm_reaches_the_spawner_re_raised_by_the_keeper_or_directly(
        make_config: Make, keeper_kind: str) -> None:
    def fn() -> None:
        faulthandler.disable()  # pytest enables it; we want the kernel's own SIGSEGV
        ctypes.string_at(8, 1)  # (NULL itself is special-cased by ctypes)

    assert run_jailed(fn, make_config()).term_signal == signal.SIGSEGV


@pytest.mark.parametrize("pid_ns,expected", [(False, signal.SIGABRT), (True, signal.SIGSEGV)])
def test_abort_kills_the_dm_even_as_pid_1(make_config: Make, pid_ns: bool, expected: int) -> None:
    # A namespace init drops self-sent signals it has no handler for, so abort()'s raise(SIGABRT) does nothing
    # in pid 1 and glibc falls through to its last resort (hlt -> SIGSEGV). Either way the DM dies.
    def fn() -> None:
        faulthandler.disable()
        os.abort()

    assert run_jailed(fn, make_config(pid_ns=pid_ns)).term_signal == expected


@pytest.mark.parametrize("pid_ns", [True, False])
def test_signals_to_own_threads_work_with_the_right_tgid(make_config: Make, pid_ns: bool) -> None:
    def fn() -> Any:
        got: list[int] = []
        signal.signal(signal.SIGUSR1, lambda s, _f: got.append(s))
        signal.raise_signal(signal.SIGUSR1)
        t = threading.Thread(target=lambda: None)
        t.start()
        t.join()
        return {"got": got, "is_pid1": os.getpid() == 1}

    assert run_jailed(fn, make_config(pid_ns=pid_ns)).value == {"got": [signal.SIGUSR1], "is_pid1": pid_ns}


def test_sigterm_to_the_spawned_pid_reaches_a_dm_that_handles_it(make_config: Make, keeper_kind: str) -> None:
    # Forwarded by the keeper, or (no keeper) sent straight to the pid-1 DM from the ancestor namespace.
    ready_r, ready_w = os.pipe()

    def fn() -> Any:
        got: list[int] = []
        signal.signal(signal.SIGTERM, lambda s, _f: got.append(s))
        os.write(ready_w, b"r")
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        return got

    proc = spawn_jailed(fn, make_config(keep_fds=[ready_w]))
    assert _read(ready_r) == b"r"
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait().value == [signal.SIGTERM]


def test_dm_without_a_sigterm_handler_ignores_it_as_pid_1(make_config: Make) -> None:
    # The documented pid-1 contract (jail.py step 10): the kernel drops unhandled signals to a namespace init.
    ready_r, ready_w = os.pipe()

    def fn() -> str:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.write(ready_w, b"r")
        time.sleep(0.5)
        return "survived"

    proc = spawn_jailed(fn, make_config(keep_fds=[ready_w]))
    assert _read(ready_r) == b"r"
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait().value == "survived"


def test_sigkill_of_the_spawned_pid_takes_the_dm_down(make_config: Make, keeper_kind: str) -> None:
    ready_r, ready_w = os.pipe()

    def fn() -> None:
        os.write(ready_w, b"r")
        time.sleep(60)

    proc = spawn_jailed(fn, make_config(keep_fds=[ready_w]))
    assert _read(ready_r) == b"r"
    dm = proc.dm_pid()
    assert (dm == proc.pid) == (keeper_kind == "none")
    os.kill(proc.pid, signal.SIGKILL)
    r = proc.wait(10)
    assert r.term_signal == signal.SIGKILL
    assert _gone_or_zombie(dm), f"DM {dm} outlived its keeper"


def test_jail_setup_failure_exits_before_running_the_code(make_config: Make, jail_root: Path) -> None:
    (jail_root / "late").write_text("")  # validation must refuse a non-empty root before any step
    r = run_jailed(lambda: "ran", make_config())
    assert r.value is None and r.exit_code == 70 and "not empty" in r.stderr


def test_non_cgroup_directory_is_skipped_with_a_logged_reason(make_config: Make, tmp_path: Path) -> None:
    r = run_jailed(lambda: "ran", make_config(cgroup=tmp_path))
    assert r.value == "ran"
    assert "skipped: no cgroup.procs" in r.stderr


@pytest.fixture
def test_cgroup() -> Iterator[Path]:
    if not (UNIFIED / "cgroup.procs").exists() or not os.access(UNIFIED, os.W_OK):
        pytest.skip("no writable cgroup v2 hierarchy at /sys/fs/cgroup/unified")
    cg = UNIFIED / f"kvmdm-test-{os.getpid()}"
    cg.mkdir()
    yield cg
    for _ in range(100):  # the jailed processes must have left (exited) before rmdir succeeds
        try:
            cg.rmdir()
            return
        except OSError:
            time.sleep(0.05)


def test_jailed_process_is_placed_in_the_given_cgroup(make_config: Make, test_cgroup: Path) -> None:
    ready_r, ready_w = os.pipe()
    gate_r, gate_w = os.pipe()

    def fn() -> None:
        os.write(ready_w, b"r")
        os.read(gate_r, 1)

    proc = spawn_jailed(fn, make_config(keep_fds=[ready_w, gate_r], cgroup=test_cgroup,
                                        cgroup_memory_max=512 << 20))
    try:
        assert _read(ready_r) == b"r"
        members = {int(p) for p in (test_cgroup / "cgroup.procs").read_text().split()}
        dm = proc.dm_pid()
    finally:
        os.write(gate_w, b"x")
        r = proc.wait()
    assert {proc.pid, dm} <= members
    assert r.ok, r
    # memory is bound to cgroup v1 on this host: a missing memory.max is a logged skip, not a failure
    if not (test_cgroup / "memory.max").exists():
        assert "memory.max skipped" in r.stderr


def test_the_jailed_child_is_forked_the_way_the_mode_says(make_config: Make, spawn_mode: str) -> None:
    """The zygote variant of every test in this file and test_jail_escape.py really forks from a zygote."""
    ready_r, ready_w = os.pipe()
    gate_r, gate_w = os.pipe()

    def fn() -> Any:
        os.write(ready_w, b"r")
        os.read(gate_r, 1)
        return "ran"

    proc = spawn_jailed(fn, make_config(keep_fds=[ready_w, gate_r]))
    try:
        assert _read(ready_r) == b"r"
        with open(f"/proc/{proc.pid}/status") as f:
            ppid = int(next(line for line in f if line.startswith("PPid:")).split()[1])
    finally:
        os.write(gate_w, b"x")
        r = proc.wait()
    assert r.ok and r.value == "ran"
    assert ppid == (getattr(proc, "zygote_pid", None) if spawn_mode == "zygote" else os.getpid())
    assert (type(proc).__name__ == "ZygoteJailedProcess") == (spawn_mode == "zygote")


def _status(pid: int) -> dict[str, str]:
    return {k: v.strip() for k, v in (line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                                      .splitlines())}


def test_a_zygote_forked_jailed_process_is_itself_the_spawned_pid(make_config: Make, spawn_mode: str) -> None:
    """With the zygote, the pid the spawner holds is pid 1 of a pid namespace of its own, jailed, with no keeper,
    and the zygote's children's namespace is its own again; forked directly, that pid is the keeper."""
    ready_r, ready_w = os.pipe()
    gate_r, gate_w = os.pipe()

    def fn() -> Any:
        os.write(ready_w, b"r")
        os.read(gate_r, 1)
        return os.getpid()  # (getppid and getsid are not in the DM's seccomp policy: read from /proc instead)

    proc = spawn_jailed(fn, make_config(keep_fds=[ready_w, gate_r]))
    try:
        assert _read(ready_r) == b"r"
        spawned = _status(proc.pid)
        kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        spawned_ns = os.readlink(f"/proc/{proc.pid}/ns/pid")
        zpid = getattr(proc, "zygote_pid", None)
        zns = [os.readlink(f"/proc/{zpid}/ns/{n}") for n in ("pid", "pid_for_children")] if zpid else []
        dm = proc.dm_pid()
        dm_status, dm_ns = _status(dm), os.readlink(f"/proc/{dm}/ns/pid")
        dm_session = int(Path(f"/proc/{dm}/stat").read_text().rsplit(")", 1)[1].split()[3])  # proc(5) field 6
    finally:
        os.write(gate_w, b"x")
        r = proc.wait()
    own = os.readlink("/proc/self/ns/pid")
    # pid 1 of its namespace, leading its own session
    assert r.ok and r.value == 1, r
    assert dm_session == dm
    assert dm_status["NSpid"].split() == [str(dm), "1"] and dm_ns != own
    assert dm_status["Seccomp"] == "2" and int(dm_status["CapEff"], 16) == 0 and dm_status["NoNewPrivs"] == "1"
    if spawn_mode == "zygote":
        assert dm == proc.pid and kids == [] and int(dm_status["PPid"]) == zpid  # no keeper
        assert zns == [own, own]  # the zygote's pid_for_children is its own (and ours) again
    else:
        assert kids == [str(dm)] and spawned["NSpid"].split() == [str(proc.pid)] and spawned_ns == own
