"""Debian's Linux on a real KVM: kvmdm vs QEMU-KVM in the same run (issue 9). Ratios, never asserts.

Same kernel (Debian's cloud kernel), initramfs, command line, 512 MiB and 2 vCPUs for both VMMs; QEMU is
``-M pc -accel kvm -cpu host -kernel`` (SeaBIOS + its linuxboot option ROM), kvmdm is ``kvmdm run guest.json``
(direct boot, ACPI platform). Three measurements:

* **boot**: wall time from starting the VMM to the initramfs's ``GUEST-READY`` line (one virtio-blk disk, so
  the init's device wait ends at the same point for both), and the guest kernel's own uptime there (kernel
  start → userspace, i.e. without the VMM's start: Python's imports for kvmdm, SeaBIOS for QEMU). Median of
  --boots runs each.
* **fio** in the guest (Linux's virtio_blk, libaio, O_DIRECT, --seconds per job after a 1 s ramp): 4 KiB randread
  and 1 MiB sequential read, at QD1 and QD32, on vda. kvmdm inline (pv.blk in the DM) and vhost-user
  (kvmdm-backend) are separate boots, because a vhost-user guest's RAM is a memfd without huge pages
  (kvmcore.memory); QEMU: virtio-blk-pci (aio=threads), anonymous RAM. Images are sparse files in L1's tmpfs, so
  the device path, not a disk, is measured.
* **iperf3** both ways to a peer in a network namespace behind a bridge (tests.realkvm.netpeer), on eth0. kvmdm:
  inline (pv.net on a tap) and vhost-user (kvmdm-backend net); QEMU: virtio-net-pci on a tap, eth0 without and
  eth1 with vhost-net.

On this project's machines (kvm_pvm, which cannot run Linux) the bench runs itself in the real-KVM lane
(tests.lane: one L1 under QEMU-TCG with nested SVM); on a host with hardware KVM it runs directly. Absolute
numbers in the lane are TCG-bound and small; the ratios are what this prints for. Results also go to
$KVMDM_CACHE/bench/linux-<time>.json.

    python -m bench.linux [--boots 3] [--seconds 3] [--skip-io] [--json]
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CMDLINE = "console=ttyS0 quiet panic=-1"
MEM_MIB = 512
VCPUS = 2
IMAGE_MIB = 256
RUN_LIMIT = 900.0  # a run in the lane takes ~20-90 s; this only bounds a wedged VMM
BINARIES = ("iperf3", "fio")
FIO_JOBS = (("rand4k_qd1", "randread", "4k", 1), ("rand4k_qd32", "randread", "4k", 32),
            ("seq1m_qd1", "read", "1m", 1), ("seq1m_qd32", "read", "1m", 32))

SCRIPT = r"""
mkdir -p /tmp
mode=$(sed -n 's/.*lane\.mode=\([a-z]*\).*/\1/p' /proc/cmdline)
secs=$(sed -n 's/.*bench\.secs=\([0-9]*\).*/\1/p' /proc/cmdline)
echo "CHK uptime=$(cut -d' ' -f1 /proc/uptime)"
if [ "$mode" = io ]; then
  for d in $(ls /sys/block | grep '^vd'); do
    for spec in @JOBS@; do
      set -- $(echo "$spec" | tr ':' ' '); name=$1; rw=$2; bs=$3; qd=$4
      r=$(fio --name=$name --filename=/dev/$d --rw=$rw --bs=$bs --iodepth=$qd --ioengine=libaio --direct=1 \
          --thread --time_based --runtime=$secs --ramp_time=1 --minimal 2>/tmp/fioerr | cut -d';' -f7,8)
      echo "CHK fio_${d}_$name=$r"; [ -n "$r" ] || head -3 /tmp/fioerr
    done
  done
  i=0
  for n in $(ls /sys/class/net | grep '^eth'); do
    ip link set $n up && ip addr add 10.77.$i.15/24 dev $n
    ping -c 2 -W 10 10.77.$i.1 > /dev/null 2>&1
    for dir in tx rx; do
      [ $dir = rx ] && rev=-R || rev=
      v=$(iperf3 $rev -c 10.77.$i.1 -t $secs -f m 2>&1 | sed -n 's/.* \([0-9.]*\) Mbits\/sec.*receiver.*/\1/p')
      echo "CHK iperf_${n}_$dir=$v"
    done
    i=$((i+1))
  done
fi
""".replace("@JOBS@", " ".join(f"{n}:{rw}:{bs}:{qd}" for n, rw, bs, qd in FIO_JOBS))


@dataclass
class Run:
    """One VMM run: when GUEST-READY arrived, when the VMM exited, and the guest's CHK lines."""

    ready_s: float | None
    total_s: float
    rc: int
    chk: dict[str, str] = field(default_factory=dict)
    tail: str = ""


