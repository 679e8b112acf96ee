"""Shared fixtures for the jail and seccomp attack tests.

Tests marked ``root`` need real privileges (namespaces, pivot_root, setresuid). Without root they are skipped
with the reason, unless KVMDM_REQUIRE_ROOT=1, in which case they fail: CI on a root runner must not silently
skip the only tests that attack the jail.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from daemon import jail
from daemon import zygote_wire as zw
from daemon.jail import JailConfig, JailedProcess, run_in_jail
from daemon.zygote import Zygote
from kvmcore.util.fdpass import recv_with_fds, send_with_fds

NOBODY = 65534


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") and os.geteuid() != 0:
        msg = "needs root (namespaces, pivot_root, setresuid); set KVMDM_REQUIRE_ROOT=1 to fail instead"
        if os.environ.get("KVMDM_REQUIRE_ROOT") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    if item.get_closest_marker("kvm") and not os.path.exists("/dev/kvm"):
        msg = "needs /dev/kvm; set KVMDM_REQUIRE_KVM=1 to fail instead"
        if os.environ.get("KVMDM_REQUIRE_KVM") == "1":
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture
def jail_root(tmp_path: Path) -> Path:
    """An empty, root-owned 0755 directory: what JailConfig.validate_host accepts as root_dir."""
    root = tmp_path / "jail-root"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)  # mkdir's mode is filtered by the umask
    return root


@pytest.fixture
def make_config(jail_root: Path) -> Callable[..., JailConfig]:
    """JailConfig factory with the production defaults (seccomp "dm", pid namespace) over ``jail_root``."""

    def make(**kw: object) -> JailConfig:
        args: dict[str, object] = {"root_dir": jail_root, "uid": NOBODY, "gid": NOBODY}
        args.update(kw)
        return JailConfig(**args)  # type: ignore[arg-type]

    return make


@pytest.fixture
def kvm_fd() -> Iterator[int]:
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    yield fd
    os.close(fd)


# --- jailed children forked by the DM zygote ---------------------------------------------------------------
#
# The escape tests run each attack in a jailed child (daemon.jail.spawn_jailed: fork, jail, run fn). With the
# ``spawn_mode`` fixture they also run it in a child forked by the zygote's real serve loop and fork path
# (daemon.zygote.Zygote: fds installed by number, the rest closed, handlers reset, own session, "go" handshake,
# pidfd and exit status reported over the wire), which then jails itself with the same config: what a DM
# forked by kvmdmd's zygote goes through. With ``cfg.pid_ns`` the zygote forks it as pid 1 of a new pid
# namespace and its jail runs with ``pid_ns_ready`` (no keeper: daemon/jail.py step 10), as kvmdmd's jailed DMs
# do. The zygote here is a fork of the test process, so that ``fn`` (a closure of the test) is in its memory.


class ZygoteJailedProcess(JailedProcess):
    """A jailed child of a test zygote; the exit status comes from the zygote's report, as the daemon gets it.
    With ``pid_ns`` the child is the jailed process itself (pid 1 of the namespace the zygote made)."""

    def __init__(self, pid: int, result_fd: int, stderr_fd: int, zygote_pid: int, req: socket.socket,
                 ev: socket.socket, pidfd: int, pid_ns: bool) -> None:
        super().__init__(pid, result_fd, stderr_fd)
        self.zygote_pid = zygote_pid
        self.req, self.ev, self.pidfd = req, ev, pidfd
        self.pid_ns = pid_ns

    def dm_pid(self, timeout: float = 10.0) -> int:
        return self.pid if self.pid_ns else super().dm_pid(timeout)

    def _exit_status(self) -> tuple[int | None, int | None]:
        try:
            self.ev.settimeout(30)
            while True:
                m = zw.decode(self.ev.recv(zw.MAX_MESSAGE))
                if isinstance(m, zw.Exited) and m.pid == self.pid:
                    rc = m.returncode
                    return (rc, None) if rc >= 0 else (None, -rc)
        finally:
            os.close(self.pidfd)
            self.req.close()  # EOF: the test zygote exits
            self.ev.close()
            os.waitpid(self.zygote_pid, 0)


def zygote_spawn_jailed(fn: Callable[[], Any], cfg: JailConfig) -> JailedProcess:
    """:func:`daemon.jail.spawn_jailed`, but the child is forked by a zygote on request and given its fds by
    SCM_RIGHTS (cfg.keep_fds at their numbers, the result pipe, the stderr pipe as its log)."""
    req, req_z = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ev, ev_z = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    result_r, result_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)

    def entry(_args: list[str]) -> int:
        try:
            return run_in_jail(fn, replace(cfg, pid_ns_ready=cfg.pid_ns), result_w)
        except BaseException:  # noqa: B036 - as spawn_jailed: report and exit 70
            traceback.print_exc()
            sys.stderr.flush()
            return 70

    zpid = os.fork()
    if zpid == 0:
        code = 70
        try:
            for fd in (req.detach(), ev.detach(), result_r, result_w, err_r, err_w):
                os.close(fd)  # the zygote holds nothing of its child: it gets the fds with the request
            code = Zygote(req_z, ev_z, entry).serve()
        finally:
            os._exit(code)
    req_z.close()
    ev_z.close()
    try:
        req.settimeout(30)
        assert isinstance(zw.decode(req.recv(zw.MAX_MESSAGE)), zw.Ready)
        targets = [*dict.fromkeys(cfg.keep_fds), result_w, err_w]
        send_with_fds(req, zw.encode(zw.Spawn(1, [], targets, len(targets) - 1, cfg.pid_ns)), targets)
        data, fds, _ = recv_with_fds(req, zw.MAX_MESSAGE, 1)
        m = zw.decode(data, len(fds))
        assert isinstance(m, zw.Spawned), m
    finally:
        os.close(result_w)
        os.close(err_w)
    return ZygoteJailedProcess(m.pid, result_r, err_r, zpid, req, ev, fds[0], cfg.pid_ns)


@pytest.fixture(params=["fork", "zygote"])
def spawn_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with jailed children forked directly (daemon.jail.spawn_jailed) and by a zygote."""
    if request.param == "zygote":
        monkeypatch.setattr(jail, "spawn_jailed", zygote_spawn_jailed)  # run_jailed looks it up there
        if hasattr(request.module, "spawn_jailed"):
            monkeypatch.setattr(request.module, "spawn_jailed", zygote_spawn_jailed)
    return str(request.param)
