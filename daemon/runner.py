"""`kvmdm run`: boot one guest in the foreground with its serial console on this terminal.

    kvmdm run guest.json [--mem SIZE] [--vcpus N] [--cmdline TEXT] [--initrd FILE]   # a guest definition
    kvmdm run --kernel guest.elf [--mem ...] | kvmdm run --demo                        # a bare VM

No daemon, no jail: the guest runs in this process, built by the same recipe as the daemon's device models
(daemon.builder.build_vm). The only difference is where the privileged resources come from: the daemon prepares
them for its DMs; here :class:`ForegroundResources` prepares them itself (as root for nics): it opens the disk
images, connects to external vhost-user sockets, starts ``kvmdm-backend`` processes for vhost-user disks and nics
the way the daemon does (daemon.backends, unjailed like this process), creates the taps (daemon.net, named and
marked as the daemon names them, attached to the nic's ``bridge``, created if missing), and removes every one of
them when the guest stops — taps deleted, bridges it created released, back-ends reaped, runtime dir removed —
also on Ctrl-C, SIGTERM, SIGHUP or an error. Nothing is created on the host before the definition, the kernel and
every path in it have been checked. Restart policy and jail settings of a definition do not apply here, and a
back-end that dies is not restarted (its device goes to NEEDS_RESET, reported on stderr).

A guest reset (port 0xcf9, the i8042 reset line, the ACPI reset register) reboots the guest in place, as QEMU does
without ``-no-reboot``: the VM is closed and every host resource of it given back, exactly as when the guest stops,
then the same definition (already read and checked: the same kernel or BIOS bytes) is prepared and built again and
boots from the start — a firmware guest through the BIOS, a kernel guest from its entry point. That is also what
the daemon does for a reset (the DM exits 3 and the supervisor starts a new one), so a guest sees the same machine
after a reboot under both. The console stays this terminal across boots, and ``--timeout`` bounds the whole run.
``--no-reboot`` ends the run at the first reset with exit status 3 instead. A triple fault is a crash (exit 4),
not a reboot (QEMU would reboot): a guest that faults its way into a reset loop is reported, not restarted.

Exit status: the guest's isa-debug-exit value (0 = success) or 0 for a plain power-off; 3 guest reset with
--no-reboot; 4 guest crash; 1 host-side error (also a stop by --timeout, Ctrl-A x or a signal); 2 usage, including a
definition that does not validate or names a file that cannot be used (the message names the file and the field).
Ctrl-A x quits (as in QEMU) when the console is a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import select
import shutil
import signal
import socket
import sys
import tempfile
import termios
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from daemon.config import (
    DEMO_KERNEL,
    SEABIOS,
    ConfigError,
    GuestDefinition,
    firmware_file,
    load_definition_file,
    nic_rom_file,
    parse_definition,
)
from daemon.messages import ExitCode
from kvmcore.kvm import KvmError
from kvmcore.loader.errors import LoaderError
from kvmcore.memory import GuestMemoryError
from kvmcore.vcpu_loop import StopReason

if TYPE_CHECKING:
    from daemon import backends as bk
    from daemon.builder import BuiltVm, GuestResources
    from daemon.vmm import Vmm

# The DM's exit codes (daemon.messages), which `kvmdm run` shares.
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_RESET, EXIT_CRASH = (ExitCode.STOPPED, ExitCode.ERROR, ExitCode.USAGE,
                                                          ExitCode.RESET, ExitCode.CRASHED)
_SIZE = re.compile(r"^(\d+)([KMG]?)i?B?$", re.I)
RUN_NAME = "run"  # the guest name of a bare `--kernel`/`--demo` VM
CAP_NET_ADMIN = 12  # linux/capability.h
BACKEND_STOP_TIMEOUT = 3.0  # seconds a back-end gets to exit on SIGTERM before SIGKILL


def parse_size(text: str) -> int:
    """'128M', '1G', '65536K', '134217728' -> bytes (multiple of 4 KiB)."""
    m = _SIZE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (use e.g. 128M or 1G)")
    value = int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()]
    if m.group(2) == "" and value < 4096:
        value <<= 20  # a bare small number means MiB, like QEMU's -m
    if value < (4 << 20) or value > (256 << 30) or value % 4096:
        raise argparse.ArgumentTypeError(f"memory size {text!r} must be 4 MiB..256 GiB in 4 KiB units")
    return value


def stop_exit_code(reason: StopReason) -> int:
    if reason.kind == "poweroff":
        if reason.guest_status is not None:
            return (reason.guest_status >> 1) & 0xFF  # undo isa-debug-exit's (v << 1) | 1
        return EXIT_OK
    if reason.kind == "reset":
        return EXIT_RESET
    if reason.kind == "crash":
        return EXIT_CRASH
    return EXIT_ERROR


class DefinitionError(Exception):
    """The guest definition (file or flags) is unusable: a usage error (exit 2); the message names the file and
    the field."""


class HostResourceError(Exception):
    """A host resource the definition needs could not be prepared (tap, bridge, back-end): exit 1."""


class Interrupted(Exception):
    """A signal (Ctrl-C, SIGTERM, SIGHUP) arrived before the guest was running."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name} before the guest started")
        self.signum = signum


