"""Micro-benchmark of the virtio-blk request path in Python: pop -> process_request -> add_used, no guest, no KVM.

A :class:`~pv.testing.MockSplitQueue` plays the driver: it lays out N typical Linux virtio-blk chains (16-byte
request header, one data buffer, 1-byte status; direct 3-descriptor chains or one indirect descriptor pointing at
a 3-entry table) in a memfd-backed GuestMemory, and a :class:`~pv.blk.Block` serves them from a temporary raw image
(warm in the page cache). Each scenario is timed per phase with ``time.perf_counter_ns`` (pop, process_request,
add_used, and the total of the three), and the same loop can be run under cProfile.

The ring is refilled by rewinding ``next_avail``/``avail idx`` (``set_position``), so the driver-side cost of
building chains is paid once, outside the measurement.

    python -m bench.blk_path [--iters 20000] [--profile SCENARIO] [--json]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pv.blk import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, Block  # noqa: E402
from pv.queue import SplitQueue  # noqa: E402
from pv.testing import FakeHealth, MockSplitQueue, make_guest_memory  # noqa: E402
from pv.worker import QueueWorker  # noqa: E402

_HDR = struct.Struct("<IIQ")
KIB = 1 << 10
MIB = 1 << 20
IMAGE_BYTES = 64 * MIB


@dataclass
class Scenario:
    name: str
    rtype: int
    data_len: int
    indirect: bool
    chains: int  # chains laid out in the ring (= ring size; one batch)


SCENARIOS = [
    Scenario("read-4k-direct", VIRTIO_BLK_T_IN, 4 * KIB, False, 64),
    Scenario("read-4k-indirect", VIRTIO_BLK_T_IN, 4 * KIB, True, 64),
    Scenario("write-4k-direct", VIRTIO_BLK_T_OUT, 4 * KIB, False, 64),
    Scenario("read-1m-direct", VIRTIO_BLK_T_IN, MIB, False, 8),
    Scenario("read-1m-indirect", VIRTIO_BLK_T_IN, MIB, True, 8),
    Scenario("write-1m-direct", VIRTIO_BLK_T_OUT, MIB, False, 8),
]


class Rig:
    """One queue of ``sc.chains`` identical-shape chains over a Block on ``image_fd``."""

    def __init__(self, sc: Scenario, image_fd: int) -> None:
        self.sc = sc
        ring = 3 * sc.chains if not sc.indirect else sc.chains
        size = 1 << (ring - 1).bit_length()
        main = max(4 * MIB, _round_pow2(sc.chains * (sc.data_len + 4 * KIB) + 2 * MIB))
        self.mem = make_guest_memory(main)
        self.mock = MockSplitQueue(self.mem, size, seed=1, max_gap=64)
        sectors = IMAGE_BYTES // 512
        step = max(sc.data_len // 512, 8)
        heads = []
        for i in range(sc.chains):
            sector = (i * 7919 * step) % (sectors - step)
            sector -= sector % 8
            hdr = _HDR.pack(sc.rtype, 0, sector)
            if sc.rtype == VIRTIO_BLK_T_IN:
                segs: list[bytes | int] = [hdr, sc.data_len, 1]
            else:
                segs = [hdr, bytes(sc.data_len), 1]
            heads.append(self.mock.add_chain(segs, indirect=sc.indirect))
        self.heads = heads
        self.blk = Block(image_fd, serial="bench")
        self.blk.acked_features = self.blk.device_features()
        self.q = SplitQueue(self.mem, self.mock.config(), indirect=True)
        self.q.validate()

    def rewind(self) -> None:
        self.q.set_position(0, 0)

    def close(self) -> None:
        self.q.close()
        self.mem.close()


def _round_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _time_phases(rig: Rig, iters: int) -> dict[str, float]:
    """Per-request ns of each phase (min over batches of one full ring: the least disturbed by load)."""
    q = rig.q
    handler = rig.blk.process_request
    clock = time.perf_counter_ns
    pop_ns: list[float] = []
    proc_ns: list[float] = []
    used_ns: list[float] = []
    total_ns: list[float] = []
    n = rig.sc.chains
    batches = max(1, iters // n)
    for _ in range(batches):
        rig.rewind()
        tp = tr = tu = 0
        t_start = clock()
        for _ in range(n):
            t0 = clock()
            chain = q.pop()
            t1 = clock()
            assert chain is not None
            written = handler(chain)
            t2 = clock()
            q.add_used(chain.head_index, written)
            t3 = clock()
            tp += t1 - t0
            tr += t2 - t1
            tu += t3 - t2
        t_end = clock()
        pop_ns.append(tp / n)
        proc_ns.append(tr / n)
        used_ns.append(tu / n)
        total_ns.append((t_end - t_start) / n)
    assert rig.blk.metrics.io_errors == 0 and rig.blk.metrics.unsupported == 0, rig.blk.metrics
    return {"pop": min(pop_ns), "process": min(proc_ns), "add_used": min(used_ns), "total": min(total_ns)}


def _time_loop(rig: Rig, iters: int) -> float:
    """Per-request ns of the bare pop/process/add_used loop (no per-phase clocks), min over batches."""
    q = rig.q
    handler = rig.blk.process_request
    clock = time.perf_counter_ns
    n = rig.sc.chains
    out = []
    for _ in range(max(1, iters // n)):
        rig.rewind()
        t0 = clock()
        for _ in range(n):
            chain = q.pop()
            assert chain is not None
            q.add_used(chain.head_index, handler(chain))
        out.append((clock() - t0) / n)
    return min(out)


def _time_serve_qd1(rig: Rig, iters: int) -> float:
    """Per-request ns of QueueWorker._serve with one chain published per call (queue depth 1, as the bench
    guest drives it): pop, process, add_used, the empty re-pop, notification re-enable and signal_used."""
    health = FakeHealth()
    worker = QueueWorker("bench", [(rig.q, rig.blk.process_request)], health)
    st = worker._states[0]
    serve = worker._serve
    mock = rig.mock
    q = rig.q
    clock = time.perf_counter_ns
    n = rig.sc.chains
    out = []
    for _ in range(max(1, iters // n)):
        q.set_position(0, 0)
        mock.set_avail_idx(0)
        t0 = clock()
        for k in range(1, n + 1):
            mock.set_avail_idx(k)
            serve(st)
        out.append((clock() - t0) / n)
    assert not health.resets and st.stats.chains == n * len(out), (health.resets, st.stats)
    return min(out)


def _syscall_floor(rig: Rig, iters: int) -> float:
    """ns per bare preadv/pwritev of the same buffers at the same offsets: the part Python cannot remove."""
    fd = rig.blk.fd
    io = os.preadv if rig.sc.rtype == VIRTIO_BLK_T_IN else os.pwritev
    clock = time.perf_counter_ns
    n = rig.sc.chains
    step = max(rig.sc.data_len // 512, 8)
    bufs = [rig.mock.buffers(h)[1] for h in rig.heads]  # header, data, status
    views = [rig.mem.view(b.addr, b.len) for b in bufs]
    work = [
        ([v], ((i * 7919 * step) % (IMAGE_BYTES // 512 - step)) // 8 * 8 * 512) for i, v in enumerate(views)
    ]
    out = []
    for _ in range(max(1, iters // n)):
        t0 = clock()
        for iov, off in work:
            io(fd, iov, off)
        out.append((clock() - t0) / n)
    work.clear()
    for v in views:
        v.release()
    return min(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=20000, help="requests per 4 KiB scenario (1 MiB: a tenth)")
    p.add_argument("--only", default="", help="comma-separated scenario names")
    p.add_argument("--profile", default="", help="run SCENARIO under cProfile and print the top functions")
    p.add_argument("--json", action="store_true")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="kvmdm-blk-path-") as d:
        image = Path(d) / "disk.raw"
        with open(image, "wb") as f:
            chunk = os.urandom(MIB)
            for _ in range(IMAGE_BYTES // MIB):
                f.write(chunk)
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        try:
            if args.profile:
                sc = next(s for s in SCENARIOS if s.name == args.profile)
                rig = Rig(sc, fd)
                _time_loop(rig, 2000)
                prof = cProfile.Profile()
                prof.enable()
                _time_loop(rig, args.iters)
                prof.disable()
                rig.close()
                pstats.Stats(prof).sort_stats("tottime").print_stats(18)
                return 0
            only = set(filter(None, args.only.split(",")))
            results: dict[str, dict[str, float]] = {}
            for sc in SCENARIOS:
                if only and sc.name not in only:
                    continue
                iters = args.iters if sc.data_len <= 64 * KIB else max(args.iters // 10, 200)
                rig = Rig(sc, fd)
                try:
                    _time_loop(rig, iters // 4)  # warm up (page cache, allocator, specialising interpreter)
                    r = _time_phases(rig, iters)
                    r["loop"] = _time_loop(rig, iters)
                    r["serve_qd1"] = _time_serve_qd1(rig, iters)
                    r["syscall"] = _syscall_floor(rig, iters)
                    r["python"] = r["loop"] - r["syscall"]
                finally:
                    rig.close()
                results[sc.name] = {k: v / 1000 for k, v in r.items()}  # µs
        finally:
            os.close(fd)
    if args.json:
        print(json.dumps(results))
        return 0
    print("µs per request (mean over a ring-sized batch, min over batches); phases timed separately;")
    print("'loop' = pop/process/add_used without phase clocks;")
    print("'syscall' = bare preadv/pwritev of the same size and offsets; 'python' = loop - syscall;")
    print("'serve_qd1' = the worker's _serve with one chain per call (kick handling without epoll)")
    cols = ("pop", "process", "add_used", "total", "loop", "syscall", "python", "serve_qd1")
    print(f"  {'scenario':18s}" + "".join(f"{c:>10s}" for c in cols))
    for name, r in results.items():
        print(f"  {name:18s}" + "".join(f"{r[c]:10.2f}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
