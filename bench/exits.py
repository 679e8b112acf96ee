"""Cost of one port-I/O exit: kvmdm vs QEMU-KVM on the same guest, in one run, plus the ioeventfd floor.

Two kinds of port, each against QEMU on the same port:
  * 0x80, claimed by no device in kvmdm (answered by the vCPU's C fast path, kvmcore.fastrun) and by QEMU's no-op
    ioport80 device — the case of Linux's port-0x80 I/O delay and of probes; also measured with the fast path off
    (the pure-Python loop, the reference);
  * 0xe0, the pc-testdev data register: a real device in both (a Python BusDevice in kvmdm).

The `loop` guest does N `out %al,%dx` at CPL3 between two serial markers ('<' and '>', option marks=1); the host
timestamps the markers as they arrive on COM1, so boot time (SeaBIOS under QEMU, emulated CPL0 code) is outside
the measurement. Per-exit cost = (t('>') - t('<')) / N. Each configuration runs --repeat times; the median is
reported. Target (issue #2): kvmdm <= 1.05 x QEMU.

    python -m bench.exits [--loops 100000] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from daemon.vmm import MachineConfig, Vmm
from guests.build import build_guest
from guests.qemu import qemu_command
from kvmcore import fastrun

ROOT = Path(__file__).resolve().parents[1]
PORT = 0x80  # unclaimed in kvmdm
DEVICE_PORT = 0xE0  # pc-testdev in both VMMs


class _MarkerSink:
    """Serial sink that timestamps the loop markers the moment the guest writes them."""

    def __init__(self) -> None:
        self.t_start: float | None = None
        self.t_end: float | None = None

    def write(self, data: bytes) -> None:
        now = time.perf_counter()
        if b"<" in data and self.t_start is None:
            self.t_start = now
        if b">" in data and self.t_end is None:
            self.t_end = now


def run_kvmdm(elf: Path, loops: int, *, ioeventfd: bool = False, port: int = PORT, fast: bool = True) -> float:
    sink = _MarkerSink()
    cfg = MachineConfig(mem_size=128 << 20, kernel=elf.read_bytes(), cmdline=f"loops={loops} port={port} marks=1")
    vmm = Vmm(cfg, serial_sink=sink).build()
    saved = fastrun.AVAILABLE
    fastrun.AVAILABLE = saved and fast  # read when the vCPU thread starts
    efd = -1
    try:
        vmm.finish()
        if ioeventfd:
            # The floor: KVM completes the write in the kernel and signals an eventfd; no userspace exit.
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            vmm.vm.ioeventfd(efd, port, 1, pio=True)
        vmm.start()
        reason = vmm.wait(600)
        if reason is None or reason.guest_status != 1 or sink.t_start is None or sink.t_end is None:
            raise RuntimeError(f"kvmdm loop run failed: {reason}")
        if ioeventfd:
            assert os.eventfd_read(efd) == loops, "every out should have been matched by the ioeventfd"
        return (sink.t_end - sink.t_start) / loops
    finally:
        fastrun.AVAILABLE = saved
        vmm.close()
        if efd >= 0:
            os.close(efd)


def run_qemu_kvm(elf: Path, loops: int, port: int = PORT) -> float:
    argv = qemu_command(elf, f"loops={loops} port={port} marks=1", "kvm", 128)
    argv[0] = shutil.which(argv[0]) or argv[0]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    t_start = t_end = None
    fd = proc.stdout.fileno()
    timer = threading.Timer(600, proc.kill)
    timer.start()
    try:
        while chunk := os.read(fd, 4096):
            now = time.perf_counter()
            if b"<" in chunk and t_start is None:
                t_start = now
            if b">" in chunk and t_end is None:
                t_end = now
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 1 or t_start is None or t_end is None:
        raise RuntimeError(f"QEMU loop run failed (status {proc.returncode})")
    return (t_end - t_start) / loops


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loops", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    elf = build_guest(ROOT / "tests" / "guests" / "loop.S")

    runs = {
        "kvmdm": lambda: run_kvmdm(elf, args.loops),
        "kvmdm-python-loop": lambda: run_kvmdm(elf, args.loops, fast=False),
        "qemu-kvm": lambda: run_qemu_kvm(elf, args.loops),
        "kvmdm-device": lambda: run_kvmdm(elf, args.loops, port=DEVICE_PORT),
        "qemu-kvm-device": lambda: run_qemu_kvm(elf, args.loops, port=DEVICE_PORT),
        "ioeventfd": lambda: run_kvmdm(elf, args.loops, ioeventfd=True),
    }
    results: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeat):  # interleaved, so drift in machine load hits every configuration alike
        for name, fn in runs.items():
            results[name].append(fn())
    med = {k: statistics.median(v) * 1e6 for k, v in results.items()}
    ratios = {"unclaimed_port": med["kvmdm"] / med["qemu-kvm"],
              "unclaimed_port_python_loop": med["kvmdm-python-loop"] / med["qemu-kvm"],
              "device_port": med["kvmdm-device"] / med["qemu-kvm-device"]}
    if args.json:
        print(json.dumps({"us_per_exit": med, "ratios_kvmdm_over_qemu": ratios, "loops": args.loops,
                          "repeat": args.repeat, "fast_path": fastrun.AVAILABLE,
                          "samples_us": {k: [x * 1e6 for x in v] for k, v in results.items()}}))
        return 0
    print(f"port-I/O exit cost, {args.loops} outs at CPL3, median of {args.repeat} interleaved runs (us/exit)")
    print("  port 0x80 (no device in kvmdm; QEMU's no-op ioport80)")
    print(f"    kvmdm, C fast path             {med['kvmdm']:8.2f}   ratio to QEMU {ratios['unclaimed_port']:.3f}"
          f"  ({'meets' if ratios['unclaimed_port'] <= 1.05 else 'misses'} the <= 1.05 target)")
    print(f"    kvmdm, pure-Python loop        {med['kvmdm-python-loop']:8.2f}   ratio to QEMU "
          f"{ratios['unclaimed_port_python_loop']:.3f}")
    print(f"    QEMU-KVM                       {med['qemu-kvm']:8.2f}")
    print("  port 0xe0 (pc-testdev in both; a Python device in kvmdm)")
    print(f"    kvmdm                          {med['kvmdm-device']:8.2f}   ratio to QEMU {ratios['device_port']:.3f}")
    print(f"    QEMU-KVM                       {med['qemu-kvm-device']:8.2f}")
    print(f"  ioeventfd (in-kernel, the floor) {med['ioeventfd']:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
