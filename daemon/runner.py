"""`kvmdm run`: boot one guest in the foreground with its serial console on this terminal.

For debugging and for the README demo. No daemon, no jail: the guest runs in this process (the daemon's
device-model processes use the same daemon.vmm recipe, jailed). Exit status: the guest's isa-debug-exit value
(0 = success) or 0 for a plain power-off; 3 guest reset; 4 guest crash; 1 host-side error; 2 usage.
Ctrl-A x quits (as in QEMU) when the console is a terminal.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import select
import sys
import termios
import time
import tty

from daemon.messages import ExitCode
from kvmcore.kvm import KvmError
from kvmcore.loader.errors import LoaderError
from kvmcore.memory import GuestMemoryError
from kvmcore.vcpu_loop import StopReason

# The DM's exit codes (daemon.messages), which `kvmdm run` shares.
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_RESET, EXIT_CRASH = (ExitCode.STOPPED, ExitCode.ERROR, ExitCode.USAGE,
                                                          ExitCode.RESET, ExitCode.CRASHED)
_SIZE = re.compile(r"^(\d+)([KMG]?)i?B?$", re.I)


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


class _FdSink:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmdm run", description="Boot a guest in the foreground (no daemon).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--kernel", help="multiboot ELF or Linux bzImage")
    src.add_argument("--demo", action="store_true", help="the embedded demo guest (built from guests/src)")
    p.add_argument("--initrd", help="initrd for a Linux kernel")
    p.add_argument("--cmdline", default="", help="kernel command line")
    p.add_argument("--mem", type=parse_size, default=128 << 20, help="guest RAM (default 128M)")
    p.add_argument("--vcpus", type=int, default=1, choices=range(1, 33), metavar="N", help="vCPUs (1-32)")
    p.add_argument("--timeout", type=float, default=0, help="stop the guest after this many seconds")
    p.add_argument("--stats", action="store_true", help="print exit counts when the guest stops")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise LoaderError(f"cannot read {what} {path}: {e.strerror}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="kvmdm: %(levelname)s %(name)s: %(message)s")
    from daemon.vmm import KernelFormatError, MachineConfig, Vmm  # after arg parsing: fast --help

    vmm = None
    try:
        if args.demo:
            from kvmcore.util.guest_build import GuestBuildError, build_demo

            try:
                kernel = build_demo().read_bytes()
            except GuestBuildError as e:
                raise LoaderError(f"cannot build the demo guest: {e}") from None
        else:
            kernel = _read_file(args.kernel, "kernel")
        initrd = _read_file(args.initrd, "initrd") if args.initrd else None
        cfg = MachineConfig(mem_size=args.mem, vcpus=args.vcpus, kernel=kernel, cmdline=args.cmdline,
                            initrd=initrd)
        vmm = Vmm(cfg, serial_sink=_FdSink(sys.stdout.fileno())).build()
        vmm.finish()
        vmm.start()
        reason = _console_loop(vmm, args.timeout)
        vmm.stop(reason)
        if args.stats:
            counts = ", ".join(f"{k}={v}" for k, v in sorted(vmm.exit_counts().items()))
            print(f"kvmdm: exits: {counts}", file=sys.stderr)
        if reason.kind != "poweroff" or args.verbose:
            print(f"kvmdm: {reason.message}", file=sys.stderr)
        return stop_exit_code(reason)
    except (KvmError, LoaderError, KernelFormatError, GuestMemoryError, ValueError) as e:
        print(f"kvmdm: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if vmm is not None:
            vmm.close()


def _console_loop(vmm: object, timeout: float) -> StopReason:
    """Forward stdin to the UART until the guest stops; Ctrl-A x quits when stdin is a terminal."""
    from daemon.vmm import Vmm

    assert isinstance(vmm, Vmm)
    fd = sys.stdin.fileno() if sys.stdin and not sys.stdin.closed else -1
    is_tty = fd >= 0 and os.isatty(fd)
    saved = termios.tcgetattr(fd) if is_tty else None
    deadline = time.monotonic() + timeout if timeout > 0 else None
    pending = b""
    escape = False
    try:
        if is_tty:
            tty.setraw(fd)
        while True:
            reason = vmm.wait(0.02 if pending else 0.0)
            if reason is not None:
                return reason
            if deadline is not None and time.monotonic() > deadline:
                return StopReason("host", f"stopped after --timeout {timeout:g} s")
            if pending:
                pending = pending[vmm.serial_input(pending):]
                continue
            if fd < 0:
                vmm.wait(0.1)
                continue
            r, _, _ = select.select([fd], [], [], 0.1)
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
