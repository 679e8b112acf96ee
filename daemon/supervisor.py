"""Supervision of device-model processes: the :class:`Supervisor` the REST API drives. It composes the parts in
:mod:`daemon.supervision` — lifecycle table (``state``), process builder (``spawn``), pidfd watching
(``pidwatch``), restart policy (``restart``), back-end supervision (``backend_supervisor``), control client
(``link``) — and holds what ties them together: start, stop, kill, pause/resume/reset, exit handling, and the
re-attach to DMs left running by a previous daemon.

Exit detection is by pidfd (daemon.supervision.pidwatch). If the DM is our child (``--dm-spawn exec``) we
``waitpid`` it for the exit status; a DM forked by the zygote (``--dm-spawn zygote``, the default) is the
zygote's child, and the zygote reports its status (daemon.supervision.forkserver). After a daemon restart the DMs are *not* our children (they were re-parented when the old daemon exited),
so their exit status is unavailable (waitpid gives ECHILD); the exit reason is then taken from the last state
event the DM sent on its control connection, or reported as unknown.

Every operation that changes a guest's state runs under the guest's lock (``Guest.lock``); pidfd callbacks and
the DM's events run on the event loop between awaits and go through ``Guest.set_state``, which checks the
lifecycle table.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon import messages as msg
from daemon.config import ConfigError, GuestDefinition, parse_definition
from daemon.control import ControlError, ProtocolError
from daemon.messages import ExitCode, Stats, describe_exit
from daemon.store import DefinitionStore, StoreError, atomic_write
from daemon.supervision import pidwatch
from daemon.supervision.backend_supervisor import BackendSupervisor
from daemon.supervision.errors import (
    DMFault,
    DMTimeout,
    GuestExists,
    GuestNotFound,
    InvalidDefinition,
    InvalidState,
    StartFailed,
    SupervisorError,
)
from daemon.supervision.forkserver import ForkedDm, ForkServer
from daemon.supervision.link import ControlLink
from daemon.supervision.restart import RestartPolicy
from daemon.supervision.settings import DEFAULT_DM_COMMAND, SupervisorConfig
from daemon.supervision.spawn import DmLaunch, UidPool, spawn_dm
from daemon.supervision.state import LIVE_STATES, VALID_TRANSITIONS, Guest, GuestState, InvalidTransition

__all__ = [
    "DEFAULT_DM_COMMAND", "LIVE_STATES", "VALID_TRANSITIONS", "DMFault", "DMTimeout", "Guest", "GuestExists",
    "GuestNotFound", "GuestState", "InvalidDefinition", "InvalidState", "InvalidTransition", "StartFailed",
    "Supervisor", "SupervisorConfig", "SupervisorError",
]

log = logging.getLogger(__name__)

S = GuestState


def _names_socket(sock: str, pid: int) -> bool:
    return sock in pidwatch.cmdline(pid)


class Supervisor:
    def __init__(self, cfg: SupervisorConfig) -> None:
        self.cfg = cfg
        self.paths = cfg.paths
        self.store = DefinitionStore(cfg.paths)
        self.guests: dict[str, Guest] = {}
        self.store_errors: list[StoreError] = []
        self.uids = UidPool(cfg.uid_base, cfg.uid_count)
        self.link = ControlLink(cfg.paths, cfg.request_timeout)
        self.backends = BackendSupervisor(cfg, self.link, self._backend_uid, lambda: self._closing)
        self._closing = False
        # --dm-spawn zygote: DMs are forked by a pre-imported zygote (started in load()).
        self.forkserver: ForkServer | None = ForkServer() if cfg.uses_zygote else None

    def policy(self, g: Guest) -> RestartPolicy:
        return RestartPolicy.for_guest(g.definition, self.cfg.backoff_initial, self.cfg.backoff_max)

    # ------------------------------------------------------------------------------------------------ startup

    async def load(self) -> None:
        """Load definitions, then find DMs left running by a previous daemon and re-attach to them."""
        self.paths.ensure()
        if self.forkserver is not None:
            self.forkserver.attach(asyncio.get_running_loop())
            self._zygote_start = asyncio.ensure_future(asyncio.to_thread(self._start_zygote))
        defs, self.store_errors = self.store.load_all()
        for d in defs.values():
            self.guests[d.name] = Guest(d)
            self.guests[d.name].exited.set()
        rg = self.paths.runtime_guests_dir
        for entry in sorted(rg.iterdir()) if rg.is_dir() else []:
            g = self.guests.get(entry.name)
            if g is None:
                await self._reap_orphan_dir(entry)
            else:
                async with g.lock:
                    await self._reattach(g)

    def _start_zygote(self) -> None:
        assert self.forkserver is not None
        try:
            self.forkserver.ensure()
        except SupervisorError as e:  # the first spawn tries again and reports it to its caller
            log.error("%s", e)

    def _launch(self, launch: DmLaunch) -> Any:
        assert self.forkserver is not None
        # A jailed DM is forked as pid 1 of its own pid namespace: no keeper, and the pid we get is the DM's.
        return self.forkserver.spawn(launch.args, launch.pass_fds, launch.log_fd, pid_ns=launch.jailed)

    def _read_pid(self, name: str) -> int | None:
        try:
            pid = int(self.paths.dm_pid_file(name).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid > 1 else None

    def is_our_dm(self, pid: int) -> bool:
        """``/proc/<pid>/cmdline`` must be a DM command line: ``daemon.dm`` or the configured dm command, plus the
        contract's ``--control-fd`` (a recycled pid of an unrelated process must never be adopted or killed)."""
        args = pidwatch.cmdline(pid)
        if "--control-fd" not in args:
            return False
        n = len(self.cfg.dm_command)
        return args[:n] == self.cfg.dm_command or any("daemon.dm" in a for a in args[:3])

    async def _reattach(self, g: Guest) -> None:
        name = g.name
        self.backends.adopt(g)  # first, so that every path below that ends the guest also stops them
        pid = self._read_pid(name)
        if pid is None:
            self.backends.end_all(g)
            self._cleanup_runtime(name, keep_dir=False)
            return
        pidfd = pidwatch.open_verified(pid, self.is_our_dm)
        if pidfd is None:
            self._cleanup_runtime(name, keep_dir=False)
            g.note(f"DM pid {pid} exited while the daemon was not running")
            self._after_exit(g, "DM exited while the daemon was not running (exit status unknown)", None,
                             failure=True)
            return
        meta = self._read_meta(name)
        g.pid, g.pidfd, g.popen = pid, pidfd, None
        g.started_at = meta.get("started_at", time.time())
        g.uid = meta.get("uid")
        g.restarts = int(meta.get("restarts", 0))
        if g.uid is not None:
            self.uids.claim(g.uid)
        g.generation += 1
        g.exited = asyncio.Event()
        g.set_state(S.RUNNING)
        pidwatch.watch(pidfd, self._on_pidfd, g, g.generation)
        try:
            client = await self.link.connect(g, timeout=2.0)
            await client.call(msg.Ping(), timeout=2.0)
        except (OSError, ControlError, TimeoutError, ProtocolError) as e:
            g.note(f"re-attach to DM pid {pid} failed ({e}); killing it")
            pidwatch.send_signal(g.pidfd, signal.SIGKILL)
            return
        g.note(f"re-attached to running DM pid {pid} (not our child: exit status will come from its events)")
        for b in g.backends:
            if b.pidfd is None:  # died while the daemon was down: restart it and hand it to the DM
                self.backends.failed(g, b, "back-end exited while the daemon was not running")

    async def _reap_orphan_dir(self, entry: Path) -> None:
        """A runtime dir without a definition: kill its DM if it is provably ours, then remove the dir."""
        pid = self._read_pid(entry.name)
        pidfd = pidwatch.open_verified(pid, self.is_our_dm) if pid is not None else None
        if pidfd is not None:
            log.warning("killing orphan DM pid %d of undefined guest %s", pid, entry.name)
            pidwatch.send_signal(pidfd, signal.SIGKILL)
            os.close(pidfd)
        for pid_file in entry.glob("bk*.pid"):  # its back-ends too (cmdline must name their socket)
            try:
                bpid = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            sock = str(pid_file.with_suffix(".sock"))
            bpidfd = pidwatch.open_verified(bpid, functools.partial(_names_socket, sock))
            if bpidfd is not None:
                log.warning("killing orphan back-end pid %d of undefined guest %s", bpid, entry.name)
                pidwatch.send_signal(bpidfd, signal.SIGKILL)
                os.close(bpidfd)
        shutil.rmtree(entry, ignore_errors=True)

    def _read_meta(self, name: str) -> dict[str, Any]:
        try:
            meta = json.loads(self.paths.meta_file(name).read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(meta, dict):
            return {}
        out: dict[str, Any] = {}
        if isinstance(meta.get("started_at"), int | float):
            out["started_at"] = float(meta["started_at"])
        uid = meta.get("uid")
        if isinstance(uid, int) and self.uids.contains(uid):
            out["uid"] = uid
        if isinstance(meta.get("restarts"), int):
            out["restarts"] = meta["restarts"]
        return out

    def _write_meta(self, g: Guest) -> None:
        meta = {"pid": g.pid, "started_at": g.started_at, "uid": g.uid, "restarts": g.restarts}
        atomic_write(self.paths.meta_file(g.name), json.dumps(meta).encode(), 0o600)

    # ----------------------------------------------------------------------------------------------- lookup

    def get(self, name: str) -> Guest:
        g = self.guests.get(name)
        if g is None:
            raise GuestNotFound(name)
        return g

    # ------------------------------------------------------------------------------------------ create/destroy

    async def create(self, raw: Any) -> Guest:
        try:
            d = parse_definition(raw, check_paths=True)
        except ConfigError as e:
            raise InvalidDefinition(e) from None
        if d.name in self.guests:
            raise GuestExists(f"guest {d.name!r} already exists")
        await asyncio.to_thread(self.store.save, d)
        g = Guest(d)
        g.exited.set()
        self.guests[d.name] = g
        g.note("defined")
        return g

    async def destroy(self, name: str) -> None:
        g = self.get(name)
        async with g.lock:
            g.stop_requested = True
            self._cancel_restart(g)
            if g.pidfd is not None:
                await self._kill_and_wait(g, "destroyed")
            self._release_uid(g)
            await asyncio.to_thread(self._remove_files, name)
            if g.definition.nics:
                await asyncio.to_thread(self._release_nics, g.definition)
            self.guests.pop(name, None)
            log.info("guest %s: destroyed", name)

    @staticmethod
    def _release_nics(d: GuestDefinition) -> None:
        """Remove taps and bridges daemon.net created for ``d`` (only ones marked ours; errors logged)."""
        from daemon import net as dnet

        try:
            dnet.cleanup(d.name)
            for bridge in {nic.bridge for nic in d.nics if nic.bridge}:
                dnet.release_bridge(bridge)
        except Exception as e:  # noqa: BLE001 - NetError, NetlinkError, OSError: log, destroy goes on
            log.warning("guest %s: network cleanup failed: %s", d.name, e)

    def _remove_files(self, name: str) -> None:
        self.store.delete(name)
        shutil.rmtree(self.paths.guest_state_dir(name), ignore_errors=True)
        shutil.rmtree(self.paths.guest_runtime_dir(name), ignore_errors=True)

    # ----------------------------------------------------------------------------------------------- start

    async def start(self, name: str) -> Guest:
        g = self.get(name)
        async with g.lock:
            if g.live:
                raise InvalidState(f"guest {name!r} is already {g.state}")
            self._cancel_restart(g)
            g.stop_requested = False
            g.restart_times.clear()  # an operator's start opens a fresh restart window
            await self._start_locked(g)
        return g

    async def _start_locked(self, g: Guest) -> None:
        name = g.name
        if g.uid is None and self._jailed(g):
            g.uid = self.uids.alloc()
        try:
            popen = await asyncio.to_thread(spawn_dm, self.cfg, g, jailed=self._jailed(g),
                                            backend_uid=self._backend_uid(g), end_backend=self.backends.end,
                                            launch=self._launch if self.forkserver is not None else None)
        except Exception as e:  # noqa: BLE001 - any failure preparing the DM (missing image, demo build error)
            log.debug("guest %s: spawn preparation failed", name, exc_info=True)
            g.set_state(S.FAILED if g.state == S.RESTARTING else S.STOPPED)
            g.last_exit_reason = f"start failed: {e}"
            self._release_uid(g)
            g.note(g.last_exit_reason)
            raise StartFailed(f"guest {name!r}: {g.last_exit_reason}") from None
        g.generation += 1
        g.popen, g.pid = popen, popen.pid
        # A forked DM's pidfd comes from the zygote (opened before it could be reaped); ours we open ourselves.
        g.pidfd = popen.pidfd if isinstance(popen, ForkedDm) else os.pidfd_open(popen.pid)
        g.exited = asyncio.Event()
        g.set_state(S.STARTING)
        g.started_at = time.time()
        g.last_event = None
        pidwatch.watch(g.pidfd, self._on_pidfd, g, g.generation)
        for b in g.backends:
            self.backends.watch(g, b)
        atomic_write(self.paths.dm_pid_file(name), f"{popen.pid}\n".encode(), 0o644)
        self._write_meta(g)
        g.note(f"DM spawned, pid {popen.pid}")
        # Wait until the DM answers ping, or exits, whichever first.
        gen = g.generation
        ping = asyncio.ensure_future(self._wait_ping(g))
        died = asyncio.ensure_future(g.exited.wait())
        done, _ = await asyncio.wait({ping, died}, timeout=self.cfg.start_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        for t in (ping, died):
            t.cancel()
        if ping in done and not ping.cancelled() and ping.exception() is None and g.generation == gen \
                and not g.exited.is_set():
            if g.state == S.STARTING:
                paused = g.last_event is not None and g.last_event.state == "paused"
                g.set_state(S.PAUSED if paused else S.RUNNING)
            return
        if g.exited.is_set() and g.generation == gen and g.last_exit_code in (ExitCode.STOPPED, ExitCode.RESET):
            # The guest ran and powered off (or asked for a reset) before the DM's first ping answer reached us: a
            # DM forked from the zygote runs a tiny guest to its end in milliseconds. That is a start, not a failure.
            return
        if not g.exited.is_set():
            g.note("DM did not answer ping in time; killing it")
            await self._kill_and_wait(g, "DM did not come up")
        raise StartFailed(f"guest {name!r}: DM did not start: {g.last_exit_reason}")

    async def _wait_ping(self, g: Guest) -> None:
        deadline = time.monotonic() + self.cfg.start_timeout
        while True:
            try:
                client = await self.link.connect(g, timeout=1.0)
                await client.call(msg.Ping(), timeout=self.cfg.request_timeout)
                return
            except (OSError, ControlError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    def _jailed(self, g: Guest) -> bool:
        return g.definition.jail.enabled and not self.cfg.no_jail

    def _backend_uid(self, g: Guest) -> int | None:
        """The guest's back-ends' jail uid: distinct from every DM's, inside the configured range."""
        if not self._jailed(g) or g.uid is None:
            return None
        return self.uids.backend_uid(g.uid)

    def _release_uid(self, g: Guest) -> None:
        self.uids.release(g.uid)
        g.uid = None

    # ------------------------------------------------------------------------------------------ exit handling

    def _on_pidfd(self, g: Guest, gen: int) -> None:
        pidfd = g.pidfd
        if pidfd is None or gen != g.generation:
            return
        popen = g.popen
        if isinstance(popen, ForkedDm):
            # Not our child: its zygote reaps it and reports the status, maybe a moment after the pidfd fired.
            # The pidfd stays open (a kill meanwhile is harmless) until the report is in.
            asyncio.get_running_loop().remove_reader(pidfd)
            timer = asyncio.get_running_loop().call_later(2.0, self._on_forked_exit, g, gen, popen, None, True)
            def reported(rc: int | None) -> None:
                timer.cancel()
                self._on_forked_exit(g, gen, popen, rc, False)

            popen.when_reaped(reported)
            return
        pidwatch.unwatch(pidfd)
        g.pidfd = None
        self._dm_exited(g, pidwatch.reap(popen, "DM") if popen is not None else None)

    def _on_forked_exit(self, g: Guest, gen: int, dm: ForkedDm, rc: int | None, timed_out: bool) -> None:
        if gen != g.generation or g.pidfd is None or g.popen is not dm:
            return  # already handled (the report and the timeout both fire at most once each)
        if timed_out:
            dm.zygote.waiters.pop(dm.pid, None)
        os.close(g.pidfd)
        g.pidfd = None
        if rc is not None:
            self._dm_exited(g, pidwatch.split_returncode(rc, "DM"))
            return
        why = "its zygote did not report it" if timed_out else "its zygote died before it"
        self._dm_exited(g, None, unknown=f"DM exited; exit status unknown ({why})")

    def _dm_exited(self, g: Guest, status: tuple[int | None, str | None] | None, unknown: str | None = None) -> None:
        """The DM is gone: ``status`` is (code, killed-reason) when known, None when not (a re-attached DM, or a
        forked one whose zygote could not say)."""
        code: int | None = None
        if status is not None:
            code, killed = status
            if killed is not None:
                reason, failure = killed, True
            else:
                assert code is not None
                reason, failure = describe_exit(code)
        else:
            ev = g.last_event
            if ev is not None and ev.state == "stopped":
                reason, failure = f"DM exited after state 'stopped' ({ev.reason}); exit status unknown", False
            elif ev is not None and ev.state == "crashed":
                reason, failure = f"DM exited after state 'crashed' ({ev.reason}); exit status unknown", True
            else:
                reason = unknown or "DM exited; exit status unknown (not our child since a daemon restart)"
                failure = True
        if g.last_event is not None and g.last_event.guest_status is not None:
            g.guest_status = g.last_event.guest_status
        g.note(f"DM pid {g.pid} exited: {reason}")
        self._after_exit(g, reason, code, failure=failure)

    def _after_exit(self, g: Guest, reason: str, code: int | None, *, failure: bool) -> None:
        """Record the exit and decide, per policy, whether and when to restart."""
        g.last_exit_reason = reason
        g.last_exit_code = code
        g.pid = None
        g.popen = None
        g.started_at = None
        if g.control is not None:
            asyncio.ensure_future(g.control.close())
            g.control = None
        self.backends.end_all(g)
        self._cleanup_runtime(g.name, keep_dir=True)
        g.exited.set()
        policy = self.policy(g)
        reset = code == ExitCode.RESET
        restart = not (self._closing or g.stop_requested) and policy.wants_restart(failure=failure, reset=reset)
        if not restart:
            # An exit the operator asked for (stop, kill, destroy) is "stopped" even if it took a SIGKILL.
            g.set_state(S.CRASHED if failure and not g.stop_requested else S.STOPPED)
            self._release_uid(g)
            return
        delay = policy.next_delay(g.restart_times, time.monotonic(), immediate=reset)
        if delay is None:
            g.set_state(S.FAILED)
            g.last_exit_reason = policy.limit_message(reason)
            g.note("restart limit reached; giving up")
            self._release_uid(g)
            return
        g.restarts += 1
        g.set_state(S.RESTARTING)
        g.note(f"restarting in {delay:.2f} s (restart #{g.restarts})")
        g.restart_task = asyncio.ensure_future(self._restart_after(g, delay))

    async def _restart_after(self, g: Guest, delay: float) -> None:
        await asyncio.sleep(delay)
        async with g.lock:
            if g.state != S.RESTARTING or g.stop_requested or self.guests.get(g.name) is not g:
                return
            g.restart_task = None
            try:
                await self._start_locked(g)
            except SupervisorError as e:
                log.warning("guest %s: restart failed: %s", g.name, e)

    def _cancel_restart(self, g: Guest) -> None:
        if g.restart_task is not None:
            g.restart_task.cancel()
            g.restart_task = None
        if g.state == S.RESTARTING:
            g.set_state(S.STOPPED)

    def _cleanup_runtime(self, name: str, *, keep_dir: bool) -> None:
        rdir = self.paths.guest_runtime_dir(name)
        if not keep_dir:
            shutil.rmtree(rdir, ignore_errors=True)
            return
        for p in (self.paths.dm_pid_file(name), self.paths.control_socket(name), self.paths.meta_file(name)):
            p.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------ lifecycle commands

    async def stop(self, name: str, timeout: float | None = None) -> Guest:
        """Graceful stop: ask the DM, wait for its exit, SIGKILL after ``timeout``."""
        g = self.get(name)
        async with g.lock:
            if g.state == S.RESTARTING:
                g.stop_requested = True
                self._cancel_restart(g)
                self._release_uid(g)
                return g
            if g.pidfd is None:
                raise InvalidState(f"guest {name!r} is {g.state}, not running")
            g.stop_requested = True
            g.set_state(S.STOPPING)
            t = self.cfg.stop_timeout if timeout is None else timeout
            with contextlib.suppress(SupervisorError):
                await self.link.call(g, msg.Stop(), timeout=min(t, self.cfg.request_timeout))
            try:
                await asyncio.wait_for(g.exited.wait(), t)
            except TimeoutError:
                g.note(f"DM did not exit within {t:g} s of stop; killing it")
                await self._kill_and_wait(g, "stop timed out")
        return g

    async def kill(self, name: str) -> Guest:
        g = self.get(name)
        async with g.lock:
            if g.state == S.RESTARTING:
                g.stop_requested = True
                self._cancel_restart(g)
                self._release_uid(g)
                return g
            if g.pidfd is None:
                raise InvalidState(f"guest {name!r} is {g.state}, not running")
            await self._kill_and_wait(g, "killed by request")
        return g

    async def _kill_and_wait(self, g: Guest, why: str) -> None:
        g.stop_requested = True
        g.note(f"SIGKILL DM pid {g.pid}: {why}")
        pidwatch.send_signal(g.pidfd, signal.SIGKILL)
        try:
            await asyncio.wait_for(g.exited.wait(), 5.0)
        except TimeoutError:
            log.error("guest %s: DM pid %s survived SIGKILL for 5 s", g.name, g.pid)

    async def pause(self, name: str) -> Guest:
        g = self.get(name)
        async with g.lock:
            if g.state != S.RUNNING:
                raise InvalidState(f"guest {name!r} is {g.state}, not running")
            await self.link.call(g, msg.Pause())
            if g.state == S.RUNNING:  # the DM's "paused" event may have moved it already
                g.set_state(S.PAUSED)
        return g

    async def resume(self, name: str) -> Guest:
        g = self.get(name)
        async with g.lock:
            if g.state != S.PAUSED:
                raise InvalidState(f"guest {name!r} is {g.state}, not paused")
            await self.link.call(g, msg.Resume())
            if g.state == S.PAUSED:
                g.set_state(S.RUNNING)
        return g

    async def reset(self, name: str) -> Guest:
        g = self.get(name)
        async with g.lock:
            if g.state not in (S.RUNNING, S.PAUSED):
                raise InvalidState(f"guest {name!r} is {g.state}, not running")
            await self.link.call(g, msg.Reset())
            g.note("reset")
        return g

    async def console_input(self, name: str, data: bytes) -> int:
        g = self.get(name)
        reply = await self.link.call(g, msg.ConsoleInput(data))
        return reply.accepted

    async def stats(self, name: str, timeout: float | None = None) -> Stats:
        g = self.get(name)
        return await self.link.call(g, msg.GetStats(), timeout=timeout)

    def dm_rss(self, g: Guest) -> int | None:
        """RSS read by the daemon itself from /proc (not trusting the DM's own figure)."""
        if g.pid is None:
            return None
        pid = pidwatch.jailed_child(g.pid) or g.pid
        try:
            with open(f"/proc/{pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    jailed_child = staticmethod(pidwatch.jailed_child)

    # ------------------------------------------------------------------------------------------- shutdown

    async def close(self) -> None:
        """Daemon exit: stop watching, leave DMs running (they are re-attached by the next daemon)."""
        self._closing = True
        if self.forkserver is not None:
            self.forkserver.detach()
            await asyncio.to_thread(self.forkserver.close)  # DMs keep running; the next daemon starts a new one
        for g in self.guests.values():
            if g.restart_task is not None:
                g.restart_task.cancel()
            if g.pidfd is not None:
                pidwatch.unwatch(g.pidfd)
                g.pidfd = None
            if g.control is not None:
                await g.control.close()
                g.control = None
            self.backends.detach_all(g)  # left running with the DM; the next daemon adopts them (pid files)
            if g.pid is not None and g.started_at is not None:
                with contextlib.suppress(OSError):
                    self._write_meta(g)

    def summary(self) -> Sequence[dict[str, Any]]:
        return [g.info() for g in self.guests.values()]
