"""The per-guest device-model process: `python -m daemon.dm --control-fd C --definition-fd D ...`.

Spawned by kvmdmd with only the fds it needs (see daemon.supervisor for the argv contract). Order of work:

1. parse argv and the definition (from the daemon, but validated again: the DM trusts nobody's bytes);
   read the kernel/initrd images from their fds; import every module it will ever use (the jail has no files);
2. create guest RAM (memfd_create is not in the jailed policy) and the control server (socketpair);
3. enter the jail (daemon.jail): namespaces, empty root, unprivileged uid, no caps, no_new_privs, seccomp.
   an exec'd DM's enter_jail forks into the new pid namespace (a zygote-forked one is born pid 1 of its own
   and does not fork, daemon/jail.py step 10), and KVM binds a VM to the mm of the process that created it,
   so **the VM is created after the jail**, on the inherited /dev/kvm fd; guest memory (MAP_SHARED) survives
   the fork and is mapped into the VM from the jailed child;
4. build the VM, start the vCPUs; the main thread serves the control socket until the guest stops;
5. exit with the contract's status: 0 powered off/stopped, 3 reset requested, 4 guest crashed, 1 DM error.
Nothing the guest controls is read before step 3 finishes: the guest has not run yet.
"""

from __future__ import annotations

import argparse
import encodings.idna  # noqa: F401
import json
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

# Imported up front on purpose: the jail has no filesystem, so nothing may be imported lazily after step 3
# (the virtio modules a guest's devices need are imported by daemon.builder.preload_for, still before the jail).
import daemon.vmm  # noqa: F401
from daemon import messages as msg
from daemon.builder import GuestResources, build_vm, guest_memory, preload_for
from daemon.config import ConfigError, GuestDefinition, parse_definition
from daemon.control import ControlServer, typed_fd_handler, typed_handler
from daemon.messages import DmState, ExitCode
from daemon.vmm import Vmm
from kvmcore.firmware import MAX_OPTION_ROM, FirmwareError, legacy_rom_image
from kvmcore.kvm import Kvm, KvmError
from kvmcore.loader.errors import LoaderError
from kvmcore.memory import GuestMemory
from kvmcore.vcpu_loop import StopReason, install_kick_handler

log = logging.getLogger("kvmdm.dm")

# Wall clock when every import was done: the start of the startup timeline logged once the vCPUs run
# (bench/daemon.py reads it to split create->first-serial-byte into DM startup and guest boot).
T_IMPORTED = time.time()
CONSOLE_CAP = 8 << 20
# CPU seconds of this DM spent before the last fork (the jail's keeper fork, daemon/jail.py step 10, leaves that
# part on the keeper's account): recorded by an at-fork hook, inherited by the child, so that the timeline's cpu_ms is the
# DM's whole startup cost (bench/daemon.py). The keeper's own work after that fork is not in it.
_cpu = {"at_fork": 0.0, "inherited": 0.0}


def _before_fork() -> None:
    _cpu["at_fork"] = time.process_time()


def _after_fork_in_child() -> None:
    _cpu["inherited"] += _cpu["at_fork"]


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def startup_begins() -> None:
    """A DM forked by the zygote (daemon.zygote) starts its timeline and CPU account here: what the zygote spent
    importing is not this DM's."""
    global T_IMPORTED
    T_IMPORTED = time.time()
    _cpu["inherited"] = 0.0


def cpu_ms() -> float:
    return (_cpu["inherited"] + time.process_time()) * 1e3


class CappedFdSink:
    """Console output to the daemon's log file, capped so a chatty guest cannot fill the host's disk."""

    def __init__(self, fd: int, cap: int = CONSOLE_CAP) -> None:
        self.fd = fd
        self.cap = cap
        self.written = 0
        self.dropped = 0
        self.tail = bytearray()

    def write(self, data: bytes) -> None:
        self.tail += data
        if len(self.tail) > 65536:
            del self.tail[: len(self.tail) - 65536]
        room = self.cap - self.written
        if room <= 0:
            self.dropped += len(data)
            return
        chunk = data[:room]
        try:
            self.written += os.write(self.fd, chunk)
        except OSError:
            self.dropped += len(chunk)
        self.dropped += len(data) - len(chunk)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmdm-dm", description="kvmdm per-guest device-model process")
    msg.add_dm_fd_args(p)  # --control-fd ... --nic-rom-fd: daemon.messages.DM_FDS
    jail = p.add_mutually_exclusive_group(required=True)
    jail.add_argument("--no-jail", action="store_true")
    jail.add_argument("--jail-root", type=Path)
    p.add_argument("--uid", type=int)
    p.add_argument("--gid", type=int)
    return p


# Built once at import: constructing it costs ~2 ms, a tenth of a zygote-forked DM's whole startup.
_PARSER = _parser()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return _PARSER.parse_args(argv)