class _FdSink:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.mid_line = False  # the last byte written is not a newline

    def write(self, data: bytes) -> None:
        if data:
            self.mid_line = not data.endswith(b"\n")
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                select.select([], [self.fd], [], 1.0)
                continue
            except OSError:
                return  # console gone (closed pipe): the guest keeps running, output is dropped
            view = view[n:]


class Signals:
    """SIGINT/SIGTERM/SIGHUP for the foreground run: while resources are being prepared the signal is held
    (:meth:`deferred`) and raised as :class:`Interrupted` between steps, so no tap or back-end is half-made and
    forgotten; once the guest runs, the console loop sees :attr:`received` and stops the guest (then the same
    cleanup runs)."""

    HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: int | None = None
        self.running = False  # the console loop polls .received
        self._defer = 0
        self._saved: dict[int, Any] = {}

    def install(self) -> None:
        for s in self.HANDLED:
            self._saved[s] = signal.signal(s, self._handler)

    def restore(self) -> None:
        for s, h in self._saved.items():
            signal.signal(s, h)
        self._saved.clear()

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        if not self.running and self._defer == 0:
            raise Interrupted(signum)

    def check(self) -> None:
        if self.received is not None and not self.running:
            raise Interrupted(self.received)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._defer += 1
        try:
            yield
        finally:
            self._defer -= 1
        self.check()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvmdm run", description="Boot a guest in the foreground (no daemon).",
        epilog="With a DEFINITION, --mem, --vcpus, --cmdline and --initrd override the file's memory_mib, vcpus, "
               "cmdline and initrd (--mem in whole MiB); everything else comes from the file. Disks and nics are "
               "prepared here (nics need root) and removed when the guest stops. Exit status: the guest's "
               "isa-debug-exit value, 3 reset (with --no-reboot), 4 crash, 1 host error, 2 usage or bad definition. "
               "A guest reset reboots the guest in place unless --no-reboot is given.")
    p.add_argument("definition", nargs="?", metavar="DEFINITION",
                   help="guest definition FILE.json or FILE.toml (the schema of `kvmdm create`)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--kernel", help="multiboot ELF or Linux bzImage (instead of a DEFINITION)")
    src.add_argument("--demo", action="store_true", help="the embedded demo guest (instead of a DEFINITION)")
    src.add_argument("--firmware", metavar="BIOS",
                     help='"seabios" or a BIOS image: boot it from the reset vector (alone, or instead of a '
                          "DEFINITION's kernel: its disks are then the boot devices)")
    p.add_argument("--initrd", help="initrd for a Linux kernel (overrides the definition's)")
    p.add_argument("--cmdline", help="kernel command line (overrides the definition's)")
    p.add_argument("--mem", type=parse_size, help="guest RAM (default 128M; overrides the definition's)")
    p.add_argument("--vcpus", type=int, choices=range(1, 33), metavar="N",
                   help="vCPUs, 1-32 (default 1; overrides the definition's)")
    p.add_argument("--timeout", type=float, default=0,
                   help="stop the guest after this many seconds (of the whole run, reboots included)")
    p.add_argument("--no-reboot", action="store_true",
                   help="exit with status 3 when the guest resets, instead of rebooting it (QEMU's -no-reboot)")
    p.add_argument("--stats", action="store_true", help="print exit counts when the guest stops")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise LoaderError(f"cannot read {what} {path}: {e.strerror}") from None


