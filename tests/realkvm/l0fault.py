"""Running a guest in the lane, where L0 sometimes breaks it: streaming its console with a stall limit, and one
more try when a run ends the way the lane's L0 fault ends runs.

The fault (README, real-KVM lane): QEMU-TCG 7.2's emulated SVM, under L1's kvm_amd, now and then stops an L2
guest for good or corrupts it, at random points of its boot (mid-printk, mid-disk-read). Measured on the same
SeaBIOS -> GRUB -> Linux disk: 5 boots in 39 under kvmdm, 2 in 19 under QEMU-KVM. What the guest shows:
its console stops mid-line and stays silent (the vCPU thread loops inside L1's KVM_RUN; L1's CPU sits on the
instruction after VMRUN with CR2 pointing at it), or it triple-faults in early boot; or all of L1 hangs (a CPU
halted with IF=1 that no IPI or NMI wakes), which tests.lane.boot.HangWatch handles. Only in the lane
(KVMDM_IN_LANE=1) does a run that ends in one of the first two ways get a second run; the second run's result is
the test's. On hardware KVM nothing is retried.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from daemon.messages import ExitCode

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Run:
    rc: int | None
    console: str  # stdout, "\r\n" folded to "\n"
    stderr: str
    seen: dict[str, float] = field(default_factory=dict)  # chain name -> seconds after start when it appeared
    t0: float = 0.0
    stalled: bool = False  # killed after stall_limit s without console output


def run_streaming(argv: list[str], limit: float, *, stall_limit: float, chain: Sequence[tuple[str, str]] = (),
                  label: str = "guest") -> Run:
    """Run argv, stream its stdout, note when each chain text first appears, stop it after ``limit`` s or
    ``stall_limit`` s of console silence. In the lane the console is also written live into the run directory
    (``<label>-console.log``), where the host can watch it."""
    t0 = time.monotonic()
    p = subprocess.Popen(argv, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    out, err = bytearray(), bytearray()
    seen: dict[str, float] = {}
    lane_run = os.environ.get("KVMDM_LANE_RUN")
    live = open(Path(lane_run) / f"{label}-console.log", "wb") if lane_run else None  # noqa: SIM115
    fds = {p.stdout.fileno(): out, p.stderr.fileno(): err}
    last_output = time.monotonic()
    stalled = False
    try:
        while fds and time.monotonic() - t0 < limit:
            if time.monotonic() - last_output > stall_limit:
                print(f"GUEST-STALL ({label}) no console output for {stall_limit:.0f} s: stopping the run",
                      file=sys.stderr)
                stalled = True
                break
            ready, _, _ = select.select(list(fds), [], [], 5.0)
            for fd in ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    del fds[fd]
                    continue
                fds[fd].extend(chunk)
                if live is not None:
                    live.write(chunk)
                    live.flush()
                if fd == p.stdout.fileno():
                    last_output = time.monotonic()
                    for name, needle in chain:
                        if name not in seen and needle.encode() in out:
                            seen[name] = time.monotonic() - t0
                            print(f"GUEST-EVENT ({label}) {name} at {seen[name]:.1f} s", file=sys.stderr,
                                  flush=True)
        if p.poll() is None:
            p.terminate()
        rc = p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if live is not None:
            live.close()
    return Run(rc, out.decode(errors="replace").replace("\r\n", "\n"), err.decode(errors="replace"), seen, t0,
               stalled)


def kvmdm_l0_fault(run: Run) -> str | None:
    """How a ``kvmdm run`` ended if it ended the way the lane's L0 fault ends runs, else None."""
    if run.stalled:
        return "the console went silent for good"
    if run.rc == ExitCode.CRASHED and "triple fault" in run.stderr:
        return "the guest triple-faulted"
    return None


def qemu_l0_fault(run: Run, done_marker: str) -> str | None:
    """The same for QEMU-KVM with -no-reboot: a triple fault ends it with status 0 before the guest is done."""
    if run.stalled:
        return "the console went silent for good"
    if run.rc == 0 and done_marker not in run.console:
        return "QEMU stopped (a reset or triple fault under -no-reboot) before the guest was done"
    return None


# Runs after the first that a run ending in the L0 fault's way gets in the lane. One was not enough: a CI lane run
# (2026-12-04) saw the iPXE boot triple-fault early in Linux and its one retry go silent at the same stage.
L0_RETRIES = 2


def with_l0_retry(once: Callable[[], Run], fault: Callable[[Run], str | None]) -> Run:
    """``once()``, and in the lane up to L0_RETRIES more times while a run ends in the L0 fault's way; the last
    run's result counts. Any other ending, and every ending on hardware KVM, counts at once."""
    run = once()
    for attempt in range(1, L0_RETRIES + 1):
        why = fault(run)
        if why is None or os.environ.get("KVMDM_IN_LANE") != "1":
            break
        note = (f"L0-FAULT {why} (console tail: {run.console[-200:]!r}); the lane's known L0 fault (README, "
                f"real-KVM lane): running again ({attempt} of {L0_RETRIES}), and the last run's result counts")
        print(note)
        print(note, file=sys.stderr)
        sys.stderr.write(run.stderr[-2000:])
        run = once()
    return run
