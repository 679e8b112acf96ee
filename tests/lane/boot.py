"""Boot the lane's L1 under QEMU-TCG and run one command in it, with the host's / as its root.

A run directory under $KVMDM_CACHE/lane/runs holds what L1 reads (stage-2 script, environment, the command) and
what it leaves (console.log, the command's own files). The command's exit status comes back on the console as
``LANE-RC=<n>``: it does not depend on 9p writes reaching the host before L1 powers off.
"""

from __future__ import annotations

import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.fixtures.linux_guest import cache_root
from tests.lane.image import L1Image

RC_MARKER = re.compile(rb"LANE-RC=(\d+)")
KEEP_RUNS = 5
RC_TIMEOUT, RC_NO_RESULT = 124, 125
RC_L1_HUNG = 126  # L1 stopped showing signs of life (HangWatch): nothing the command did can finish
# L1's own kernel on its console when it dies (panic=-1 and -no-reboot make QEMU exit right after it).
L1_PANIC = re.compile(rb"Kernel panic - not syncing: [^\r\n]*")
HEARTBEAT_S = 15  # how often L1's stage 2 writes the time to its second serial port (the run's heartbeat.log)


class HangWatch:
    """Decides that L1 is hung: its heartbeat (a line on ttyS1 every HEARTBEAT_S from a shell loop in stage 2)
    has not come for ``hang_s``. Seen in the lane (README, real-KVM lane), with kvmdm and with QEMU-KVM alike: L1's
    CPUs stop scheduling (soft lockups, a CPU halted that IPIs and NMIs do not wake) or stop printing anything
    at all. Before the first beat (L1 still booting) nothing counts."""

    def __init__(self, hang_s: float = float(os.environ.get("KVMDM_LANE_HANG_S", "240"))) -> None:
        self.hang_s = hang_s
        self.last_beat: float | None = None
        self._size = 0

    def beat_file(self, path: Path, now: float) -> None:
        """Note a beat if ``path`` grew since the last look."""
        try:
            size = path.stat().st_size
        except OSError:
            return
        if size > self._size:
            self._size = size
            self.last_beat = now

    def hung(self, now: float) -> bool:
        return self.last_beat is not None and now - self.last_beat > self.hang_s

    def silent_for(self, now: float) -> float:
        return 0.0 if self.last_beat is None else now - self.last_beat


# Variables the host passes on to L1 (only these: the rest of the host's environment describes the host).
PASS_ENV = ("KVMDM_CACHE", "KVMDM_REQUIRE_KVM", "KVMDM_REQUIRE_QEMU", "KVMDM_REQUIRE_ROOT", "KVMDM_NO_FASTRUN",
            "KVMDM_LINUX_DEB", "CI")

# PID 1 of L1 after switch_root (bash from the host's /). Runs the command in its own session, reaps orphans
# (bash as PID 1 waits for every child it is handed), prints the marker and powers off.
STAGE2 = r"""#!/bin/bash
set -u
run=@RUN@
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# The host's /tmp, /run and /dev/shm stay the host's: L1 gets its own, in RAM.
mount -t tmpfs -o mode=1777,size=60% tmp /tmp
mount -t tmpfs -o mode=755 run /run
mkdir -p /dev/pts /dev/shm /run/lock
mount -t devpts -o gid=5,mode=620,ptmxmode=0666 devpts /dev/pts
[ -e /dev/ptmx ] || ln -s pts/ptmx /dev/ptmx
mount -t tmpfs -o mode=1777 shm /dev/shm
mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null
ip link set lo up
hostname kvmdm-lane
echo "LANE-L1-READY $(uname -r) kvm=$(ls /dev/kvm 2>&1) module=$(ls -d /sys/module/kvm_amd 2>&1)" \
  "nested=$(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null) vgif=$(cat /sys/module/kvm_amd/parameters/vgif 2>/dev/null)" \
  "cpus=$(nproc) mem=$(free -m | awk '/Mem:/{print $2}')M"
. "$run/env.sh"
# The heartbeat the host's HangWatch waits for (bash builtins but sleep: a hung L1 cannot fake it).
( exec 3>/dev/ttyS1; while :; do printf '%(%s)T\n' -1 >&3; sleep @BEAT@; done ) </dev/null >/dev/null 2>&1 &
hb=$!
# After the power-off request nothing may run from the 9p root (it goes away first): a shell builtin loop waits.
cd "$LANE_CWD" || { echo "LANE-RC=125"; echo o > /proc/sysrq-trigger; while :; do :; done; }
setsid bash "$run/cmd.sh" </dev/null 2>&1
rc=$?
kill $hb 2>/dev/null
echo "LANE-RC=$rc"
sync
echo o > /proc/sysrq-trigger
while :; do :; done
"""


@dataclass
class LaneConfig:
    mem_mib: int = int(os.environ.get("KVMDM_LANE_MEM_MIB", "6144"))
    smp: int = int(os.environ.get("KVMDM_LANE_SMP", str(min(os.cpu_count() or 2, 4))))
    timeout: float = float(os.environ.get("KVMDM_LANE_TIMEOUT", "2700"))
    extra_env: dict[str, str] = field(default_factory=dict)
    qemu: str = "qemu-system-x86_64"
    # Diagnosis of L1 itself: more kernel arguments (e.g. "loglevel=7 softlockup_all_cpu_backtrace=1", so a hung
    # L1's stack traces reach the console), and a QEMU monitor socket to ask a hung L1 "info registers -a".
    append: str = os.environ.get("KVMDM_LANE_APPEND", "")
    monitor: str = os.environ.get("KVMDM_LANE_MONITOR", "")
    tcg_thread: str = os.environ.get("KVMDM_LANE_TCG_THREAD", "multi")  # "single": one host thread for all vCPUs