# --------------------------------------------------------------------------------------------- the definition
def load_definition(args: argparse.Namespace) -> tuple[GuestDefinition, int | None]:
    """The validated definition of this run and, for a bare VM, its exact RAM size in bytes.

    A DEFINITION file is read with daemon.config.load_definition_file, the command-line overrides are put in
    the raw document and the whole is validated once (paths checked), like ``kvmdm create``. Raises
    :class:`DefinitionError`.
    """
    raw: dict[str, Any]
    if args.definition is None and args.firmware is not None:
        raw = {"name": RUN_NAME, "firmware": _firmware_arg(args.firmware)}
        if args.vcpus is not None:
            raw["vcpus"] = args.vcpus
        if args.mem is not None:
            if args.mem % (1 << 20):
                raise DefinitionError(f"--mem: a firmware guest's memory is a whole number of MiB, got {args.mem}")
            raw["memory_mib"] = args.mem >> 20
        try:
            d = parse_definition(raw, check_paths=True)  # the image is checked before anything starts
        except ConfigError as e:
            raise DefinitionError("; ".join(_flag_names(e.errors, args))) from None
        return d, None
    if args.definition is None:
        raw = {"name": RUN_NAME, "kernel": DEMO_KERNEL if args.demo else os.path.abspath(args.kernel),
               "cmdline": args.cmdline or ""}
        if args.vcpus is not None:
            raw["vcpus"] = args.vcpus
        if args.initrd is not None:
            raw["initrd"] = os.path.abspath(args.initrd)
        try:
            # Paths unchecked: an unreadable --kernel stays the host error (exit 1) it always was.
            d = parse_definition(raw, check_paths=False)
        except ConfigError as e:
            raise DefinitionError("; ".join(_flag_names(e.errors, args))) from None
        return d, args.mem if args.mem is not None else 128 << 20
    path = args.definition
    try:
        raw = load_definition_file(path)
    except OSError as e:
        raise DefinitionError(f"{path}: cannot read the definition: {e.strerror or e}") from None
    except ConfigError as e:
        raise DefinitionError("; ".join(e.errors)) from None  # already names the file
    if args.mem is not None:
        if args.mem % (1 << 20):
            raise DefinitionError(f"--mem: a definition's memory is a whole number of MiB, got {args.mem} bytes")
        raw["memory_mib"] = args.mem >> 20
    for key, value in (("vcpus", args.vcpus), ("cmdline", args.cmdline)):
        if value is not None:
            raw[key] = value
    if args.initrd is not None:
        raw["initrd"] = os.path.abspath(args.initrd)  # relative to where the command runs, not to the file
    if args.firmware is not None:
        raw["firmware"] = _firmware_arg(args.firmware)
        for key in ("kernel", "initrd", "cmdline"):
            raw.pop(key, None)
    try:
        d = parse_definition(raw, check_paths=True)
    except ConfigError as e:
        raise DefinitionError("; ".join(f"{path}: {err}" for err in _flag_names(e.errors, args))) from None
    return d, None


_OVERRIDES = {"memory_mib": "mem", "vcpus": "vcpus", "cmdline": "cmdline", "initrd": "initrd", "firmware": "firmware"}


def _firmware_arg(value: str) -> str:
    return value if value == SEABIOS else os.path.abspath(value)


def _flag_names(errors: list[str], args: argparse.Namespace) -> list[str]:
    """Say which errors came from a command-line override rather than the file."""
    out = []
    for err in errors:
        field = err.split(":", 1)[0]
        flag = _OVERRIDES.get(field)
        if flag is not None and getattr(args, flag) is not None:
            err = f"{err} (from --{flag})"
        out.append(err)
    return out


def read_nic_rom(d: GuestDefinition, *, source: str | None) -> bytes | None:
    """A firmware guest's virtio-net option ROM (its x86 image), checked before anything is made."""
    if d.nic_rom is None:
        return None
    from kvmcore.firmware import FirmwareError, load_option_rom

    try:
        return load_option_rom(nic_rom_file(d.nic_rom))
    except FirmwareError as e:
        raise DefinitionError(f"{source or 'definition'}: nic_rom: {e}") from None


