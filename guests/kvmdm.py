"""Run a test guest under kvmdm in this process, with the same shape of result as guests.qemu.run_qemu.

`status` follows QEMU's conventions so the two can be compared directly: the isa-debug-exit status
((v << 1) | 1) when the guest used it, and 0 for a reset or triple fault (QEMU with -no-reboot exits 0).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from daemon.vmm import MachineConfig, Vmm
from kvmcore.vcpu_loop import StopReason
from pv.blk import Block
from pv.device import VirtioDevice


class KvmdmTimeoutError(Exception):
    """The guest did not stop within the timeout."""

    def __init__(self, message: str, output: str) -> None:
        super().__init__(message)
        self.output = output


class KvmdmRun(NamedTuple):
    status: int
    output: str
    reason: StopReason
    exits: Counter[str]


class _Capture:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data


def run_kvmdm(elf: Path | str, append: str = "", stdin_data: bytes = b"", timeout: float = 60, *,
              send_after: bytes | None = None, memory_mib: int = 128, vcpus: int = 1,
              disks: Sequence[tuple[str | Path, bool]] = (), virtio: Sequence[VirtioDevice] = ()) -> KvmdmRun:
    """disks: (image path, read_only) pairs, each a virtio-blk PCI function in order; virtio: any other
    pv.device.VirtioDevice instances to attach after them (e.g. a virtio-net backend on a tap)."""
    out = _Capture()
    cfg = MachineConfig(mem_size=memory_mib << 20, vcpus=vcpus, kernel=Path(elf).read_bytes(), cmdline=append)
    vmm = Vmm(cfg, serial_sink=out).build()
    fds: list[int] = []
    try:
        for path, read_only in disks:
            fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
            fds.append(fd)
            vmm.attach_virtio(Block(fd, read_only=read_only, serial=Path(path).name[:20]))
        for dev in virtio:
            vmm.attach_virtio(dev)
        vmm.finish()
        vmm.start()
        deadline = time.monotonic() + timeout
        pending = stdin_data
        reason = None
        while reason is None:
            if time.monotonic() > deadline:
                vmm.stop()
                text = bytes(out.data).decode("utf-8", errors="backslashreplace")
                raise KvmdmTimeoutError(f"guest {elf} did not stop within {timeout} s; output: {text[-400:]!r}",
                                        text)
            if pending and (send_after is None or send_after in out.data):
                pending = pending[vmm.serial_input(pending):]
            reason = vmm.wait(0.01)
        vmm.stop(reason)
        status = reason.guest_status if reason.guest_status is not None else 0
        return KvmdmRun(status, bytes(out.data).decode("utf-8", errors="backslashreplace"), reason,
                        vmm.exit_counts())
    finally:
        vmm.close()
        for fd in fds:
            os.close(fd)
