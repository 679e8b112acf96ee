"""The daemon's end of the DM zygote (daemon.zygote): start it, ask it to fork a DM with the DM's fds, learn the
DMs' exit statuses from it, restart it when it dies. ``kvmdmd --dm-spawn zygote`` (the default) spawns DMs
through :class:`ForkServer`; ``--dm-spawn exec`` keeps ``Popen`` of ``python -m daemon.dm`` for comparison.

Who is whose parent, and how the supervisor still watches a DM exactly as before:

* the zygote is the daemon's child (``Popen``); each DM is the zygote's child. The zygote sends a **pidfd** of
  the DM with its ``spawned`` reply (opened before the DM could have been reaped, so no pid-reuse window); the
  supervisor watches it on the event loop and signals through it, as it does with an exec'd DM's. A jailed DM is
  forked as pid 1 of a pid namespace of its own (``spawn(..., pid_ns=True)``), so its jail forks no keeper and
  that pid is the DM itself, where an exec'd DM's pid is its keeper (daemon/jail.py step 10);
* ``waitid`` works for children only, so the **exit status** comes from the zygote, which reaps its children and
  reports ``exited`` on its event channel (:meth:`ForkedDm.when_reaped`). A pidfd turns readable when the DM
  exits, possibly a moment before the report arrives: the supervisor waits for the report;
* if the zygote dies, the DMs it forked keep running (re-parented, like after a daemon restart); their exit
  status is then unknown (the reason says so) and the next spawn starts a new zygote (also restarted at once in
  the background, with a backoff if it keeps dying young).

Thread model: :meth:`ForkServer.spawn` blocks (the supervisor calls it from ``spawn_dm``'s worker thread) and
holds a lock around the request/reply; the event channels are read on the event loop (:meth:`attach`) or, with
no loop, by :meth:`ForkServer.wait_exit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from daemon import zygote_wire as zw
from daemon.supervision.errors import StartFailed
from kvmcore.util.fdpass import recv_with_fds, send_with_fds

log = logging.getLogger("daemon.supervisor")

ZYGOTE_COMMAND = [sys.executable, "-m", "daemon.zygote"]
CMDLINE_ROOM = 4096  # daemon.zygote.CMDLINE_ROOM (not imported: that would load the DM's modules here)

ExitCallback = Callable[[int | None], None]


class ZygoteError(StartFailed):
    """The DM zygote could not be started, died, or answered outside its protocol."""


@dataclass(eq=False)
class ForkedDm:
    """A DM forked by the zygote: what the supervisor holds instead of a ``Popen``. ``pidfd`` is the
    supervisor's to watch and close."""

    pid: int
    pidfd: int
    zygote: ZygoteProcess
    returncode: int | None = None

    def when_reaped(self, callback: ExitCallback) -> None:
        """``callback(returncode)`` (on the event loop) once the zygote reports this DM's exit; ``None`` when it
        never can (the zygote died first)."""
        self.zygote.on_exit(self, callback)