def read_kernel(d: GuestDefinition, *, source: str | None) -> tuple[bytes, bytes | None]:
    """Kernel and initrd bytes; for a definition file ``source`` the kernel's format is checked here, before
    any host resource is made (a bare --kernel fails later, as a host error, as it always did)."""
    from daemon.vmm import KernelFormatError, detect_kernel_format

    if d.firmware is not None:
        from kvmcore.firmware import FirmwareError, load_bios

        try:
            return load_bios(firmware_file(d.firmware)), None  # the BIOS goes where the kernel would
        except FirmwareError as e:
            raise DefinitionError(f"{source or '--firmware'}: firmware: {e}") from None
    if d.kernel == DEMO_KERNEL:
        from kvmcore.util.guest_build import GuestBuildError, build_demo

        try:
            kernel = build_demo().read_bytes()
        except GuestBuildError as e:
            raise LoaderError(f"cannot build the demo guest: {e}") from None
    else:
        kernel = _read_file(d.kernel, "kernel")
    initrd = _read_file(d.initrd, "initrd") if d.initrd else None
    if source is not None:
        try:
            detect_kernel_format(kernel)
        except KernelFormatError as e:
            raise DefinitionError(f"{source}: kernel: {d.kernel}: {e}") from None
    return kernel, initrd


# ------------------------------------------------------------------------------------- host resources (root)
def _link_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _has_cap(cap: int) -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


