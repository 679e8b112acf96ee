"""Run the Linux test guest (tests.fixtures.linux_guest) under QEMU-TCG: Linux's own virtio drivers as the client.

    status, console = run_linux_tcg(vmlinuz, initrd, extra_args=["-drive", f"file={img},format=raw,if=virtio"])

runs ``qemu-system-x86_64 -accel tcg -m 512 -kernel vmlinuz -initrd initrd -append "console=ttyS0 quiet panic=-1
<append>" -nographic -no-reboot -nodefaults -serial stdio -monitor none <extra_args>`` (no default NIC, VGA or
monitor: the guest sees only the devices a test adds); the guest prints ``GUEST-READY disks=[...] nets=[...]``, runs
its script, prints ``GUEST-EXIT rc=N`` and powers off (~3 s on the project machines). ``status`` is QEMU's exit
status (0 after the guest's poweroff, and also after a panic since panic=-1 reboots and -no-reboot exits).

vhost-user devices (checked with QEMU 7.2 and qemu-storage-daemon, see test_linux_harness.py): guest RAM must be
a shared memfd so the backend can map it, which ``VHOST_USER_MEMORY`` gives:

    run_linux_tcg(vmlinuz, initrd, extra_args=[*VHOST_USER_MEMORY, "-chardev", f"socket,id=c0,path={sock}",
                                               "-device", "vhost-user-blk-pci,chardev=c0"])

Without ``share=on`` QEMU prints "Failed to set msg fds", the backend rejects the vring addresses and the guest
hangs in the virtio probe. The memory size here must match ``-m`` (512 MiB). Later interop tests replace
qemu-storage-daemon by our own vhost-user backends (pv/), keeping this frontend.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

QEMU = "qemu-system-x86_64"
MEMORY_MIB = 512
BASE_APPEND = "console=ttyS0 quiet panic=-1"
VHOST_USER_MEMORY = ("-object", f"memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on",
                     "-numa", "node,memdev=mem")


class LinuxTcgTimeoutError(Exception):
    """The QEMU-TCG Linux guest did not power off within the timeout; ``console`` holds what it printed."""

    def __init__(self, message: str, console: str) -> None:
        super().__init__(message)
        self.console = console


def run_linux_tcg(vmlinuz: Path | str, initrd: Path | str, *, append: str = "", extra_args: Sequence[str] = (),
                  timeout: float = 120) -> tuple[int, str]:
    """Boot the guest under QEMU-TCG until it powers off: (QEMU exit status, serial console text)."""
    argv = [QEMU, "-accel", "tcg", "-m", str(MEMORY_MIB), "-kernel", str(vmlinuz), "-initrd", str(initrd),
            "-append", f"{BASE_APPEND} {append}".strip(), "-nographic", "-no-reboot", "-nodefaults",
            "-serial", "stdio", "-monitor", "none", *extra_args]
    # Own session so a timeout kills QEMU and nothing else; stdin closed so -nographic never reads the tty.
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        text = _clean(out)
        raise LinuxTcgTimeoutError(f"Linux guest did not power off within {timeout} s; last output: "
                                   f"{text[-600:]!r}", text) from None
    return proc.returncode, _clean(out)


def _clean(raw: bytes) -> str:
    # The serial console ends lines with CRLF.
    return raw.decode("utf-8", errors="backslashreplace").replace("\r\n", "\n")


def guest_ready(console: str) -> tuple[list[str], list[str]] | None:
    """The (disks, nets) listed on the guest's GUEST-READY line, or None when it never got there.

    Not anchored at a line start: SeaBIOS leaves terminal escapes without a newline before the kernel's output.
    """
    m = re.search(r"GUEST-READY disks=\[([^\]]*)\] nets=\[([^\]]*)\]", console)
    return (m.group(1).split(), m.group(2).split()) if m else None


def guest_exit_rc(console: str) -> int | None:
    """The test script's exit status from the GUEST-EXIT line, or None when the guest never got there."""
    m = re.search(r"GUEST-EXIT rc=(\d+)", console)
    return int(m.group(1)) if m else None