@dataclass(eq=False)
class ZygoteProcess:
    """One running zygote: its process, its two channels, the exit statuses it reported and who waits for them."""

    popen: subprocess.Popen[bytes]
    req: socket.socket
    ev: socket.socket
    started: float = field(default_factory=time.monotonic)
    usable: bool = True  # False once a spawn saw it gone
    alive: bool = True  # False once its event channel hung up (everything it sent has been read)
    forks: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    waiters: dict[int, tuple[ForkedDm, ExitCallback]] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def on_exit(self, dm: ForkedDm, callback: ExitCallback) -> None:
        if dm.pid in self.statuses:
            dm.returncode = self.statuses.pop(dm.pid)
            callback(dm.returncode)
        elif not self.alive:
            callback(None)
        else:
            self.waiters[dm.pid] = (dm, callback)

    def read_events(self) -> None:
        """Every event waiting on the channel (non-blocking); a hang-up means the zygote is gone."""
        while self.alive:
            try:
                data = self.ev.recv(zw.MAX_MESSAGE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._gone()
                return
            try:
                m = zw.decode(data)
            except zw.ZygoteProtocolError as e:
                log.error("zygote pid %d: %s; ignoring the event", self.pid, e)
                continue
            if not isinstance(m, zw.Exited):
                log.error("zygote pid %d sent %s on its event channel; ignored", self.pid, type(m).__name__)
                continue
            w = self.waiters.pop(m.pid, None)
            if w is None:
                self.statuses[m.pid] = m.returncode
            else:
                w[0].returncode = m.returncode
                w[1](m.returncode)

    def _gone(self) -> None:
        self.alive = False
        self.usable = False
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(2.0)  # its channel closed because it exited: this is quick
        log.warning("DM zygote pid %d exited (%s) after %d forks", self.pid, self.popen.returncode, self.forks)
        waiters, self.waiters = self.waiters, {}
        for _dm, cb in waiters.values():
            cb(None)

    def close(self) -> None:
        for s in (self.req, self.ev):
            s.close()


def _log_restart_failure(fut: asyncio.Future[ZygoteProcess]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("restarting the DM zygote failed: %s", fut.exception())


class ForkServer:
    """The current zygote, restarted when it dies; :meth:`spawn` forks a DM from it."""

    def __init__(self, command: Sequence[str] | None = None, ready_timeout: float = 30.0,
                 request_timeout: float = 10.0) -> None:
        self.command = list(command or ZYGOTE_COMMAND)
        self.ready_timeout = ready_timeout
        self.request_timeout = request_timeout
        self.current: ZygoteProcess | None = None
        self.restarts = 0  # zygotes started after the first
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = 0
        self._quick_deaths = 0
        self._restart_handle: asyncio.TimerHandle | None = None
        self._closed = False

    # ------------------------------------------------------------------------------------------ lifecycle

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the event channels on ``loop`` from now on (call on the loop thread)."""
        self._loop = loop
        if self.current is not None:
            self._watch(self.current)

    def _watch(self, zy: ZygoteProcess) -> None:
        if self._loop is None or self._closed:
            return
        self._loop.add_reader(zy.ev, self._on_event, zy)

    def _on_event(self, zy: ZygoteProcess) -> None:
        zy.read_events()
        if zy.alive:
            return
        assert self._loop is not None
        self._loop.remove_reader(zy.ev)
        zy.close()
        if self._closed or zy is not self.current:
            return
        # Start the next one now, so that the next guest does not wait for it; back off if they die young.
        quick = time.monotonic() - zy.started < 1.0
        self._quick_deaths = self._quick_deaths + 1 if quick else 0
        delay = 0.0 if not self._quick_deaths else min(5.0, 0.1 * 2 ** self._quick_deaths)
        self._restart_handle = self._loop.call_later(delay, self._restart_in_background)

    def _restart_in_background(self) -> None:
        self._restart_handle = None
        if self._loop is not None and not self._closed:
            fut = self._loop.run_in_executor(None, self.ensure)
            fut.add_done_callback(_log_restart_failure)

    def ensure(self) -> ZygoteProcess:
        """The running zygote, started (blocking, up to ``ready_timeout``) if there is none or it died."""
        with self._lock:
            return self._ensure_locked()

    def _ensure_locked(self) -> ZygoteProcess:
        if self._closed:
            raise ZygoteError("the fork server is closed")
        zy = self.current
        if zy is not None and zy.usable and zy.alive and zy.popen.poll() is None:
            return zy
        if zy is not None:
            zy.usable = False
            self.restarts += 1
        zy = self._start()
        self.current = zy
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._watch, zy)
        return zy

    def _start(self) -> ZygoteProcess:
        t0 = time.monotonic()
        req, req_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ev, ev_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            argv = [*self.command, "--request-fd", str(req_child.fileno()), "--event-fd", str(ev_child.fileno()),
                    "--cmdline-room", " " * CMDLINE_ROOM]
            popen = subprocess.Popen(argv, pass_fds=(req_child.fileno(), ev_child.fileno()), close_fds=True,
                                     stdin=subprocess.DEVNULL, start_new_session=True, cwd="/")
        except OSError as e:
            for s in (req, ev):
                s.close()
            raise ZygoteError(f"cannot start the DM zygote: {e}") from None
        finally:
            req_child.close()
            ev_child.close()
        zy = ZygoteProcess(popen, req, ev)
        try:
            req.settimeout(self.ready_timeout)
            data = req.recv(zw.MAX_MESSAGE)
            if not data:
                raise ZygoteError(f"the DM zygote exited during startup ({popen.wait(5)})")
            m = zw.decode(data)
            if not isinstance(m, zw.Ready) or m.pid != popen.pid:
                raise ZygoteError(f"the DM zygote said {m!r} instead of ready")
        except (OSError, zw.ZygoteProtocolError, subprocess.TimeoutExpired) as e:
            popen.kill()
            popen.wait()
            zy.close()
            raise ZygoteError(f"the DM zygote did not come up: {e}") from None
        except BaseException:
            popen.kill()
            popen.wait()
            zy.close()
            raise
        req.settimeout(self.request_timeout)
        log.info("DM zygote pid %d ready in %.0f ms", popen.pid, (time.monotonic() - t0) * 1e3)
        return zy

    def detach(self) -> None:
        """Stop reading the event channels and restarting zygotes (call on the loop thread, before close)."""
        self._closed = True
        if self._restart_handle is not None:
            self._restart_handle.cancel()
            self._restart_handle = None
        zy = self.current
        if self._loop is not None and zy is not None and zy.alive:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(zy.ev)
        self._loop = None

    def close(self) -> None:
        """Stop the zygote (the DMs it forked keep running; their exit statuses are then unknown). Blocking; with
        a loop attached, :meth:`detach` on the loop thread first."""
        with self._lock:
            self._closed = True
            zy, self.current = self.current, None
        if zy is None:
            return
        zy.close()  # EOF on its request channel: it exits
        try:
            zy.popen.wait(5.0)
        except subprocess.TimeoutExpired:
            zy.popen.kill()
            zy.popen.wait()

    # ------------------------------------------------------------------------------------------------ spawn

    def spawn(self, args: Sequence[str], pass_fds: Sequence[int], log_fd: int, *,
              pid_ns: bool = False) -> ForkedDm:
        """Fork a DM running ``daemon.dm.main(args)`` with ``pass_fds`` at the same numbers and ``log_fd`` as its
        stdout/stderr (what ``Popen(pass_fds=..., stdout=log, stderr=log)`` of ``python -m daemon.dm`` gives an
        exec'd one); with ``pid_ns`` as pid 1 of a new pid namespace of its own (a jailed DM: its jail then forks
        no keeper, daemon/jail.py step 10, and the returned pid is the DM's). Blocking; retried once on a new
        zygote if the current one turns out to be dead."""
        fds = list(dict.fromkeys([*pass_fds, log_fd]))
        with self._lock:
            for attempt in (1, 2):
                zy = self._ensure_locked()
                try:
                    return self._spawn_on(zy, list(args), fds, fds.index(log_fd), pid_ns)
                except (ConnectionError, EOFError) as e:
                    zy.usable = False
                    if attempt == 2:
                        raise ZygoteError(f"the DM zygote died during the spawn: {e}") from None
                    log.warning("DM zygote pid %d gone (%s); retrying on a new one", zy.pid, e)
        raise AssertionError("unreachable")

    def _spawn_on(self, zy: ZygoteProcess, args: list[str], fds: list[int], log_index: int,
                  pid_ns: bool) -> ForkedDm:
        self._ids += 1
        rid = self._ids
        send_with_fds(zy.req, zw.encode(zw.Spawn(rid, args, fds, log_index, pid_ns)), fds)
        try:
            data, got, _trunc = recv_with_fds(zy.req, zw.MAX_MESSAGE, 1)
        except TimeoutError:
            zy.usable = False  # it may still answer later: a reply out of turn would pair with the next request
            raise ZygoteError(f"the DM zygote did not answer a spawn within {self.request_timeout:g} s") from None
        if not data:
            for fd in got:
                os.close(fd)
            raise EOFError("request channel closed")
        try:
            m = zw.decode(data, len(got))
        except zw.ZygoteProtocolError as e:
            for fd in got:
                os.close(fd)
            zy.usable = False
            raise ZygoteError(f"the DM zygote answered outside its protocol: {e}") from None
        if isinstance(m, zw.SpawnError) and m.id == rid:
            raise ZygoteError(f"the DM zygote could not fork: {m.error}")
        if not isinstance(m, zw.Spawned) or m.id != rid:
            for fd in got:
                os.close(fd)
            zy.usable = False
            raise ZygoteError(f"the DM zygote answered {m!r} to spawn #{rid}")
        zy.forks += 1
        os.set_inheritable(got[0], False)  # SCM_RIGHTS installs it without O_CLOEXEC
        return ForkedDm(m.pid, got[0], zy)

    # ----------------------------------------------------------------------------------- without a loop

    def wait_exit(self, dm: ForkedDm, timeout: float) -> int | None:
        """Blocking, for callers without an event loop (tests): the DM's returncode once its zygote reports it;
        None if the zygote died first. TimeoutError after ``timeout``."""
        result: list[int | None] = []
        dm.when_reaped(result.append)
        deadline = time.monotonic() + timeout
        zy = dm.zygote
        while not result:
            left = deadline - time.monotonic()
            if left <= 0:
                zy.waiters.pop(dm.pid, None)
                raise TimeoutError(f"no exit report for pid {dm.pid} within {timeout:g} s")
            select.select([zy.ev], [], [], left)
            zy.read_events()
        return result[0]