class ForegroundResources:
    """What a definition needs from the host, prepared by this process and given back by :meth:`close`.

    :meth:`preflight` checks everything it can without changing the host; :meth:`acquire` then opens images and
    connects sockets first (nothing on the host changes), starts back-ends, and creates taps last. Every tap and
    bridge is recorded *before* it is created, so :meth:`close` removes it even if its creation was cut short.
    ``net``/``backends``/``backend_command`` are injectable for the unit tests.
    """

    def __init__(self, d: GuestDefinition, *, net: Any = None, backends: Any = None,
                 backend_command: list[str] | None = None, ready_timeout: float | None = None,
                 signals: Signals | None = None, source: str | None = None,
                 sys_class_net: Path = Path("/sys/class/net")) -> None:
        from daemon import backends as bk_mod

        self.d = d
        self.bk = backends or bk_mod
        self._net = net
        self.backend_command = backend_command or list(self.bk.BACKEND_COMMAND)
        self.ready_timeout = ready_timeout if ready_timeout is not None else self.bk.READY_TIMEOUT
        self.signals = signals or Signals()
        self.sys_class_net = sys_class_net
        self.source = source  # the definition file, named in every DefinitionError
        self.fds: list[int] = []  # opened and not yet handed to the builder
        self.taps: list[str] = []  # taps this run creates (never one that existed before it)
        self.bridges: list[str] = []  # bridges this run creates
        self.backends: list[bk.Backend] = []
        self.rdir: Path | None = None
        self.closed = False

    def _bad(self, message: str) -> DefinitionError:
        return DefinitionError(f"{self.source}: {message}" if self.source else message)

    @property
    def net(self) -> Any:
        if self._net is None:
            from daemon import net as dnet  # lazy: pyroute2 only for guests with nics

            self._net = dnet
        return self._net

    def _tap_name(self, i: int) -> str:
        nic = self.d.nics[i]
        return nic.tap if nic.tap is not None else str(self.net.tap_name(self.d.name, i))

    # ------------------------------------------------------------------ checks (the host is not changed)
    def preflight(self) -> None:
        d = self.d
        if not d.nics:
            return
        if not _has_cap(CAP_NET_ADMIN):
            raise HostResourceError("nics[0]: creating a tap needs root (CAP_NET_ADMIN); run as root or drop "
                                    "the nics from the definition")
        if not os.path.exists("/dev/net/tun"):
            raise HostResourceError("nics[0]: /dev/net/tun does not exist (modprobe tun)")
        seen: dict[str, int] = {}
        for i, nic in enumerate(d.nics):
            name = self._tap_name(i)
            if name in seen:
                raise self._bad(f"nics[{i}].tap: {name} is also nics[{seen[name]}]'s tap")
            seen[name] = i
            if _link_exists(name) and not (self.sys_class_net / name / "tun_flags").exists():
                raise self._bad(f"nics[{i}].tap: {name} exists and is not a tap")
            if nic.bridge is not None:
                if nic.bridge in seen:
                    raise self._bad(f"nics[{i}].bridge: {nic.bridge} is also a tap of this guest")
                if _link_exists(nic.bridge) and not (self.sys_class_net / nic.bridge / "bridge").is_dir():
                    raise self._bad(f"nics[{i}].bridge: {nic.bridge} exists and is not a bridge")

    # ------------------------------------------------------------------ acquisition
    def _keep(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def _runtime_dir(self) -> Path:
        if self.rdir is None:
            self.rdir = Path(tempfile.mkdtemp(prefix="kvmdm-run-"))
        return self.rdir

    def acquire(self, kernel: bytes, initrd: bytes | None) -> GuestResources:
        """Every fd of the definition, in definition order (daemon.builder.GuestResources)."""
        from daemon.builder import GuestResources

        d, sig = self.d, self.signals
        specs = self.bk.specs_for(d)  # the DM's vhost-user order: disks, then nics
        blk_specs = iter(s for s in specs if s.kind == "blk")
        net_specs = {s.nic_index: s for s in specs if s.kind == "net"}
        disks: list[int | None] = [None] * len(d.disks)
        managed: list[tuple[int, bk.BackendSpec]] = []
        # 1. Images and external sockets: nothing on the host changes.
        for i, disk in enumerate(d.disks):
            with sig.deferred():
                if disk.backend != "vhost-user":
                    flags = (os.O_RDONLY if disk.read_only else os.O_RDWR) | os.O_CLOEXEC
                    try:
                        disks[i] = self._keep(os.open(disk.path, flags))
                    except OSError as e:
                        raise self._bad(f"disks[{i}].path: cannot open {disk.path}: {e.strerror}") from None
                    continue
                spec = next(blk_specs)
                if spec.managed:
                    managed.append((i, spec))
                    continue
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                try:
                    s.connect(disk.path)
                except OSError as e:
                    s.close()
                    raise self._bad(f"disks[{i}].path: cannot connect to the vhost-user back-end at "
                                    f"{disk.path}: {e.strerror or e}") from None
                disks[i] = self._keep(s.detach())
        # 2. Back-end processes for vhost-user images.
        for i, spec in managed:
            with sig.deferred():
                disks[i] = self._spawn(spec, f"disks[{i}]")
        # 3. Taps (and their bridges, and net back-ends) last.
        nics: list[int] = []
        for i in range(len(d.nics)):
            with sig.deferred():
                nics.append(self._tap(i, net_specs.get(i)))
        self.signals.check()
        fds = [fd for fd in disks if fd is not None]
        assert len(fds) == len(d.disks)
        res = GuestResources(kernel=kernel, initrd=initrd, disks=fds, nics=nics)
        self.fds = []  # the builder owns them now (daemon.builder.build_vm)
        return res

    def _spawn(self, spec: bk.BackendSpec, where: str, tap: str | None = None) -> int:
        rdir = self._runtime_dir()
        b = self.bk.Backend(spec, rdir, rdir, tap=tap, state="starting")
        self.backends.append(b)
        try:
            sock = self.bk.spawn(b, self.backend_command, None, self.ready_timeout)
        except self.bk.BackendStartError as e:
            raise HostResourceError(f"{where}: vhost-user back-end: {e}") from None
        b.state = "running"
        return self._keep(sock.detach())

    def _tap(self, i: int, spec: bk.BackendSpec | None) -> int:
        nic = self.d.nics[i]
        name = self._tap_name(i)
        if nic.bridge is not None and not _link_exists(nic.bridge) and nic.bridge not in self.bridges:
            self.bridges.append(nic.bridge)
        if not _link_exists(name):
            self.taps.append(name)
        try:
            # Persistent for a vhost-user nic, so that its back-end can open it by name; close() removes it.
            ifname, fd = self.net.create_tap(name, bridge=nic.bridge, owner_uid=None, guest=self.d.name, index=i,
                                             persist=spec is not None)
        except (self.net.NetError, OSError, ValueError) as e:
            raise HostResourceError(f"nics[{i}]: {e}") from None
        if spec is None:
            return self._keep(fd)
        os.close(fd)  # a tap without IFF_MULTI_QUEUE takes one fd: the back-end's
        return self._spawn(spec, f"nics[{i}]", ifname)

    # ------------------------------------------------------------------ cleanup
    def close(self) -> list[str]:
        """Stop back-ends, delete the taps and bridges this run created, remove the runtime dir; returns what
        could not be cleaned up (also logged). Idempotent; call after the VM (daemon.builder.BuiltVm) is closed."""
        if self.closed:
            return []
        self.closed = True
        problems: list[str] = []
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []
        for b in self.backends:
            try:
                self._stop_backend(b)
            except Exception as e:  # noqa: BLE001 - cleanup goes on with the next resource
                problems.append(f"back-end {b.spec.device}: {e}")
        for name in self.taps:
            try:
                self.net.remove_tap(name)  # only one marked ours; a non-persistent tap is already gone
            except Exception as e:  # noqa: BLE001 - NetError, NetlinkError, OSError
                problems.append(f"tap {name}: {e}")
        for name in self.bridges:
            try:
                self.net.release_bridge(name)  # only ours, and only once no port is left
            except Exception as e:  # noqa: BLE001
                problems.append(f"bridge {name}: {e}")
        if self.rdir is not None:
            shutil.rmtree(self.rdir, ignore_errors=True)
        for p in problems:
            logging.getLogger("kvmdm.run").error("cleanup: %s", p)
        return problems

    def _stop_backend(self, b: bk.Backend) -> None:
        """SIGTERM (QEMU's back-end convention: exit on SIGTERM), SIGKILL after a grace period, reap, remove its
        files."""
        popen = b.popen
        if popen is not None and popen.poll() is None:
            with contextlib.suppress(OSError):
                popen.terminate()
            try:
                popen.wait(BACKEND_STOP_TIMEOUT)
            except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired
                self.bk.kill(b)
        elif popen is not None:
            popen.wait()
        b.popen, b.pid, b.state = None, None, "stopped"
        self.bk.remove_files(b)


# --------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    given = [x for x, on in (("DEFINITION", args.definition is not None), ("--kernel", args.kernel is not None),
                             ("--demo", args.demo), ("--firmware", args.firmware is not None)) if on]
    if given == ["DEFINITION", "--firmware"]:
        pass  # the firmware replaces the definition's kernel
    elif len(given) != 1:
        parser.error("give one of DEFINITION, --kernel, --demo or --firmware" if not given
                     else f"{' and '.join(given)} cannot be combined")
    elif args.firmware is not None and (args.initrd is not None or args.cmdline is not None):
        parser.error("--initrd and --cmdline do not apply to --firmware (the BIOS boots the disks)")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="kvmdm: %(levelname)s %(name)s: %(message)s")
    signals = Signals()
    signals.install()
    try:
        return _run(args, signals)
    finally:
        signals.restore()


