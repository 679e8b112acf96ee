"""virtio-net throughput: kvmdm (pv.net.Net inline in the DM) against QEMU-KVM's virtio-net on the same guest.

The guest is tests/guests/virtio_net_blast.S (polling driver, one 1514-byte frame per descriptor, 64-entry rings):
guest->host frames/s and MB/s (1 MB = 1e6 B of Ethernet frame) with the transmit ring kept full, then host->guest
with bench/blaster.py blasting frames into the tap (released when the guest opens its rx phase, so the tx phase
does not share the cores with it). Both VMMs run in a network namespace this process unshares (root
needed), each with its own tap; QEMU uses ``-netdev tap,...,vhost=off -device virtio-net-pci,disable-legacy=on``
(userspace virtio-net, like ours; vhost-net would move the data path into the kernel). Phases are timed between
the guest's '<' '>' markers on COM1 (kvmdm: in the vCPU thread at the exit; QEMU: when its stdout delivers them).
Every run's guest counts are checked against the tap's counters (bench.ablation.cross_check): a mismatch aborts.

    sudo .venv/bin/python -m bench.net [--tx 50000] [--rx 20000] [--size 1514] [--repeat 3] [--json]
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

from bench.ablation import (
    MAC,
    NET_GUEST,
    Phase,
    _link_up,
    _task_times,
    net_device,
    net_result,
    release_blaster,
    run_guest,
    start_blaster,
    stop_blaster,
    tap_counters,
    unshare_netns,
)
from guests.build import build_guest
from guests.qemu import qemu_command

QEMU_TAP = "qn-tap"


def measure_kvmdm(elf: Path, workdir: Path, tx: int, rx: int, size: int) -> dict[str, float]:
    with net_device("inline", workdir, False) as (dev, pids, ifname):
        blaster = start_blaster(ifname, size) if rx else None
        before = tap_counters(ifname)
        try:
            phases, text = run_guest(elf, f"tx={tx} rx={rx} size={size}", dev, pids,
                                     on_rx_phase=lambda: release_blaster(blaster))
        finally:
            stop_blaster(blaster)
        seen = tap_counters(ifname) - before
    return net_result("kvmdm", text, phases, seen, tx, rx, size)


def measure_qemu(elf: Path, tx: int, rx: int, size: int, timeout: float = 600) -> dict[str, float]:
    subprocess.run(["ip", "tuntap", "add", "dev", QEMU_TAP, "mode", "tap"], check=True, capture_output=True)
    try:
        _link_up(QEMU_TAP)
        argv = qemu_command(elf, f"tx={tx} rx={rx} size={size}", "kvm", 128, extra_args=[
            "-netdev", f"tap,id=n0,ifname={QEMU_TAP},script=no,downscript=no,vhost=off",
            "-device", f"virtio-net-pci,netdev=n0,disable-legacy=on,mac={MAC.hex(':')},romfile=",
        ])
        argv[0] = shutil.which(argv[0]) or argv[0]
        blaster = start_blaster(QEMU_TAP, size) if rx else None
        before = tap_counters(QEMU_TAP)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None
        marks: list[tuple[float, float]] = []  # (time, QEMU CPU seconds) at every '<' / '>'
        text = bytearray()
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            while chunk := os.read(proc.stdout.fileno(), 4096):
                now = time.perf_counter()
                for c in chunk:
                    if c in b"<>":
                        marks.append((now, sum(_task_times(proc.pid).values())))
                        if len(marks) == 3:  # the second '<': the rx phase begins
                            release_blaster(blaster)
                text += chunk
            proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            stop_blaster(blaster)
        seen = tap_counters(QEMU_TAP) - before
    finally:
        subprocess.run(["ip", "link", "del", QEMU_TAP], capture_output=True)
    out = text.decode(errors="replace")
    if proc.returncode != 1:  # isa-debug-exit: (0 << 1) | 1
        raise RuntimeError(f"QEMU run failed (status {proc.returncode}): {out[-300:]!r}")
    # QEMU's CPU goes into cpu_vcpu (all its threads; not split here).
    phases = [Phase(b[0] - a[0], 0, 0, b[1] - a[1], 0.0, 0.0) for a, b in zip(marks[::2], marks[1::2], strict=False)]
    return net_result("qemu", out, phases, seen, tx, rx, size, held=2)


KEYS = ("tx_MBps", "tx_fps", "tx_cpu_vcpu", "rx_MBps", "rx_fps", "rx_cpu_vcpu")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tx", type=int, default=50_000)
    p.add_argument("--rx", type=int, default=20_000)
    p.add_argument("--size", type=int, default=1514)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.net needs root (network namespace, taps)", file=sys.stderr)
        return 2
    unshare_netns()
    elf = build_guest(NET_GUEST)
    samples: dict[str, dict[str, list[float]]] = {"kvmdm": {}, "qemu": {}}
    workdir = Path("/var/tmp")
    for _ in range(args.repeat):  # interleaved: machine-load drift hits both alike
        for name, fn in (("kvmdm", lambda: measure_kvmdm(elf, workdir, args.tx, args.rx, args.size)),
                         ("qemu", lambda: measure_qemu(elf, args.tx, args.rx, args.size))):
            for k, v in fn().items():
                samples[name].setdefault(k, []).append(v)
    med = {n: {k: statistics.median(v) for k, v in m.items()} for n, m in samples.items()}
    ratio = {k: med["kvmdm"][k] / med["qemu"][k] for k in KEYS if med["qemu"].get(k)}
    if args.json:
        print(json.dumps({"median": med, "ratio_kvmdm_over_qemu": ratio, "samples": samples,
                          "params": vars(args)}))
        return 0
    print(f"virtio-net throughput, kvmdm (inline Net) vs QEMU-KVM (virtio-net-pci, vhost=off), median of "
          f"{args.repeat}; tx={args.tx} rx={args.rx} size={args.size}; guest counts cross-checked with the taps")
    print(f"  {'metric':14s} {'kvmdm':>12s} {'qemu':>12s} {'kvmdm/qemu':>12s}")
    for k in KEYS:
        if k in med["kvmdm"]:
            print(f"  {k:14s} {med['kvmdm'][k]:12.3f} {med['qemu'][k]:12.3f} {ratio.get(k, float('nan')):12.3f}")
    print("  (cpu_vcpu = CPU s per s of phase: kvmdm's vCPU thread; QEMU: all its threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
