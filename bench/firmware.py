"""Firmware boot latency (issue 10 "Measured, in a bench"): kvmdm vs QEMU-KVM, same SeaBIOS, same disk image.

One disk image (tests.fixtures.grub_disk: MBR, ext4, GRUB on COM1) and Debian's bios-256k.bin; each run starts
the VMM as a fresh process and reads its console until GRUB's menu, timing from the spawn:

* **banner**: SeaBIOS's version line on COM1 (its serial console, fw_cfg ``etc/sercon-port``);
* **boot sector**: the debug-port line "Booting from 0000:7c00", SeaBIOS's last words before it jumps to the MBR
  (the first boot-sector instruction follows at once). kvmdm puts port 0x402 into its console log as
  "[bios] ..." lines; QEMU gets ``-device isa-debugcon,iobase=0x402`` on its stdout too;
* **GRUB menu**: the "GNU GRUB" header GRUB draws on its serial terminal.

The QEMU side is ``qemu-system-x86_64 -accel kvm -machine pc -nographic -bios bios-256k.bin -drive
if=virtio``. Each VMM gets its own copy of the image. Reported: median per milestone and the kvmdm/QEMU ratio.

    python -m bench.firmware [--runs 3] [--limit 300] [--json]

On kvm_pvm (the project machine) real and protected mode run in KVM's instruction emulator, so GRUB's start-up
(lzma decompression, module init) dominates both VMMs alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kvmcore.firmware import SEABIOS_PATH  # noqa: E402
from tests.fixtures.grub_disk import build_grub_disk  # noqa: E402

MILESTONES = {
    "banner": b"SeaBIOS (version",
    "boot sector": b"Booting from 0000:7c00",
    "GRUB menu": b"GNU GRUB",
}


def _time_console(argv: list[str], limit: float, env: dict[str, str] | None = None) -> dict[str, float]:
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                         env=env, cwd=ROOT)
    assert p.stdout is not None
    os.set_blocking(p.stdout.fileno(), False)
    out = b""
    seen: dict[str, float] = {}
    try:
        while p.poll() is None and len(seen) < len(MILESTONES) and time.monotonic() - t0 < limit:
            chunk = p.stdout.read()
            if not chunk:
                time.sleep(0.005)
                continue
            out += chunk
            now = time.monotonic() - t0
            for name, marker in MILESTONES.items():
                if name not in seen and marker in out:
                    seen[name] = now
    finally:
        p.kill()
        p.wait()
    return seen


def kvmdm_argv(workdir: Path, image: Path) -> list[str]:
    definition = workdir / "bench-fw.json"
    definition.write_text(json.dumps({"name": "benchfw", "memory_mib": 128, "firmware": "seabios",
                                      "disks": [{"path": str(image)}]}))
    return [sys.executable, "-m", "daemon.cli", "run", str(definition)]


def qemu_argv(image: Path) -> list[str]:
    return ["qemu-system-x86_64", "-accel", "kvm", "-machine", "pc", "-m", "128", "-nographic", "-no-reboot",
            "-bios", SEABIOS_PATH, "-net", "none", "-drive", f"file={image},format=raw,if=virtio",
            "-chardev", "stdio,id=dbg,mux=on,signal=off", "-device", "isa-debugcon,iobase=0x402,chardev=dbg",
            "-serial", "chardev:dbg", "-monitor", "none"]


def run(runs: int, limit: float) -> dict[str, Any]:
    if not os.path.exists(SEABIOS_PATH):
        raise SystemExit(f"bench.firmware: {SEABIOS_PATH} is missing (apt-get install seabios)")
    results: dict[str, list[dict[str, float]]] = {"kvmdm": [], "qemu": []}
    with tempfile.TemporaryDirectory(prefix="kvmdm-bench-fw-") as tmp:
        work = Path(tmp)
        master = build_grub_disk(work / "grub.raw")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for i in range(runs):
            for vmm in ("kvmdm", "qemu"):
                image = work / f"{vmm}.raw"
                shutil.copyfile(master, image)
                argv = kvmdm_argv(work, image) if vmm == "kvmdm" else qemu_argv(image)
                seen = _time_console(argv, limit, env)
                results[vmm].append(seen)
                print(f"run {i + 1}/{runs} {vmm}: " + ", ".join(f"{k} {v:.2f} s" for k, v in seen.items()),
                      file=sys.stderr)
    summary: dict[str, Any] = {"runs": runs, "milestones": {}}
    for name in MILESTONES:
        row: dict[str, Any] = {}
        for vmm, per_run in results.items():
            values = [r[name] for r in per_run if name in r]
            row[vmm] = statistics.median(values) if values else None
            row[f"{vmm}_reached"] = len(values)
        if row["kvmdm"] and row["qemu"]:
            row["ratio"] = row["kvmdm"] / row["qemu"]
        summary["milestones"][name] = row
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.firmware", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--limit", type=float, default=300.0, help="seconds per run before giving up")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    summary = run(args.runs, args.limit)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"start -> milestone, median of {summary['runs']} runs (seconds)")
    print(f"{'milestone':<14}{'kvmdm':>10}{'QEMU-KVM':>10}{'ratio':>8}")
    for name, row in summary["milestones"].items():
        k = f"{row['kvmdm']:.2f}" if row["kvmdm"] else "-"
        q = f"{row['qemu']:.2f}" if row["qemu"] else "-"
        r = f"{row['ratio']:.2f}" if row.get("ratio") else "-"
        print(f"{name:<14}{k:>10}{q:>10}{r:>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