def _run(args: argparse.Namespace, signals: Signals) -> int:
    from daemon.vmm import KernelFormatError

    host: ForegroundResources | None = None
    built: BuiltVm | None = None
    try:
        with signals.deferred():
            d, mem_size = load_definition(args)
            kernel, initrd = read_kernel(d, source=args.definition)
            nic_rom = read_nic_rom(d, source=args.definition)
        sink: _FdSink | None = None
        deadline = time.monotonic() + args.timeout if args.timeout > 0 else None
        boot = 1
        while True:
            with signals.deferred():
                host = ForegroundResources(d, signals=signals, source=args.definition)
                host.preflight()
            sink = sink or _FdSink(sys.stdout.fileno())  # one console for every boot
            built = _build(d, host, kernel, initrd, nic_rom, sink, mem_size, signals)
            reason = _boot(built.vmm, args, signals, deadline)
            if reason.kind != "reset" or args.no_reboot:
                break
            # Reboot in place: give everything back as at a stop, then prepare and build the same guest again.
            print(f"kvmdm: {reason.message}; rebooting (boot {boot + 1})", file=sys.stderr)
            signals.running = True  # held: a signal now stops the run after this cleanup (Interrupted below)
            try:
                _release(built, host)
            finally:
                built = host = None
                signals.running = False
            if sink.mid_line:
                sink.write(b"\n")  # the next boot's output starts a line (the BIOS banner, as in the daemon's log)
            signals.check()
            boot += 1
        if reason.kind != "poweroff" or args.verbose:
            print(f"kvmdm: {reason.message}", file=sys.stderr)
        return stop_exit_code(reason)
    except DefinitionError as e:
        print(f"kvmdm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Interrupted as e:
        print(f"kvmdm: {e}", file=sys.stderr)
        return EXIT_ERROR
    except (HostResourceError, KvmError, LoaderError, KernelFormatError, GuestMemoryError, ValueError,
            OSError) as e:
        print(f"kvmdm: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        # Signals stay held through the cleanup: a second Ctrl-C must not leave a tap or a back-end behind.
        signals.running = True
        _release(built, host)


def _build(d: GuestDefinition, host: ForegroundResources, kernel: bytes, initrd: bytes | None,
           nic_rom: bytes | None, sink: _FdSink, mem_size: int | None, signals: Signals) -> BuiltVm:
    """One boot's VM: the host resources acquired and the VM built, signals held from the first resource until
    the VM owns them all."""
    from daemon.builder import build_vm  # after arg parsing: fast --help

    with signals.deferred():
        res = host.acquire(kernel, initrd)
        res.nic_rom = nic_rom
        return build_vm(d, res, serial_sink=sink, mem_size=mem_size,
                        on_device_alert=lambda text: print(f"kvmdm: {text}", file=sys.stderr))


def _boot(vmm: Vmm, args: argparse.Namespace, signals: Signals, deadline: float | None) -> StopReason:
    """Run the built guest until it stops: power-off, reset, crash, or a stop by the host."""
    signals.running = True
    vmm.start()
    reason = _console_loop(vmm, args.timeout, signals, deadline=deadline)
    vmm.stop(reason)
    if args.stats:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(vmm.exit_counts().items()))
        print(f"kvmdm: exits: {counts}", file=sys.stderr)
    return reason


def _release(built: BuiltVm | None, host: ForegroundResources | None) -> None:
    try:
        if built is not None:
            built.close()
    finally:
        if host is not None:
            host.close()


def _console_loop(vmm: Vmm, timeout: float, signals: Signals | None = None, *,
                  deadline: float | None = None) -> StopReason:
    """Forward stdin to the UART until the guest stops; Ctrl-A x quits when stdin is a terminal. ``deadline``
    (monotonic) is when ``timeout`` runs out; without it the timeout starts now."""
    fd = sys.stdin.fileno() if sys.stdin and not sys.stdin.closed else -1
    is_tty = fd >= 0 and os.isatty(fd)
    saved = termios.tcgetattr(fd) if is_tty else None
    if deadline is None and timeout > 0:
        deadline = time.monotonic() + timeout
    pending = b""
    escape = False
    stopped_by: Callable[[], StopReason | None] = lambda: (  # noqa: E731
        StopReason("host", f"stopped by {signal.Signals(signals.received).name}")
        if signals is not None and signals.received is not None else None)
    try:
        if is_tty:
            tty.setraw(fd)
        while True:
            reason = vmm.wait(0.02 if pending else 0.0)
            if reason is not None:
                return reason
            if (reason := stopped_by()) is not None:
                return reason
            if deadline is not None and time.monotonic() > deadline:
                return StopReason("host", f"stopped after --timeout {timeout:g} s")
            if pending:
                pending = pending[vmm.serial_input(pending):]
                continue
            if fd < 0:
                vmm.wait(0.1)
                continue
            try:
                r, _, _ = select.select([fd], [], [], 0.1)
            except InterruptedError:
                continue
            if not r:
                continue
            data = os.read(fd, 256)
            if not data:
                fd = -1  # EOF on stdin: keep running, stop reading
                continue
            if is_tty:
                out = bytearray()
                for b in data:
                    if escape:
                        escape = False
                        if b in (ord("x"), ord("X")):
                            return StopReason("host", "quit from the console (Ctrl-A x)")
                        if b != 0x01:
                            continue
                    elif b == 0x01:
                        escape = True
                        continue
                    out.append(b)
                data = bytes(out)
            pending = data
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


if __name__ == "__main__":
    sys.exit(main())
