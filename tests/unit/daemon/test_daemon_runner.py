"""daemon.runner without /dev/kvm: the command line, loading a definition with overrides, the foreground resource
preparation (fake daemon.net, fake or real unjailed back-ends) and its cleanup on errors and signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from daemon import backends as bk
from daemon import runner
from daemon.config import parse_definition
from daemon.runner import DefinitionError, ForegroundResources, HostResourceError, Interrupted, Signals

ELF = b"\x7fELF" + bytes(60)


def _args(*argv: str) -> Any:
    return runner.build_parser().parse_args(list(argv))


def _write(tmp_path: Path, doc: dict[str, Any], name: str = "guest.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return p


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "k.elf").write_bytes(ELF)
    (tmp_path / "disk.raw").write_bytes(bytes(1 << 20))
    return tmp_path


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ command line
@pytest.mark.parametrize("argv", [[], ["g.json", "--kernel", "k"], ["g.json", "--demo"], ["--kernel", "k", "--demo"]],
                         ids=["none", "file+kernel", "file+demo", "kernel+demo"])
def test_exactly_one_of_definition_kernel_or_demo_else_usage_error(argv: list[str],
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        runner.main(argv)
    assert e.value.code == runner.EXIT_USAGE == 2
    err = capsys.readouterr().err
    assert "give one of DEFINITION, --kernel, --demo or --firmware" in err or "cannot be combined" in err or "not allowed" in err


def test_help_says_which_flags_override_the_definition() -> None:
    text = " ".join(runner.build_parser().format_help().split())
    assert "DEFINITION" in text
    assert "--mem, --vcpus, --cmdline and --initrd override the file's memory_mib, vcpus, cmdline and initrd" in text


# ------------------------------------------------------------------------------------------------- definitions
def test_file_values_apply_and_overrides_replace_them(files: Path) -> None:
    p = _write(files, {"name": "g", "kernel": "k.elf", "cmdline": "a", "vcpus": 2, "memory_mib": 64,
                       "disks": [{"path": "disk.raw"}]})
    d, mem = runner.load_definition(_args(str(p)))
    assert (d.kernel, d.cmdline, d.vcpus, d.memory_mib, mem) == (str(files / "k.elf"), "a", 2, 64, None)
    assert d.disks[0].path == str(files / "disk.raw")  # relative to the file, as for `kvmdm create`
    d, _ = runner.load_definition(_args(str(p), "--mem", "256M", "--vcpus", "4", "--cmdline", "b=1",
                                        "--initrd", str(files / "disk.raw")))
    assert (d.memory_mib, d.vcpus, d.cmdline, d.initrd) == (256, 4, "b=1", str(files / "disk.raw"))


def test_toml_definitions_load_too(files: Path) -> None:
    p = files / "g.toml"
    p.write_text('name = "t"\nkernel = "k.elf"\n[[disks]]\npath = "disk.raw"\nread_only = true\n')
    d, _ = runner.load_definition(_args(str(p)))
    assert d.name == "t" and d.disks[0].read_only


@pytest.mark.parametrize("doc, message", [
    ({"name": "g", "kernel": "k.elf", "disks": [{"path": "missing.raw"}]}, "disks[0].path: file does not exist"),
    ({"name": "g", "kernel": "k.elf", "nics": [{"mac": "01:00:00:00:00:01"}]}, "nics[0].mac: must be a unicast"),
    ({"name": "g", "kernel": "k.elf", "disk": []}, "disk: unknown key"),
    ({"kernel": "k.elf"}, "name: is required"),
    ({"name": "g", "kernel": "k.elf", "disks": [{"path": "disk.raw", "backend": "vhost-user"}],
      "nics": [{"tap": "bad name"}]}, "nics[0].tap: must be an interface name"),
], ids=["missing-disk", "multicast-mac", "unknown-key", "no-name", "bad-tap"])
def test_a_bad_definition_names_the_file_and_the_field(files: Path, doc: dict[str, Any], message: str) -> None:
    p = _write(files, doc)
    with pytest.raises(DefinitionError) as e:
        runner.load_definition(_args(str(p)))
    assert str(e.value).startswith(f"{p}: ") and message in str(e.value)


def test_unparsable_and_missing_files_are_definition_errors(files: Path) -> None:
    (files / "bad.json").write_text("{not json")
    with pytest.raises(DefinitionError, match=r"bad\.json: cannot parse"):
        runner.load_definition(_args(str(files / "bad.json")))
    with pytest.raises(DefinitionError, match=r"nope\.json: cannot read the definition: No such file"):
        runner.load_definition(_args(str(files / "nope.json")))


def test_an_override_that_breaks_the_schema_says_which_flag(files: Path) -> None:
    p = _write(files, {"name": "g", "kernel": "k.elf"})
    with pytest.raises(DefinitionError, match=r"memory_mib: must be between 16 and 65536, got 8 \(from --mem\)"):
        runner.load_definition(_args(str(p), "--mem", "8M"))
    with pytest.raises(DefinitionError, match=r"--mem: a definition's memory is a whole number of MiB"):
        runner.load_definition(_args(str(p), "--mem", "4100K"))
    with pytest.raises(DefinitionError, match=r"initrd: file does not exist.*\(from --initrd\)"):
        runner.load_definition(_args(str(p), "--initrd", str(files / "nope")))


def test_a_bare_kernel_keeps_its_exact_memory_size_and_unchecked_path(files: Path) -> None:
    d, mem = runner.load_definition(_args("--kernel", "relative.elf", "--mem", "4100K", "--cmdline", "x"))
    assert d.name == runner.RUN_NAME and d.kernel == os.path.abspath("relative.elf") and d.cmdline == "x"
    assert mem == 4100 << 10
    d, mem = runner.load_definition(_args("--demo"))
    assert d.kernel == "demo" and mem == 128 << 20


def test_a_definition_kernel_that_is_no_kernel_is_a_definition_error(files: Path) -> None:
    (files / "junk").write_bytes(b"not a kernel at all")
    d = parse_definition({"name": "g", "kernel": str(files / "junk")})
    with pytest.raises(DefinitionError, match=r"^g\.json: kernel: .*junk: kernel image is neither"):
        runner.read_kernel(d, source="g.json")
    kernel, initrd = runner.read_kernel(parse_definition({"name": "g", "kernel": str(files / "k.elf")}),
                                        source="g.json")
    assert kernel == ELF and initrd is None


def test_main_reports_a_bad_definition_with_exit_2_before_touching_the_network(
        files: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from daemon import net as dnet

    def no_taps(*a: Any, **kw: Any) -> Any:
        raise AssertionError("a tap was created for a bad definition")

    monkeypatch.setattr(dnet, "create_tap", no_taps)
    (files / "junk").write_bytes(b"junk")
    cases = [({"name": "g", "kernel": "k.elf", "nics": [{}], "disks": [{"path": "gone.raw"}]},
              "disks[0].path: file does not exist"),
             ({"name": "g", "kernel": "junk", "nics": [{}]}, "kernel: "),
             ({"name": "g", "kernel": "k.elf", "nics": [{"tap": "lo"}]}, "nics[0].tap: lo exists and is not a tap"),
             ({"name": "g", "kernel": "k.elf", "nics": [{"bridge": "lo"}]},
              "nics[0].bridge: lo exists and is not a bridge"),
             ({"name": "g", "kernel": "k.elf", "nics": [{"tap": "t0"}, {"tap": "t0"}]},
              "nics[1].tap: t0 is also nics[0]'s tap")]
    for doc, message in cases:
        p = _write(files, doc)
        if os.geteuid() != 0 and "nics" in message:
            continue  # preflight refuses nics without CAP_NET_ADMIN first
        assert runner.main([str(p)]) == 2, doc
        err = capsys.readouterr().err
        assert f"kvmdm: error: {p}: " in err and message in err, err


# --------------------------------------------------------------------------------------------- host resources
class FakeNet:
    """daemon.net's surface as the runner uses it; records every call and can fail on the n-th tap."""

    NetError = type("NetError", (Exception,), {})

    def __init__(self, fail_at: int | None = None, on_create: Any = None) -> None:
        self.fail_at = fail_at
        self.on_create = on_create
        self.created: list[dict[str, Any]] = []
        self.removed: list[str] = []
        self.released: list[str] = []
        self.peers: list[socket.socket] = []  # the other end of each "tap": EOF once the runner closed it

    @staticmethod
    def tap_name(guest: str, index: int) -> str:
        return f"kvmdm-{guest}-{index}"

    def create_tap(self, name: str, **kw: Any) -> tuple[str, int]:
        if self.on_create is not None:
            self.on_create()
        if self.fail_at == len(self.created):
            raise self.NetError(f"cannot open tap {name}: Device or resource busy")
        self.created.append({"name": name, **kw})
        a, b = socket.socketpair()
        b.setblocking(False)
        self.peers.append(b)
        return name, a.detach()

    def tap_closed(self, i: int) -> bool:
        try:
            return self.peers[i].recv(1) == b""
        except BlockingIOError:
            return False

    def remove_tap(self, name: str) -> bool:
        self.removed.append(name)
        return True

    def release_bridge(self, name: str) -> bool:
        self.released.append(name)
        return True