def _watch(cmd: list[str], env: dict[str, str] | None = None) -> Run:
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    assert p.stdout is not None
    ready: list[float] = []
    lines: list[str] = []

    def reader() -> None:
        assert p.stdout is not None
        for raw in p.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            if not ready and "GUEST-READY" in line:
                ready.append(time.monotonic() - t0)
            lines.append(line)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        rc = p.wait(timeout=RUN_LIMIT)
    except subprocess.TimeoutExpired:
        p.kill()
        rc = p.wait()
    t.join(10)
    from tests.realkvm.guest import checks

    text = "\n".join(lines)
    return Run(ready[0] if ready else None, time.monotonic() - t0, rc, checks(text), text[-3000:])


def _image(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(IMAGE_MIB << 20)
    return path


def kvmdm_run(work: Path, vmlinuz: Path, initrd: Path, cmdline: str, disks: list[dict[str, Any]],
              nics: list[dict[str, Any]]) -> Run:
    d = work / "guest.json"
    d.write_text(json.dumps({"name": "bench", "kernel": str(vmlinuz), "initrd": str(initrd), "cmdline": cmdline,
                             "memory_mib": MEM_MIB, "vcpus": VCPUS, "disks": disks, "nics": nics}))
    return _watch([sys.executable, "-m", "daemon.cli", "run", str(d)],
                  env={**os.environ, "PYTHONPATH": str(ROOT)})


def qemu_run(vmlinuz: Path, initrd: Path, cmdline: str, disks: list[Path], taps: list[tuple[str, bool]]) -> Run:
    cmd = ["qemu-system-x86_64", "-M", "pc", "-accel", "kvm", "-cpu", "host", "-m", str(MEM_MIB),
           "-smp", str(VCPUS), "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
           "-no-reboot", "-kernel", str(vmlinuz), "-initrd", str(initrd), "-append", cmdline]
    for i, img in enumerate(disks):
        cmd += ["-drive", f"file={img},if=none,id=d{i},format=raw,aio=threads",
                "-device", f"virtio-blk-pci,drive=d{i}"]
    for i, (tap, vhost) in enumerate(taps):
        cmd += ["-netdev", f"tap,id=n{i},ifname={tap},script=no,downscript=no,vhost={'on' if vhost else 'off'}",
                "-device", f"virtio-net-pci,netdev=n{i},mac=52:54:00:be:00:{i:02x}"]
    return _watch(cmd)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def _num(v: str | None, i: int = 0) -> float | None:
    try:
        return float((v or "").split(";")[i])
    except ValueError:
        return None


def bench_boot(work: Path, vmlinuz: Path, initrd: Path, boots: int) -> dict[str, Any]:
    cmdline = f"{CMDLINE} lane.mode=boot"
    img = _image(work / "boot.raw")
    runs: dict[str, list[Run]] = {"kvmdm": [], "qemu": []}
    for _ in range(boots):  # interleaved, so a slow phase of the machine hits both
        runs["kvmdm"].append(kvmdm_run(work, vmlinuz, initrd, cmdline, [{"path": str(img)}], []))
        runs["qemu"].append(qemu_run(vmlinuz, initrd, cmdline, [img], []))
    out: dict[str, Any] = {}
    for vmm, rs in runs.items():
        ok = [r for r in rs if r.ready_s is not None and r.rc == 0]
        if len(ok) < len(rs):
            bad = next(r for r in rs if r not in ok)
            print(f"boot: {vmm}: {len(rs) - len(ok)} of {len(rs)} runs failed (rc={bad.rc}):\n{bad.tail}")
        out[vmm] = {
            "wall_s": statistics.median(r.ready_s for r in ok if r.ready_s is not None) if ok else None,
            "uptime_s": statistics.median(u for r in ok if (u := _num(r.chk.get("uptime"))) is not None)
            if ok else None,
            "runs": len(ok)}
    return out


def bench_io(work: Path, vmlinuz: Path, initrd: Path, seconds: int) -> dict[str, Any]:
    """Three boots: kvmdm inline (anonymous THP RAM), kvmdm vhost-user (RAM in a memfd the back-ends map),
    QEMU (anonymous THP RAM; eth0 without, eth1 with vhost-net). Each guest's vda and eth0 are measured."""
    from tests.realkvm.netpeer import network_peer

    cmdline = f"{CMDLINE} lane.mode=io bench.secs={seconds}"
    imgs = [_image(work / "a.raw"), _image(work / "b.raw")]
    taps = [("kbqtap0", False), ("kbqtap1", True)]
    with network_peer(2) as peer:
        ki = kvmdm_run(work, vmlinuz, initrd, cmdline, [{"path": str(imgs[0])}], [{"bridge": peer.bridges[0]}])
        kv = kvmdm_run(work, vmlinuz, initrd, cmdline, [{"path": str(imgs[0]), "backend": "vhost-user"}],
                       [{"bridge": peer.bridges[0], "backend": "vhost-user"}])
        try:
            for (tap, _), br in zip(taps, peer.bridges, strict=True):
                _ip("tuntap", "add", "dev", tap, "mode", "tap")
                _ip("link", "set", tap, "master", br, "up")
            q = qemu_run(vmlinuz, initrd, cmdline, imgs, taps)
        finally:
            for tap, _ in taps:
                subprocess.run(["ip", "link", "del", tap], capture_output=True, timeout=30)
    for name, r in (("kvmdm inline", ki), ("kvmdm vhost-user", kv), ("qemu", q)):
        if r.rc != 0 or "uptime" not in r.chk:
            print(f"io: {name} run failed (rc={r.rc}):\n{r.tail}")
    return {"kvmdm_inline": ki.chk, "kvmdm_vhost_user": kv.chk, "qemu": q.chk}


def report(boot: dict[str, Any] | None, io: dict[str, Any] | None) -> str:
    out = []
    if boot:
        k, q = boot["kvmdm"], boot["qemu"]
        out.append(f"boot to userspace ({k['runs']}/{q['runs']} runs, median)   kvmdm      qemu-kvm   kvmdm/qemu")
        for key, what in (("wall_s", "VMM start -> GUEST-READY (s)"), ("uptime_s", "guest kernel uptime (s)")):
            kv, qv = k[key], q[key]
            out.append(f"  {what:<40} {kv or 0:8.2f}  {qv or 0:8.2f}   {_ratio(kv, qv)}")
    if io:
        ki, kv, q = io["kvmdm_inline"], io["kvmdm_vhost_user"], io["qemu"]
        out.append("fio (IOPS)            kvmdm inline  kvmdm vhost-user  qemu virtio-blk  inline/qemu  vu/qemu")
        for name, *_ in FIO_JOBS:
            a, b, c = (_num(ki.get(f"fio_vda_{name}"), 1), _num(kv.get(f"fio_vda_{name}"), 1),
                       _num(q.get(f"fio_vda_{name}"), 1))
            out.append(f"  {name:<20} {a or 0:12.0f}  {b or 0:16.0f}  {c or 0:15.0f}  {_ratio(a, c):>11}  "
                       f"{_ratio(b, c):>7}")
        out.append("iperf3 (Mbit/s)       kvmdm inline  kvmdm vhost-user  qemu  qemu vhost-net  inline/qemu  "
                   "vu/qemu  vu/vhost-net")
        for d in ("tx", "rx"):
            a, b = _num(ki.get(f"iperf_eth0_{d}")), _num(kv.get(f"iperf_eth0_{d}"))
            qn, qv = _num(q.get(f"iperf_eth0_{d}")), _num(q.get(f"iperf_eth1_{d}"))
            out.append(f"  guest {d:<14} {a or 0:12.0f}  {b or 0:16.0f}  {qn or 0:4.0f}  {qv or 0:14.0f}  "
                       f"{_ratio(a, qn):>11}  {_ratio(b, qn):>7}  {_ratio(b, qv):>12}")
    return "\n".join(out)


def _in_lane(argv: list[str]) -> int:
    """Build the guest here (Python in L1 is ~40x slower) and run this bench in one L1."""
    import tempfile

    from tests.fixtures.linux_guest import build_linux_guest

    with tempfile.TemporaryDirectory() as tmp:
        build_linux_guest(Path(tmp), SCRIPT, BINARIES)
    python = str(ROOT / ".venv" / "bin" / "python")
    return subprocess.call([python, "-m", "tests.lane", "run", "--", python, "-m", "bench.linux", *argv], cwd=ROOT)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.linux", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--boots", type=int, default=3)
    p.add_argument("--seconds", type=int, default=3, help="fio job / iperf3 run length")
    p.add_argument("--skip-io", action="store_true")
    p.add_argument("--skip-boot", action="store_true")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    from tests.lane import host_has_real_kvm

    if not host_has_real_kvm():
        if os.environ.get("KVMDM_IN_LANE") == "1":
            print("bench.linux: no hardware KVM even in the lane's L1", file=sys.stderr)
            return 1
        return _in_lane(argv)
    if shutil.which("qemu-system-x86_64") is None:
        print("bench.linux: qemu-system-x86_64 is not installed", file=sys.stderr)
        return 1
    from tests.fixtures.linux_guest import build_linux_guest

    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"kvmdm-bench-linux-{os.getpid()}"
    work.mkdir(parents=True)
    try:
        vmlinuz, initrd = build_linux_guest(work, SCRIPT, BINARIES)
        boot = None if a.skip_boot else bench_boot(work, vmlinuz, initrd, a.boots)
        io = None if a.skip_io else bench_io(work, vmlinuz, initrd, a.seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"boot": boot, "io": io, "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "lane": os.environ.get("KVMDM_IN_LANE") == "1"}
    from tests.fixtures.linux_guest import cache_root

    dest = cache_root() / "bench" / f"linux-{time.strftime('%Y%m%d-%H%M%S')}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1) if a.json else report(boot, io))
    print(f"bench.linux: results in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
