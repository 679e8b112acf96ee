"""The C floor of a DM's startup (bench/vmm_floor.c): the CPU a VMM in C spends on this host to reach KVM_RUN
with the DM's KVM set-up for the demo guest, measured in the same run as the DM, so bench.daemon can print the
DM's CPU as a ratio to it (on this nested kvm_pvm host each KVM ioctl and page fault costs far more than on the
hardware Firecracker's 8 ms was measured on).

    python -m bench.vmm_floor [--runs 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.stats import median_p90

SOURCE = Path(__file__).with_name("vmm_floor.c")
CFLAGS = ("-O2", "-Wall", "-Werror")


class FloorUnavailable(Exception):
    pass


def program() -> Path:
    """The built floor program (built on first use into the kvmdm cache)."""
    from kvmcore.cext import build_program

    try:
        return build_program("vmm-floor", SOURCE, CFLAGS, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        raise FloorUnavailable(f"cannot build {SOURCE.name}: {e} {detail.decode(errors='replace')[-300:]}") from e


def demo_kernel() -> Path:
    """The demo guest's ELF, the one kvmdmd gives a DM for ``"kernel": "demo"``."""
    from kvmcore.util.guest_build import build_demo

    return build_demo()


def run(kernel: Path, runs: int) -> dict[str, Any]:
    """``runs`` starts of the floor program: median and p90 of its CPU to KVM_RUN, its faults, the exit it saw."""
    exe = program()
    samples: list[dict[str, Any]] = []
    for _ in range(runs):
        p = subprocess.run([str(exe), str(kernel)], capture_output=True, text=True, timeout=60, check=False)
        if p.returncode != 0:
            raise FloorUnavailable(f"vmm_floor exited {p.returncode}: {p.stderr.strip()[-300:]}")
        samples.append(json.loads(p.stdout))
    return {"runs": runs, "cpu_ms": median_p90(s["cpu_ms"] for s in samples),
            "minor_faults": int(statistics.median(s["minor_faults"] for s in samples)),
            "first_exits": sorted({(s["first_exit_reason"], s["first_exit_port"]) for s in samples})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.vmm_floor", description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=20)
    a = ap.parse_args(argv)
    try:
        r = run(demo_kernel(), a.runs)
    except FloorUnavailable as e:
        print(f"bench.vmm_floor: {e}", file=sys.stderr)
        return 1
    print(f"C floor (the DM's KVM set-up, no Python), {r['runs']} runs: CPU to KVM_RUN {r['cpu_ms']['median']:.2f} ms "
          f"median (p90 {r['cpu_ms']['p90']:.2f}), {r['minor_faults']} minor faults, first exit(s) "
          f"(reason, port) {r['first_exits']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