class FakeBackends(SimpleNamespace):
    """daemon.backends with spawn replaced by a connected socketpair (no process)."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__(**{k: getattr(bk, k) for k in ("BACKEND_COMMAND", "READY_TIMEOUT", "specs_for", "Backend",
                                                        "BackendStartError", "remove_files")})
        self.fail = fail
        self.spawned: list[bk.Backend] = []
        self.killed: list[bk.Backend] = []
        self.peers: list[socket.socket] = []

    def spawn(self, b: bk.Backend, command: list[str], uid: int | None, timeout: float) -> socket.socket:
        assert uid is None  # unjailed, like `kvmdm run` itself
        if self.fail:
            raise bk.BackendStartError("blk back-end exited with status 1 before READY: boom")
        self.spawned.append(b)
        a, peer = socket.socketpair()
        self.peers.append(peer)
        return a

    def kill(self, b: bk.Backend) -> None:
        self.killed.append(b)


def _resources(d: Any, **kw: Any) -> ForegroundResources:
    return ForegroundResources(d, net=kw.pop("net", FakeNet()), backends=kw.pop("backends", FakeBackends()), **kw)


@pytest.fixture
def vhost_socket(tmp_path: Path) -> Iterator[Path]:
    """An external vhost-user back-end's listening socket (only accepting here)."""
    path = tmp_path / "ext.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(4)
    yield path
    s.close()


