"""virtio-blk data path: kvmdm vs QEMU-KVM vs fio on the host, same image file, guest-side numbers, one run.

The ``virtio_blk`` test guest in bench mode (``bench=1 mb=M rand=R``) does, between '<' and '>' markers on COM1:
  1. M sequential 1 MiB reads   (sectors [0, M MiB)),
  2. M sequential 1 MiB writes  (the same range),
  3. R random 4 KiB reads       (4 KiB-aligned, uniform over the whole disk, xorshift64).
The host timestamps each marker as it arrives (kvmdm: in the serial sink, i.e. in the vCPU thread at the exit;
QEMU: a pipe reader on its stdout), so boot time is outside the measurement.

The guest driver is synchronous: ONE request in flight, polled completion (no interrupts). So every engine is
compared at queue depth 1: fio runs ``ioengine=psync iodepth=1`` (1 MiB sequential read / write, 4 KiB randread).

Caching: kvmdm's Block backend does buffered preadv/pwritev on the image fd (the host page cache, no O_DIRECT,
no fsync except on FLUSH). The like-for-like comparisons are therefore QEMU ``cache=writeback`` and fio with
buffered I/O (``direct=0``); QEMU ``cache=none`` (O_DIRECT) and fio ``direct=1`` are printed for reference.
"warm" = the image was read into the page cache just before; "cold" = ``echo 3 > /proc/sys/vm/drop_caches``
just before (needs root; skipped otherwise). Writes are buffered in every cached configuration, so "cold" only
changes the read phases. In a cold guest run, the sequential read phase covers the M MiB it then rewrites, so
cold random reads are measured in a second run (``mb=1``) right after another drop.

    python -m bench.blk [--mb 256] [--rand 4096] [--image-mb 256] [--repeat 1] [--no-cold] [--json]
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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from daemon.vmm import MachineConfig, Vmm
from guests.build import build_guest
from guests.qemu import qemu_command
from pv.blk import Block

ROOT = Path(__file__).resolve().parents[1]
GUEST = ROOT / "tests" / "guests" / "virtio_blk.S"
MIB = 1 << 20
PHASES = ("seq_read", "seq_write", "rand_read")


@dataclass
class Result:
    """One engine/cache configuration: MB/s (1 MiB = 2^20 B) for sequential phases, IOPS for random reads."""

    seq_read_mbs: float | None = None
    seq_write_mbs: float | None = None
    rand_read_iops: float | None = None
    notes: list[str] = field(default_factory=list)


class _MarkerClock:
    """Timestamps every '<' and '>' in the order they appear in a byte stream."""

    synchronous = True  # each byte at the exit that wrote it, not batched by the UART's C half (devices/serial.py)

    def __init__(self) -> None:
        self.marks: list[float] = []
        self.text = bytearray()

    def write(self, data: bytes) -> None:
        now = time.perf_counter()
        self.text += data
        for b in data:
            if b in (0x3C, 0x3E):  # '<', '>'
                self.marks.append(now)

    def phases(self) -> list[float]:
        """Durations of the marked phases ('<' .. '>' pairs)."""
        m = self.marks
        return [m[i + 1] - m[i] for i in range(0, len(m) - 1, 2)]


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def warm_cache(image: Path) -> None:
    with open(image, "rb", buffering=0) as f:
        buf = bytearray(8 * MIB)
        while f.readinto(buf):
            pass


def make_image(path: Path, size_mb: int) -> None:
    """Fully allocated, non-zero data (a sparse file would read holes, never touching the disk)."""
    chunk = os.urandom(MIB)
    with open(path, "wb") as f:
        for _ in range(size_mb):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def _check(text: bytes | bytearray, what: str) -> None:
    if b"bench 0 failed" not in text and b"virtio_blk: 0 failed" not in text:
        raise RuntimeError(f"{what}: guest reported failures: {bytes(text)[-300:]!r}")


def _to_result(phases: list[float], mb: int, rand: int, *, seq: bool = True) -> Result:
    """``seq=False``: only the random phase counts (a tiny ``mb`` whose phases may share one pipe read)."""
    r = Result()
    if len(phases) != 3:
        raise RuntimeError(f"expected 3 marked phases, got {len(phases)}")
    if seq and mb:
        r.seq_read_mbs = mb / phases[0]
        r.seq_write_mbs = mb / phases[1]
    if rand:
        r.rand_read_iops = rand / phases[2]
    return r


# ------------------------------------------------------------------------------------------------- engines
def run_kvmdm(elf: Path, image: Path, mb: int, rand: int, *, timeout: float = 600) -> list[float]:
    clock = _MarkerClock()
    cfg = MachineConfig(mem_size=128 << 20, kernel=elf.read_bytes(), cmdline=f"bench=1 mb={mb} rand={rand}")
    vmm = Vmm(cfg, serial_sink=clock).build()
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        vmm.attach_virtio(Block(fd, serial="bench"))
        vmm.finish()
        vmm.start()
        reason = vmm.wait(timeout)
        if reason is None:
            raise RuntimeError(f"kvmdm bench did not finish within {timeout} s: {bytes(clock.text)[-300:]!r}")
        vmm.stop(reason)
    finally:
        vmm.close()
        os.close(fd)
    _check(clock.text, "kvmdm")
    return clock.phases()


def run_qemu(elf: Path, image: Path, mb: int, rand: int, cache: str, *, timeout: float = 600) -> list[float]:
    drive = f"if=none,id=d0,file={image},format=raw,cache={cache}"
    extra = ["-drive", drive, "-device", "virtio-blk-pci,drive=d0,disable-legacy=on,serial=bench"]
    argv = qemu_command(elf, f"bench=1 mb={mb} rand={rand}", "kvm", 128, extra_args=extra)
    argv[0] = shutil.which(argv[0]) or argv[0]
    clock = _MarkerClock()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        fd = proc.stdout.fileno()
        while chunk := os.read(fd, 4096):
            clock.write(chunk)
        proc.wait()
        err = proc.stderr.read()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode not in (1, 3):  # isa-debug-exit (0 << 1) | 1 = ok, (1 << 1) | 1 = guest failure
        raise RuntimeError(f"QEMU bench failed (status {proc.returncode}): {err[-300:]!r}")
    _check(clock.text, f"QEMU cache={cache}")
    return clock.phases()


def run_fio(image: Path, mb: int, rand: int, *, direct: bool, cold: bool) -> Result:
    """fio psync iodepth=1: the same three phases on the same file."""
    r = Result()
    common = ["--ioengine=psync", "--iodepth=1", f"--direct={int(direct)}", f"--filename={image}",
              "--output-format=json", "--thread", "--group_reporting", "--invalidate=0"]

    def job(name: str, extra: list[str]) -> dict:
        if cold:
            drop_caches()
        out = subprocess.run(["fio", f"--name={name}", *common, *extra], capture_output=True, text=True,
                             check=True, timeout=600).stdout
        return json.loads(out[out.index("{"):])["jobs"][0]  # type: ignore[no-any-return]

    j = job("seqread", ["--rw=read", "--bs=1M", f"--size={mb}M"])
    r.seq_read_mbs = j["read"]["bw_bytes"] / MIB
    j = job("seqwrite", ["--rw=write", "--bs=1M", f"--size={mb}M"])
    r.seq_write_mbs = j["write"]["bw_bytes"] / MIB
    j = job("randread", ["--rw=randread", "--bs=4k", f"--number_ios={rand}", "--norandommap",
                         "--randrepeat=0"])
    r.rand_read_iops = j["read"]["iops"]
    return r


# ------------------------------------------------------------------------------------------------- driver
def measure_guest(runner: Callable[[int, int], list[float]], mb: int, rand: int, *, cold: bool,
                  image: Path) -> Result:
    if not cold:
        warm_cache(image)
        return _to_result(runner(mb, rand), mb, rand)
    # Cold: one run for the sequential phases and one (mb=1) for random reads, each after a drop.
    if not drop_caches():
        raise PermissionError("drop_caches needs root")
    seq = _to_result(runner(mb, 0), mb, 0)
    drop_caches()
    rnd = _to_result(runner(1, rand), 1, rand, seq=False)
    seq.rand_read_iops = rnd.rand_read_iops
    return seq


def _median(results: list[Result]) -> Result:
    def med(vals: list[float | None]) -> float | None:
        got = [v for v in vals if v is not None]
        return statistics.median(got) if got else None

    return Result(med([r.seq_read_mbs for r in results]), med([r.seq_write_mbs for r in results]),
                  med([r.rand_read_iops for r in results]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=256, help="MiB for the sequential phases (default 256)")
    p.add_argument("--rand", type=int, default=4096, help="random 4 KiB reads (default 4096)")
    p.add_argument("--image-mb", type=int, default=256)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--no-cold", action="store_true", help="skip the drop_caches configurations")
    p.add_argument("--no-qemu-none", action="store_true", help="skip QEMU cache=none / fio direct=1")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where the image lives (host fs)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.mb > args.image_mb:
        p.error("--mb must not exceed --image-mb")
    elf = build_guest(GUEST)
    caches = ["warm"] + ([] if args.no_cold or os.geteuid() != 0 else ["cold"])
    table: dict[str, Result] = {}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="kvmdm-bench-blk-") as d:
        image = Path(d) / "disk.raw"
        make_image(image, args.image_mb)
        engines: dict[str, Callable[[int, int], list[float]]] = {
            "kvmdm": lambda mb, rnd: run_kvmdm(elf, image, mb, rnd),
            "qemu-writeback": lambda mb, rnd: run_qemu(elf, image, mb, rnd, "writeback"),
        }
        if not args.no_qemu_none:
            engines["qemu-none"] = lambda mb, rnd: run_qemu(elf, image, mb, rnd, "none")
        for cache in caches:
            samples: dict[str, list[Result]] = {}
            for _ in range(args.repeat):  # interleaved, so load drift hits every engine alike
                for name, runner in engines.items():
                    samples.setdefault(name, []).append(
                        measure_guest(runner, args.mb, args.rand, cold=cache == "cold", image=image))
                if cache == "warm":
                    warm_cache(image)
                samples.setdefault("fio-buffered", []).append(
                    run_fio(image, args.mb, args.rand, direct=False, cold=cache == "cold"))
                if not args.no_qemu_none:
                    samples.setdefault("fio-direct", []).append(
                        run_fio(image, args.mb, args.rand, direct=True, cold=cache == "cold"))
            for name, rs in samples.items():
                table[f"{name}/{cache}"] = _median(rs)

    ratios: dict[str, float] = {}
    for cache in caches:
        k, n, q = (table.get(f"{e}/{cache}") for e in ("kvmdm", "fio-buffered", "qemu-writeback"))
        if k and n and k.seq_read_mbs and n.seq_read_mbs:
            ratios[f"{cache}: kvmdm/fio seq_read"] = k.seq_read_mbs / n.seq_read_mbs
        if k and n and k.seq_write_mbs and n.seq_write_mbs:
            ratios[f"{cache}: kvmdm/fio seq_write"] = k.seq_write_mbs / n.seq_write_mbs
        if k and q and k.rand_read_iops and q.rand_read_iops:
            ratios[f"{cache}: kvmdm/qemu-writeback rand_read IOPS"] = k.rand_read_iops / q.rand_read_iops
        if k and q and k.seq_read_mbs and q.seq_read_mbs:
            ratios[f"{cache}: kvmdm/qemu-writeback seq_read"] = k.seq_read_mbs / q.seq_read_mbs
        if k and q and k.seq_write_mbs and q.seq_write_mbs:
            ratios[f"{cache}: kvmdm/qemu-writeback seq_write"] = k.seq_write_mbs / q.seq_write_mbs

    if args.json:
        print(json.dumps({"mb": args.mb, "rand": args.rand, "repeat": args.repeat,
                          "results": {k: vars(v) for k, v in table.items()}, "ratios": ratios}))
        return 0
    print(f"virtio-blk, queue depth 1 (synchronous guest driver), {args.mb} MiB sequential in 1 MiB requests, "
          f"{args.rand} random 4 KiB reads; median of {args.repeat}")
    print(f"  {'engine/cache':28s} {'seq read MiB/s':>15s} {'seq write MiB/s':>16s} {'4k randread IOPS':>17s}")

    def fmt(v: float | None, w: int) -> str:
        return f"{v:{w}.1f}" if v is not None else f"{'-':>{w}s}"

    for name, r in table.items():
        print(f"  {name:28s} {fmt(r.seq_read_mbs, 15)} {fmt(r.seq_write_mbs, 16)} {fmt(r.rand_read_iops, 17)}")
    for name, v in ratios.items():
        target = ""
        if "fio seq" in name:
            target = f"  ({'meets' if v >= 0.95 else 'misses'} >= 0.95)"
        elif "IOPS" in name:
            target = f"  ({'meets' if v >= 1.0 else 'misses'} >= 1)"
        print(f"  ratio {name:48s} {v:6.3f}{target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