def _read_fd(fd: int, limit: int) -> bytes:
    chunks = []
    total = 0
    while True:
        b = os.read(fd, 1 << 20)
        if not b:
            break
        total += len(b)
        if total > limit:
            raise LoaderError(f"image on fd {fd} is larger than {limit} bytes")
        chunks.append(b)
    os.close(fd)
    return b"".join(chunks)


class DeviceModel:
    def __init__(self, args: argparse.Namespace, definition: GuestDefinition) -> None:
        self.args = args
        self.d = definition
        self.vmm: Vmm | None = None
        self.state = DmState.STARTING
        self.started = time.monotonic()
        self.console = CappedFdSink(args.console_fd)
        self.control: ControlServer | None = None
        self.exit_code = ExitCode.ERROR
        self._pending_input = bytearray()
        self._input_lock = threading.Lock()
        # vhost-user devices in attach order (disks, then nics): the "device" of attach_backend.
        self.vhost_devices: list[Any] = []

    # ---------------------------------------------------------------- control handler (untrusted input)
    def handle(self, req: msg.Command[Any]) -> msg.Reply:
        """One validated control command (daemon.messages' schema; typed_handler decoded and will check the
        reply)."""
        vmm = self.vmm
        if isinstance(req, msg.Ping):
            return msg.Pong()
        if isinstance(req, msg.GetStats):
            return self.stats()
        if vmm is None:
            raise RuntimeError("the guest is not running yet")
        if isinstance(req, msg.Pause):
            if self.state == DmState.RUNNING:
                if not vmm.pause():
                    raise RuntimeError("vCPUs did not pause within 5 s")
                self._set_state(DmState.PAUSED, "paused by the host")
            return msg.StateReply(self.state)
        if isinstance(req, msg.Resume):
            if self.state == DmState.PAUSED:
                vmm.resume()
                self._set_state(DmState.RUNNING, "resumed by the host")
            return msg.StateReply(self.state)
        if isinstance(req, msg.Stop):
            vmm.state.request_stop(StopReason("host", "stopped by the host"))
            return msg.Ack()
        if isinstance(req, msg.Reset):
            vmm.state.request_stop(StopReason("reset", "reset by the host"))
            return msg.Ack()
        if isinstance(req, msg.ConsoleInput):
            with self._input_lock:
                if len(self._pending_input) + len(req.data) > 65536:
                    raise ValueError("console_input: input buffer full, retry later")
                self._pending_input += req.data
            self._drain_input()
            return msg.ConsoleInputReply(len(req.data))
        raise ValueError(f"unknown command {req.cmd!r}")

    def handle_fd(self, req: msg.AttachBackend, fd: int) -> msg.AttachBackendReply:
        """``attach_backend {"device": i}`` with a connected socket (control.py checked: one fd, a unix stream
        socket, i in 0..63): the daemon restarted that device's back-end; switch the device over to it."""
        sock = socket.socket(fileno=fd)
        dev = None
        try:
            i = req.device
            if not 0 <= i < len(self.vhost_devices):
                raise ValueError(f"attach_backend: no vhost-user device {i} (this guest has "
                                 f"{len(self.vhost_devices)})")
            if self.vmm is None:
                raise RuntimeError("the guest is not running yet")
            dev = self.vhost_devices[i]
            resumed = dev.reattach(sock)
        except BaseException:
            # A re-attach that failed after switching over keeps the socket (its watcher waits on it for the
            # grace period): closing it here left that watcher selecting on a closed fd, and no NEEDS_RESET came.
            if dev is None or dev.sock is not sock:
                sock.close()
            raise
        return msg.AttachBackendReply(i, bool(resumed))

    def stats(self) -> msg.Stats:
        vmm = self.vmm
        devices: dict[str, dict[str, int]] = {"console": {"bytes": self.console.written,
                                                          "dropped": self.console.dropped}}
        exits: dict[str, int] = {}
        if vmm is not None:
            exits = {k: int(v) for k, v in vmm.exit_counts().items()}
            devices["pio_bus"] = {k: int(v) for k, v in vars(vmm.pio.stats).items()}
            devices["mmio_bus"] = {k: int(v) for k, v in vars(vmm.mmio.stats).items()}
            if vmm.serial is not None:
                devices["serial"] = {k: int(v) for k, v in vars(vmm.serial.metrics).items()
                                     if isinstance(v, int)}
        try:
            # Peak RSS (the daemon's /proc reading, Supervisor.dm_rss, is the current figure).
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        except OSError:
            rss = 0
        return msg.Stats(self.state.value, round(time.monotonic() - self.started, 3), exits, devices, rss,
                         self.d.vcpus)

    def _set_state(self, state: DmState, reason: str, guest_status: int | None = None) -> None:
        self.state = state
        if self.control is not None:
            self.control.send_event(state, reason, guest_status)

    def _drain_input(self) -> None:
        if self.vmm is None:
            return
        with self._input_lock:
            if self._pending_input:
                n = self.vmm.serial_input(bytes(self._pending_input))
                del self._pending_input[:n]

    # ---------------------------------------------------------------- main
    def run(self) -> int:
        a, d = self.args, self.d
        kernel = _read_fd(a.kernel_fd, 256 << 20)
        initrd = _read_fd(a.initrd_fd, 1 << 30) if a.initrd_fd is not None else None
        # The daemon checked the file at create (daemon.config); the x86 image is taken from its bytes here.
        nic_rom = (legacy_rom_image(_read_fd(a.nic_rom_fd, MAX_OPTION_ROM), "nic_rom")
                   if a.nic_rom_fd is not None else None)
        mem_size = d.memory_mib << 20
        mem = guest_memory(d, mem_size)  # before the jail: anonymous THP RAM, or a memfd when vhost-user needs it
        self.control = ControlServer(a.control_fd, typed_handler(self.handle), typed_fd_handler(self.handle_fd))
        preload_for(d)
        if not a.no_jail:
            self._enter_jail(mem)
        t_jailed, cpu_jailed = time.time(), cpu_ms()
        if a.no_jail:
            log.warning("running WITHOUT a jail (--no-jail): development only")
        install_kick_handler()
        signal.signal(signal.SIGTERM, lambda *_: self._stop_from_signal())
        signal.signal(signal.SIGINT, lambda *_: self._stop_from_signal())

        # The one recipe (daemon.builder) on the fds the daemon prepared; it owns them from here on.
        res = GuestResources(kernel=kernel, initrd=initrd, disks=list(a.disk_fd), nics=list(a.tap_fd),
                             nic_rom=nic_rom)
        built = build_vm(d, res, kvm=Kvm(fd=a.kvm_fd), serial_sink=self.console, mem=mem,
                         on_device_alert=lambda text: self._set_state(self.state, text))  # shows in /health
        self.vmm = vmm = built.vmm
        self.vhost_devices = built.vhost_devices
        t_built, cpu_built = time.time(), cpu_ms()
        vmm.start()
        log.info("startup timeline (wall clock s): imported=%.6f jailed=%.6f built=%.6f running=%.6f modules=%d "
                 "cpu_ms=%.2f (jailed %.2f, built %.2f)", T_IMPORTED, t_jailed, t_built, time.time(), len(sys.modules),
                 cpu_ms(), cpu_jailed, cpu_built)
        self._set_state(DmState.RUNNING, "guest started")
        reason = None
        while reason is None:
            self.control.poll(0.05)
            self._drain_input()
            reason = vmm.wait(0)
        vmm.stop(reason)
        built.flush_logs()  # the console log gets the last held lines before the daemon sees the exit
        self.exit_code = ExitCode.for_stop(reason.kind)
        self._set_state(self.exit_code.final_state, reason.message,
                        reason.guest_status if self.exit_code == ExitCode.STOPPED else None)
        log.info("guest %s stopped: %s", d.name, reason.message)
        self.control.poll(0.05)  # flush the final event to a connected daemon
        return self.exit_code

    def _stop_from_signal(self) -> None:
        if self.vmm is not None:
            self.vmm.state.request_stop(StopReason("host", "stopped by signal"))
        else:
            sys.exit(ExitCode.STOPPED)

    def _enter_jail(self, mem: GuestMemory) -> None:
        from daemon.jail import JailConfig, Rlimits, enter_jail

        a = self.args
        if a.uid is None or a.gid is None:
            raise ConfigError(["--jail-root needs --uid and --gid"])
        biggest = max([os.fstat(fd).st_size for fd in a.disk_fd] + [0])
        keep = sorted(int(n) for n in os.listdir("/proc/self/fd") if int(n) > 2 or int(n) == 2)
        keep = [fd for fd in keep if _fd_alive(fd)]
        enter_jail(JailConfig(
            root_dir=a.jail_root, uid=a.uid, gid=a.gid, keep_fds=keep,
            # Forked by the zygote for a jailed guest, this DM is pid 1 of a pid namespace made for it before the
            # fork (daemon.zygote); an exec'd DM never is, and its jail makes one and forks a keeper.
            pid_ns_ready=os.getpid() == 1,
            # Writes through passed fds (disk images, console log, dm.log) are bounded by RLIMIT_FSIZE.
            rlimits=Rlimits(fsize=max(biggest, 64 << 20), nofile=4096, nproc=256),
        ))


def _fd_alive(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="kvmdm-dm[%(process)d] %(levelname)s %(message)s")
    try:
        args = parse_args(argv)
        raw = _read_fd(args.definition_fd, 1 << 20)
        definition = parse_definition(json.loads(raw), check_paths=False)
        return DeviceModel(args, definition).run()
    except (ConfigError, LoaderError, FirmwareError, KvmError, ValueError, OSError) as e:
        log.error("device model failed: %s", e)
        return ExitCode.ERROR


if __name__ == "__main__":
    sys.exit(main())