def test_acquire_gives_one_fd_per_disk_and_nic_in_definition_order(files: Path, vhost_socket: Path) -> None:
    d = parse_definition({"name": "g", "kernel": str(files / "k.elf"), "disks": [
        {"path": str(files / "disk.raw"), "read_only": True},
        {"path": str(vhost_socket), "backend": "vhost-user"},
        {"path": str(files / "disk.raw"), "backend": "vhost-user"}],
        "nics": [{"bridge": "br-x"}, {"tap": "mytap", "backend": "vhost-user"}]})
    net, backends = FakeNet(), FakeBackends()
    host = _resources(d, net=net, backends=backends)
    if os.geteuid() == 0:
        host.preflight()  # names that exist nowhere pass (without CAP_NET_ADMIN it refuses nics outright)
    res = host.acquire(ELF, None)
    assert len(res.disks) == 3 and len(res.nics) == 2 and host.fds == []  # handed over
    assert os.fstat(res.disks[0]).st_ino == (files / "disk.raw").stat().st_ino
    assert os.get_blocking(res.disks[0]) and (os.O_ACCMODE & _flags(res.disks[0])) == os.O_RDONLY
    assert socket.socket(fileno=os.dup(res.disks[1])).getpeername() == str(vhost_socket)
    # The managed blk back-end is device 1 (the external socket is device 0), the net back-end device 2.
    assert [(b.spec.kind, b.spec.device, b.tap) for b in backends.spawned] == [("blk", 1, None), ("net", 2, "mytap")]
    assert [(c["name"], c["bridge"], c["persist"], c["guest"]) for c in net.created] == [
        ("kvmdm-g-0", "br-x", False, "g"), ("mytap", None, True, "g")]
    assert net.tap_closed(1) and not net.tap_closed(0)  # a vhost-user nic's tap fd: its back-end opens the tap
    assert host.taps == ["kvmdm-g-0", "mytap"] and host.bridges == ["br-x"]
    for fd in res.fds():
        os.close(fd)
    assert host.close() == []
    assert net.removed == ["kvmdm-g-0", "mytap"] and net.released == ["br-x"]
    assert host.rdir is not None and not host.rdir.exists()


def _flags(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)


