"""python -m tests.lane {run -- CMD... | pytest [PYTEST ARGS] | probe}

run     boot L1 once and run CMD in the checkout there; the exit status is CMD's (124: timed out, 125: no result,
        as when L1 panicked or reset, 126: L1 hung, no heartbeat)
pytest  run -- .venv/bin/python -m pytest -m realkvm tests/realkvm [ARGS]: the hardware-KVM tests; if L1 hangs
        or dies, the tests that had not passed run once more in a fresh L1
probe   run a short check (kvm_amd loaded, /dev/kvm opens, CPU flags) and print it

When the lane cannot run here (no QEMU, no kernel package) it says why and exits 0 (skipped), or 1 when
KVMDM_REQUIRE_QEMU=1 says it must run. On a host whose own KVM is hardware-assisted it is not needed: the
realkvm tests run directly (``pytest -m realkvm``), and ``pytest`` here says so and runs them without L1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.fixtures.linux_guest import LinuxGuestUnavailable
from tests.lane import host_has_real_kvm, real_kvm_module
from tests.lane.boot import RC_L1_HUNG, LaneConfig, LaneResult, run_in_l1
from tests.lane.image import build_l1_image

CHECKOUT = Path(__file__).resolve().parents[2]
PROBE = ("set -e; test -d /sys/module/kvm_amd; python3 -c 'import os; os.close(os.open(\"/dev/kvm\", os.O_RDWR))';"
         " grep -m1 -o -w -e svm -e npt /proc/cpuinfo | sort -u | tr '\\n' ' '; echo; echo probe-ok")


def _unavailable(why: str) -> int:
    if os.environ.get("KVMDM_REQUIRE_QEMU") == "1":
        print(f"lane: cannot run: {why} (KVMDM_REQUIRE_QEMU=1 says it must)", file=sys.stderr)
        return 1
    print(f"lane: SKIPPED: {why} (set KVMDM_REQUIRE_QEMU=1 to make this a failure)")
    return 0


def _prebuild() -> None:
    """Build the tests' Linux guest here, where Python runs ~40x faster than in L1; L1 finds it in the cache."""
    import tempfile

    from tests.realkvm import guest

    with tempfile.TemporaryDirectory() as tmp:
        try:
            guest.build(Path(tmp))
        except LinuxGuestUnavailable as e:
            print(f"lane: the realkvm Linux guest cannot be built here ({e}); the tests will say so in L1")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.lane", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mem-mib", type=int, default=None, help="L1 RAM (default $KVMDM_LANE_MEM_MIB or 6144)")
    p.add_argument("--smp", type=int, default=None, help="L1 vCPUs (default: host CPUs, at most 4)")
    p.add_argument("--timeout", type=float, default=None, help="whole-run limit in seconds (default 2700)")
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run", help="run a command in L1")
    r.add_argument("cmd", nargs=argparse.REMAINDER)
    t = sub.add_parser("pytest", help="run the realkvm tests in L1")
    t.add_argument("args", nargs=argparse.REMAINDER)
    sub.add_parser("probe", help="check that L1 has a working kvm_amd")
    a, unknown = p.parse_known_args(argv)
    if unknown and a.what == "pytest":
        a.args = unknown + a.args  # pytest's own options (-v, -k EXPR, ...) pass through
    elif unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")

    python = str(CHECKOUT / ".venv" / "bin" / "python")
    if a.what == "pytest":
        extra = [x for x in a.args if x != "--"]
        cmd = [python, "-m", "pytest", "-p", "no:cacheprovider", "-m", "realkvm", "tests/realkvm", *extra]
        if not host_has_real_kvm() and os.environ.get("KVMDM_LANE_QUARANTINED") != "1":
            # A test marked lane_quarantine meets the lane's L0 fault (README, real-KVM lane) too often for one
            # retry to cover, under QEMU-KVM as well: it runs with KVMDM_LANE_QUARANTINED=1, not in CI's lane.
            cmd[cmd.index("realkvm")] = "realkvm and not lane_quarantine"
        if host_has_real_kvm():
            print(f"lane: this host has {real_kvm_module()}: running the realkvm tests directly, without L1")
            return subprocess.call(cmd, cwd=CHECKOUT)
    elif a.what == "run":
        cmd = [x for x in a.cmd if x != "--"] if a.cmd[:1] == ["--"] else list(a.cmd)
        if not cmd:
            p.error("run needs a command after --")
    else:
        cmd = ["bash", "-c", PROBE]

    private = [d for d in ("/tmp", "/run", "/dev/shm") if CHECKOUT == Path(d) or Path(d) in CHECKOUT.parents]
    if private:
        # L1 mounts its own, empty /tmp, /run and /dev/shm (tests/lane/boot.py): a checkout there is not in L1.
        print(f"lane: cannot run from {CHECKOUT}: L1 has its own {private[0]}; use a checkout outside /tmp, /run "
              f"and /dev/shm", file=sys.stderr)
        return 2
    if shutil.which("qemu-system-x86_64") is None:
        return _unavailable("qemu-system-x86_64 is not installed")
    try:
        image = build_l1_image()
    except LinuxGuestUnavailable as e:
        return _unavailable(f"no L1 kernel: {e}")
    if a.what == "pytest":
        _prebuild()
    cfg = LaneConfig()
    if a.mem_mib:
        cfg.mem_mib = a.mem_mib
    if a.smp:
        cfg.smp = a.smp
    if a.timeout:
        cfg.timeout = a.timeout
    print(f"lane: L1 = Debian {image.version} under QEMU-TCG (-cpu max, {cfg.smp} vCPUs, {cfg.mem_mib} MiB); "
          f"running {' '.join(cmd)}", flush=True)
    return run_with_retry(lambda argv: run_in_l1(image, argv, CHECKOUT, cfg), cmd, retry=a.what == "pytest")


def run_with_retry(run_once: Callable[[list[str]], LaneResult], cmd: list[str], *, retry: bool) -> int:
    """Run ``cmd`` in L1; with ``retry`` (pytest), an L1 that hung or died under it gets one more L1 for the tests
    that had not passed yet (tests/conftest.py notes each pass in the run directory). A second loss is a failure."""
    run_cmd = cmd
    for attempt in (1, 2):
        res = run_once(run_cmd)
        ready = f"L1 ready after {res.l1_ready_after:.1f} s, " if res.l1_ready_after is not None else ""
        print(f"lane: rc={res.rc} ({ready}{res.seconds:.1f} s in all); console log: {res.run_dir}/console.log",
              flush=True)
        if res.l1_died:
            print(f"lane: L1 died before the command's result: {res.panic or 'it reset with no panic message'}",
                  flush=True)
        if not res.l1_lost or not retry or attempt == 2:
            break
        # L1 hung (boot.HangWatch) or died: the L0 fault QEMU-KVM in L1 meets too (README, real-KVM lane), after
        # which nothing in that L1 finishes.
        passed_file = res.run_dir / "passed.txt"
        passed = passed_file.read_text().split() if passed_file.exists() else []
        run_cmd = [*cmd, *(f"--deselect={nodeid}" for nodeid in passed)]
        how = "hung" if res.rc == RC_L1_HUNG else "died"
        print(f"lane: L1-LOST: L1 {how}; {len(passed)} test(s) had passed; running the others once more in a "
              f"fresh L1", flush=True)
    return res.rc


if __name__ == "__main__":
    sys.exit(main())