@dataclass
class LaneResult:
    rc: int
    run_dir: Path
    seconds: float
    l1_ready_after: float | None
    # L1 itself died under the command (QEMU exited with no LANE-RC after LANE-L1-READY): a panic, or a reset (a
    # triple fault) with no message. ``panic`` is L1's panic line when it printed one.
    l1_died: bool = False
    panic: str | None = None

    @property
    def l1_lost(self) -> bool:
        """L1 hung or died under the command: the lane's L0 fault (README: real-KVM lane), not the command's end."""
        return self.rc == RC_L1_HUNG or self.l1_died


def runs_root() -> Path:
    return cache_root().parent / "lane" / "runs"


def _prune(root: Path) -> None:
    runs = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for old in runs[:-KEEP_RUNS]:
        shutil.rmtree(old, ignore_errors=True)


def prepare_run(argv: Sequence[str], cwd: Path, cfg: LaneConfig) -> Path:
    root = runs_root()
    root.mkdir(parents=True, exist_ok=True)
    _prune(root)
    stamp = time.strftime(f"%Y%m%d-%H%M%S-{os.getpid()}")
    for n in range(100):  # two runs of one process in the same second get their own directories
        run = root / (stamp if n == 0 else f"{stamp}.{n}")
        try:
            run.mkdir()
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"no free run directory for {stamp} under {root}")
    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    env.update({"HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8", "TERM": "dumb", "PYTHONUNBUFFERED": "1",
                "KVMDM_IN_LANE": "1", "KVMDM_REQUIRE_REALKVM": "1", "KVMDM_LANE_RUN": str(run),
                "LANE_CWD": str(cwd)})
    env.update(cfg.extra_env)
    (run / "env.sh").write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items())))
    (run / "cmd.sh").write_text(f"exec {shlex.join(argv)}\n")
    (run / "stage2.sh").write_text(STAGE2.replace("@RUN@", shlex.quote(str(run))).replace("@BEAT@", str(HEARTBEAT_S)))
    return run


def qemu_argv(image: L1Image, run: Path, cfg: LaneConfig) -> list[str]:
    monitor = ["-monitor", f"unix:{cfg.monitor},server=on,wait=off"] if cfg.monitor else []
    return [
        cfg.qemu, "-accel", f"tcg,thread={cfg.tcg_thread},tb-size=1024", "-cpu", "max", "-smp", str(cfg.smp),
        "-m", str(cfg.mem_mib), "-nodefaults", "-display", "none", "-no-reboot",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", f"console=ttyS0 panic=-1 quiet lane.stage2={run}/stage2.sh {cfg.append}".rstrip(),
        "-virtfs", "local,path=/,mount_tag=host,security_model=passthrough,id=host,multidevs=remap",
        "-serial", "stdio", "-serial", f"file:{run}/heartbeat.log", *monitor,
    ]


def run_in_l1(image: L1Image, argv: Sequence[str], cwd: Path, cfg: LaneConfig, out: object = None) -> LaneResult:
    """Boot L1, run argv in cwd there, stream the console to ``out`` (default stdout) and console.log."""
    sink = out if out is not None else sys.stdout
    run = prepare_run(argv, cwd, cfg)
    log = (run / "console.log").open("wb", buffering=0)  # unbuffered: a hung L1's log is readable while it hangs
    t0 = time.monotonic()
    proc = subprocess.Popen(qemu_argv(image, run, cfg), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    assert proc.stdout is not None
    rc: int | None = None
    ready: float | None = None
    panic: str | None = None
    died = False
    pending = b""
    hang = HangWatch()
    deadline = t0 + cfg.timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                print(f"[lane] no LANE-RC after {cfg.timeout:.0f} s: stopping L1", file=sink, flush=True)  # type: ignore[arg-type]
                rc = RC_TIMEOUT
                break
            r, _, _ = select.select([proc.stdout], [], [], min(left, 5.0))
            now = time.monotonic()
            hang.beat_file(run / "heartbeat.log", now)
            if rc is None and hang.hung(now):
                print(f"[lane] no heartbeat from L1 for {hang.silent_for(now):.0f} s: L1 is hung (an L0 fault, README: "
                      "real-KVM lane); stopping it", file=sink, flush=True)  # type: ignore[arg-type]
                rc = RC_L1_HUNG
                break
            if not r:
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break  # QEMU exited
            log.write(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                text = line.rstrip(b"\r").decode("utf-8", "backslashreplace")
                print(f"[L1] {text}", file=sink, flush=True)  # type: ignore[arg-type]
                if ready is None and "LANE-L1-READY" in text:
                    ready = time.monotonic() - t0
                m = RC_MARKER.search(line)
                if m and rc is None:
                    rc = int(m.group(1))
                p = L1_PANIC.search(line)
                if p and rc is None:
                    panic = p.group(0).decode("utf-8", "backslashreplace")  # the last one: L1's own comes last
        if rc is None:
            # QEMU exited on its own with no result. After LANE-L1-READY, L1 panicked or reset under the command (a
            # guest's panic the command printed does not end QEMU); before it, L1 or QEMU never came up.
            rc, died = RC_NO_RESULT, ready is not None
    finally:
        try:
            proc.wait(timeout=30 if rc is not None and rc not in (RC_TIMEOUT, RC_L1_HUNG) else 0.1)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    return LaneResult(rc, run, time.monotonic() - t0, ready, l1_died=died, panic=panic if died else None)
