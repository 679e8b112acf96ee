"""Supervision of a guest's daemon-managed vhost-user back-ends (the processes themselves: daemon.backends).

Started with the DM (daemon.supervision.spawn passes each connected socket as the disk's or nic's fd), watched
with their own pidfds, stopped with the DM. A back-end that dies while its guest runs is restarted under the
guest's restart policy and limits (:mod:`daemon.supervision.restart`, per back-end) and its new connection handed
to the running DM by ``attach_backend`` (an fd over the control socket): the guest is not rebooted. A back-end that
cannot be restarted is marked ``failed``; the DM's front-end then puts the device in NEEDS_RESET (see
pv.vhost_user.frontend) and the DM keeps running.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable

from daemon import backends as bk
from daemon import messages as msg
from daemon.supervision import pidwatch
from daemon.supervision.errors import SupervisorError
from daemon.supervision.link import ControlLink
from daemon.supervision.restart import RestartPolicy
from daemon.supervision.settings import SupervisorConfig
from daemon.supervision.state import Guest

log = logging.getLogger("daemon.supervisor")


class BackendSupervisor:
    def __init__(self, cfg: SupervisorConfig, link: ControlLink, uid_for: Callable[[Guest], int | None],
                 closing: Callable[[], bool]) -> None:
        self.cfg = cfg
        self.link = link
        self._uid_for = uid_for
        self._closing = closing

    def policy(self, g: Guest) -> RestartPolicy:
        return RestartPolicy.for_guest(g.definition, self.cfg.backoff_initial, self.cfg.backend_backoff_max,
                                       immediate_first=True)

    # ---------------------------------------------------------------------------------------------- watching

    def watch(self, g: Guest, b: bk.Backend) -> None:
        assert b.pid is not None
        b.pidfd = os.pidfd_open(b.pid)
        self._register(g, b)

    def _register(self, g: Guest, b: bk.Backend) -> None:
        assert b.pidfd is not None
        b.generation += 1
        b.state = "running"
        pidwatch.watch(b.pidfd, self._on_pidfd, g, b, b.generation)

    def adopt(self, g: Guest) -> None:
        """After a daemon restart: find the guest's managed back-ends by their pid files (cmdline checked)."""
        rdir, sdir = self.cfg.paths.guest_runtime_dir(g.name), self.cfg.paths.guest_state_dir(g.name)
        g.backends = []
        for spec in bk.specs_for(g.definition):
            if not spec.managed:
                continue
            b = bk.Backend(spec, rdir, sdir)
            rec = bk.read_pid_file(b)
            if rec is None:
                continue  # never started (guest was not running)
            pid, b.restarts, b.tap = rec
            g.backends.append(b)
            pidfd = pidwatch.open_verified(pid, functools.partial(bk.is_our_backend, b=b))
            if pidfd is None:
                continue
            b.pid, b.pidfd = pid, pidfd
            self._register(g, b)

    def _on_pidfd(self, g: Guest, b: bk.Backend, gen: int) -> None:
        if b.pidfd is None or gen != b.generation:
            return
        pidwatch.unwatch(b.pidfd)
        b.pidfd = None
        if b.popen is not None:
            rc, killed = pidwatch.reap(b.popen, "back-end")
            reason = killed or f"back-end exited with status {rc}"
        else:
            reason = "back-end exited (status unknown: not our child since a daemon restart)"
        b.popen = None
        if b.stop_requested or b not in g.backends:
            return
        g.note(f"{b.spec.kind} back-end {b.spec.device} pid {b.pid}: {reason}")
        self.failed(g, b, reason)

    # ----------------------------------------------------------------------------------------------- restart

    def failed(self, g: Guest, b: bk.Backend, reason: str) -> None:
        """A back-end died (or could not be restarted) while its guest runs: restart it per the guest's policy
        and limits, or give up (the DM's device then goes to NEEDS_RESET after its grace period)."""
        b.pid = None
        b.last_exit_reason = reason
        if self._closing() or b.stop_requested or g.stop_requested or not g.live:
            b.state = "stopped"
            return
        policy = self.policy(g)
        if not policy.wants_restart(failure=True):
            b.state = "failed"
            g.note(f"back-end {b.spec.device} not restarted (restart policy {policy.policy!r})")
            return
        delay = policy.next_delay(b.restart_times, time.monotonic())
        if delay is None:
            b.state = "failed"
            b.last_exit_reason = policy.limit_message(reason)
            g.note(f"back-end {b.spec.device}: restart limit reached; giving up")
            return
        b.restarts += 1
        b.state = "restarting"
        g.note(f"restarting back-end {b.spec.device} in {delay:.2f} s (restart #{b.restarts})")
        b.task = asyncio.ensure_future(self._restart(g, b, delay))

    async def _restart(self, g: Guest, b: bk.Backend, delay: float) -> None:
        await asyncio.sleep(delay)
        b.task = None
        if b.state != "restarting" or b.stop_requested or b not in g.backends:
            return
        try:
            sock = await asyncio.to_thread(bk.spawn, b, self.cfg.backend_command, self._uid_for(g),
                                           self.cfg.backend_ready_timeout)
        except (bk.BackendStartError, OSError) as e:
            g.note(f"back-end {b.spec.device}: restart failed: {e}")
            self.failed(g, b, f"restart failed: {e}")
            return
        with sock:
            if b.stop_requested or b not in g.backends:  # the guest stopped meanwhile
                self.end(b)
                return
            self.watch(g, b)
            gen = b.generation
            bk.write_pid_file(b)
            try:
                res = await self.link.call(g, msg.AttachBackend(b.spec.device), fd=sock.fileno())
            except SupervisorError as e:
                g.note(f"back-end {b.spec.device}: re-attach to the DM failed: {e}")
                if b.generation != gen or b.pidfd is None or b.stop_requested:
                    return  # it died meanwhile and its pidfd handler already applied the policy
                self.end(b)  # a back-end the DM cannot use is a failed one: policy and limits decide
                b.stop_requested = False
                self.failed(g, b, f"re-attach to the DM failed: {e}")
                return
        g.note(f"back-end {b.spec.device} pid {b.pid} re-attached to the DM "
               f"({'rings resumed' if res.resumed else 'no rings resumed'})")

    # -------------------------------------------------------------------------------------------------- stop

    def end(self, b: bk.Backend) -> None:
        """Kill ``b`` (pidfd or our child), reap it, remove its runtime files and, for net, its tap."""
        b.stop_requested = True
        if b.task is not None:
            b.task.cancel()
            b.task = None
        bk.kill(b)
        if b.pidfd is not None:
            pidwatch.unwatch(b.pidfd)
            b.pidfd = None
        b.popen, b.pid = None, None
        bk.remove_files(b)
        if b.tap is not None:
            from daemon import net as dnet

            try:
                dnet.remove_tap(b.tap)
            except Exception as e:  # noqa: BLE001 - NetError, NetlinkError, OSError: logged, cleanup goes on
                log.warning("back-end %d: cannot remove tap %s: %s", b.spec.device, b.tap, e)
        if b.state != "failed":
            b.state = "stopped"

    def end_all(self, g: Guest) -> None:
        """The DM is gone (or never came up): its back-ends go too (they serve no one else)."""
        for b in g.backends:
            self.end(b)

    def detach_all(self, g: Guest) -> None:
        """Daemon exit: stop watching, leave the back-ends running with the DM; the next daemon adopts them
        (pid files)."""
        for b in g.backends:
            if b.task is not None:
                b.task.cancel()
            if b.pidfd is not None:
                pidwatch.unwatch(b.pidfd)
                b.pidfd = None
            if b.pid is not None:
                try:
                    bk.write_pid_file(b)
                except OSError:
                    pass