def test_a_tap_failure_half_way_leaves_nothing_behind(files: Path) -> None:
    d = parse_definition({"name": "g", "kernel": str(files / "k.elf"), "disks": [
        {"path": str(files / "disk.raw"), "backend": "vhost-user"}], "nics": [{"backend": "vhost-user"}, {}]})
    net, backends = FakeNet(fail_at=1), FakeBackends()
    host = _resources(d, net=net, backends=backends)
    with pytest.raises(HostResourceError, match=r"nics\[1\]: cannot open tap kvmdm-g-1: Device or resource busy"):
        host.acquire(ELF, None)
    kept = list(host.fds)
    assert len(kept) == 2  # the blk and net back-end sockets, still the runner's
    host.close()
    assert not any(_is_open(fd) for fd in kept)
    assert net.removed == ["kvmdm-g-0", "kvmdm-g-1"]  # the one that failed was recorded before it was tried
    assert [b.state for b in backends.spawned] == ["stopped", "stopped"]
    assert host.rdir is not None and not host.rdir.exists()


def test_a_back_end_that_does_not_start_is_a_host_error_naming_its_device(files: Path) -> None:
    d = parse_definition({"name": "g", "kernel": str(files / "k.elf"), "disks": [
        {"path": str(files / "disk.raw")}, {"path": str(files / "disk.raw"), "backend": "vhost-user"}]})
    host = _resources(d, backends=FakeBackends(fail=True))
    with pytest.raises(HostResourceError, match=r"disks\[1\]: vhost-user back-end: blk back-end exited"):
        host.acquire(ELF, None)
    [fd] = host.fds
    host.close()
    assert not _is_open(fd)


def test_an_external_socket_nobody_listens_on_is_a_definition_error(files: Path, tmp_path: Path) -> None:
    path = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the socket file stays, nobody listens
    d = parse_definition({"name": "g", "kernel": str(files / "k.elf"),
                          "disks": [{"path": str(path), "backend": "vhost-user"}]})
    host = _resources(d)
    with pytest.raises(DefinitionError, match=r"disks\[0\]\.path: cannot connect to the vhost-user back-end"):
        host.acquire(ELF, None)
    host.close()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_while_creating_taps_is_held_until_the_step_is_done_then_everything_is_undone(
        files: Path, signum: int) -> None:
    sig = Signals()
    sig.install()
    net = FakeNet(on_create=lambda: os.kill(os.getpid(), signum))
    try:
        d = parse_definition({"name": "g", "kernel": str(files / "k.elf"), "nics": [{}, {}]})
        host = _resources(d, net=net, signals=sig)
        with pytest.raises(Interrupted, match=signal.Signals(signum).name):
            host.acquire(ELF, None)
    finally:
        sig.restore()
    assert len(net.created) == 1  # the first tap was finished, the second never started
    [fd] = host.fds
    host.close()
    assert not _is_open(fd) and net.removed == ["kvmdm-g-0"]


def test_signals_raise_only_outside_deferred_sections_and_not_once_running() -> None:
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs as a background job of a shell
    sig = Signals()
    sig.install()
    try:
        with pytest.raises(Interrupted):
            with sig.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)  # the handler ran here and did not raise
                reached = True
        assert reached
        sig2 = Signals()
        sig2.install()
        sig2.running = True
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert sig2.received == signal.SIGINT  # for the console loop to see
    finally:
        sig.restore()
    assert signal.getsignal(signal.SIGINT) is before


def test_real_unjailed_blk_back_end_is_started_and_reaped(files: Path) -> None:
    # The real kvmdm-backend process (no KVM, no root: it only serves the image over a socket).
    d = parse_definition({"name": "g", "kernel": str(files / "k.elf"),
                          "disks": [{"path": str(files / "disk.raw"), "backend": "vhost-user", "serial": "S"}]})
    host = ForegroundResources(d)
    res = host.acquire(ELF, None)
    [b] = host.backends
    assert b.popen is not None and b.popen.poll() is None
    argv = Path(f"/proc/{b.popen.pid}/cmdline").read_bytes().split(b"\0")
    assert b"--no-jail" in argv and str(files / "disk.raw").encode() in argv
    popen = b.popen
    for fd in res.fds():
        os.close(fd)
    assert host.close() == []
    assert popen.returncode is not None  # reaped
    assert host.rdir is not None and not host.rdir.exists()


def test_a_back_end_that_ignores_sigterm_is_killed() -> None:
    popen = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                              "signal.SIG_IGN); print('x', flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    assert popen.stdout is not None and popen.stdout.readline() == b"x\n"
    spec = bk.BackendSpec(0, "blk", managed=True, path="/x")
    b = bk.Backend(spec, Path("/nonexistent-kvmdm"), Path("/nonexistent-kvmdm"), popen=popen, pid=popen.pid)
    host = ForegroundResources(parse_definition({"name": "g", "kernel": "/k"}, check_paths=False))
    host.backends.append(b)
    t = time.monotonic()
    host.close()
    assert popen.returncode == -signal.SIGKILL
    assert time.monotonic() - t < runner.BACKEND_STOP_TIMEOUT + 3


# ------------------------------------------------------------------------------------------ reboot (issue 10)
class _FakeBuilt:
    def __init__(self, log: list[str], n: int) -> None:
        self.log, self.n = log, n
        self.vmm = SimpleNamespace(n=n)

    def close(self) -> None:
        self.log.append(f"close {self.n}")


def _fake_boots(monkeypatch: pytest.MonkeyPatch, reasons: list[runner.StopReason]) -> list[str]:
    """runner._run with the VM faked: each build is logged, each boot stops with the next of ``reasons``."""
    log: list[str] = []
    builds = iter(range(1, 100))
    monkeypatch.setattr(runner, "_build", lambda d, host, *a: (log.append(f"build {(n := next(builds))}"),
                                                              _FakeBuilt(log, n))[1])

    def boot(vmm: Any, args: Any, signals: Signals, deadline: float | None) -> runner.StopReason:
        log.append(f"boot {vmm.n} deadline={deadline is not None}")
        return reasons.pop(0)

    monkeypatch.setattr(runner, "_boot", boot)
    real_close = ForegroundResources.close
    monkeypatch.setattr(ForegroundResources, "close", lambda self: (log.append("host close"), real_close(self))[1])
    monkeypatch.setattr(runner, "_FdSink", lambda fd: SimpleNamespace(mid_line=False, write=lambda b: None))
    monkeypatch.setattr(sys, "stdout", SimpleNamespace(fileno=lambda: -1, write=lambda t: len(t), flush=lambda: None))
    return log


RESET = runner.StopReason("reset", "guest requested reset (port 0xcf9)")
S5 = runner.StopReason("poweroff", "guest powered off (ACPI S5)")


def test_a_reset_rebuilds_the_same_guest_with_fresh_resources_until_it_powers_off(
        files: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    log = _fake_boots(monkeypatch, [RESET, RESET, S5])
    p = _write(files, {"name": "g", "kernel": str(files / "k.elf"), "disks": [{"path": str(files / "disk.raw")}]})
    assert runner.main([str(p), "--timeout", "30"]) == runner.EXIT_OK
    # Everything of boot N is given back before boot N+1 is built; one deadline for the whole run.
    assert log == ["build 1", "boot 1 deadline=True", "close 1", "host close",
                   "build 2", "boot 2 deadline=True", "close 2", "host close",
                   "build 3", "boot 3 deadline=True", "close 3", "host close"]
    err = capsys.readouterr().err
    assert "rebooting (boot 2)" in err and "rebooting (boot 3)" in err


def test_no_reboot_exits_3_at_the_first_reset(files: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    log = _fake_boots(monkeypatch, [RESET, S5])
    p = _write(files, {"name": "g", "kernel": str(files / "k.elf")})
    assert runner.main([str(p), "--no-reboot"]) == runner.EXIT_RESET == 3
    assert log == ["build 1", "boot 1 deadline=False", "close 1", "host close"]
    assert "guest requested reset (port 0xcf9)" in capsys.readouterr().err


@pytest.mark.parametrize("kind, code", [("crash", runner.EXIT_CRASH), ("host", runner.EXIT_ERROR)])
def test_a_crash_or_a_host_stop_is_never_a_reboot(files: Path, monkeypatch: pytest.MonkeyPatch, kind: str,
                                                 code: int) -> None:
    log = _fake_boots(monkeypatch, [runner.StopReason(kind, "x"), S5])
    p = _write(files, {"name": "g", "kernel": str(files / "k.elf")})
    assert runner.main([str(p)]) == code
    assert log == ["build 1", "boot 1 deadline=False", "close 1", "host close"]
