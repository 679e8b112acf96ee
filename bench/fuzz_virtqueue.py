#!/usr/bin/env python3
"""Fuzz/bench target: arbitrary split rings through SplitQueue + virtio-blk + virtio-rng.

Each case lays out a random, mostly-plausible-but-hostile ring (descriptor table, indirect tables, available ring,
indices, buffers that start with request headers) in real guest memory, then pops every chain, serves it with the
Block or Rng backend, returns it to the used ring and runs the notification logic. The only exceptions allowed
are pv.errors.VirtqueueError (guest errors); anything else is a crash. Prints cases/s and the crash count; exits
non-zero on any crash.

    .venv/bin/python bench/fuzz_virtqueue.py [--cases N] [--seed S]
    .venv/bin/python bench/fuzz_virtqueue.py --atheris [libFuzzer flags, e.g. -runs=100000]

(h11's fuzz/afl-server.py is the model: one harness, deterministic replay of a failing case by its seed.)
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmcore.memory import GuestMemory  # noqa: E402
from pv.blk import Block  # noqa: E402
from pv.device import QueueConfig  # noqa: E402
from pv.errors import VirtqueueError  # noqa: E402
from pv.queue import DescriptorChain, SplitQueue  # noqa: E402
from pv.rng import Rng  # noqa: E402
from pv.testing import make_guest_memory  # noqa: E402

MAIN = 1 << 18  # RAM [0, 256 KiB), a 1 MiB hole, then a 64 KiB guard region
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000  # room for queues up to 256 entries
TABLES = (0x6000, 0x7000, MAIN - 64)
BUFS = 0x8000  # buffers live in [BUFS, MAIN)
HEADER_SLOTS = tuple(BUFS + 0x1000 * i for i in range(8))  # buffers here start with a request header
SIZES = (1, 2, 4, 8, 16, 32, 256)
REQ_TYPES = (0, 1, 4, 8, 10, 11, 13, 14, 0xFFFFFFFF)

_DESC = struct.Struct("<QIHH")
_HDR = struct.Struct("<IIQ")
_DWZ = struct.Struct("<QII")
_U16 = struct.Struct("<H")


class Source(Protocol):
    def below(self, n: int) -> int: ...  # uniform in [0, n)
    def bits(self, k: int) -> int: ...


class RandomSource:
    def __init__(self, seed: int) -> None:
        self._r = random.Random(seed)
        self.below = self._r.randrange
        self.bits = self._r.getrandbits


class AtherisSource:
    def __init__(self, fdp: object) -> None:
        self._f = fdp

    def below(self, n: int) -> int:
        return int(self._f.ConsumeIntInRange(0, n - 1))  # type: ignore[attr-defined]

    def bits(self, k: int) -> int:
        return int(self._f.ConsumeIntInRange(0, (1 << k) - 1))  # type: ignore[attr-defined]


def _pick(src: Source, ok: Callable[[], int], hostile: Callable[[], int], pct: int) -> int:
    return hostile() if src.below(100) < pct else ok()


def _addr(src: Source) -> int:
    return _pick(
        src,
        lambda: (
            HEADER_SLOTS[src.below(len(HEADER_SLOTS))]
            if src.below(2)
            else BUFS + src.below(MAIN - BUFS - 4096)
        ),
        lambda: (
            TABLES[src.below(len(TABLES))],
            src.bits(64),
            MAIN - 1 - src.below(16),
            MAIN + (1 << 20) + src.below(1 << 16),
            DESC,
            USED,
        )[src.below(6)],
        12,
    )


def _len(src: Source) -> int:
    return _pick(
        src,
        lambda: (512 * (1 + src.below(4)), 16 * (1 + src.below(3)), 1, src.below(4097))[src.below(4)],
        lambda: (0, src.bits(32), MAIN, 0xFFFFFFFF, 15)[src.below(5)],
        10,
    )


def _desc(src: Source, table_len: int, indirect_tables: bool) -> bytes:
    flags = _pick(
        src,
        lambda: src.below(4) | (4 if indirect_tables and src.below(6) == 0 else 0),
        lambda: src.bits(16),
        4,
    )
    nxt = _pick(src, lambda: src.below(table_len), lambda: src.bits(16), 4)
    addr = TABLES[src.below(len(TABLES))] if flags & 4 else _addr(src)
    length = 16 * (1 + src.below(4)) if flags & 4 and src.below(4) else _len(src)
    return _DESC.pack(addr, length, flags, nxt)


@dataclass
class Stats:
    cases: int = 0
    chains: int = 0
    crashes: int = 0
    guest_errors: Counter[str] = field(default_factory=Counter)
    blk_outcomes: Counter[str] = field(default_factory=Counter)


def _wellformed(src: Source) -> list[tuple[int, int, int]]:
    """(addr, len, flags) of a request-shaped chain: header, data, status; then maybe one field mutated."""
    slot = HEADER_SLOTS[src.below(len(HEADER_SLOTS))]
    data = BUFS + 0x10000 + 512 * src.below(64)
    n = 512 * (1 + src.below(8))
    rtype = src.below(3)  # 0: IN, 1: OUT / other types via the header slot, 2: discard/zeroes-style payload
    if rtype == 0:
        descs = [(slot, 16, 0), (data, n, 2), (data + n, 1, 2)]
    elif rtype == 1:
        descs = [(slot, 16, 0), (data, n, 0), (data + n, 1, 2)]
    else:
        descs = [(slot, 32, 0), (data, 1 + src.below(64), 2)]
    if src.below(3) == 0:
        i = src.below(len(descs))
        a, ln, f = descs[i]
        descs[i] = (
            (a ^ (1 << src.below(64)), ln, f)
            if src.below(2)
            else (a, ln ^ (1 << src.below(32)), f ^ src.below(4))
        )
    return descs


def _plant_wellformed(mem: GuestMemory, src: Source, size: int) -> list[int]:
    """Overwrite parts of the descriptor table (or an indirect table) with well-formed chains; returns heads."""
    descs = _wellformed(src)
    if size < len(descs) or src.below(3) == 0:
        table = TABLES[0]
        mem.write(
            table,
            b"".join(
                _DESC.pack(a, ln, f | (1 if j < len(descs) - 1 else 0), j + 1)
                for j, (a, ln, f) in enumerate(descs)
            ),
        )
        head = src.below(size)
        mem.write(DESC + 16 * head, _DESC.pack(table, 16 * len(descs), 4, 0))
        return [head]
    idx = random.Random(src.bits(32)).sample(range(size), len(descs))
    for j, (a, ln, f) in enumerate(descs):
        last = j == len(descs) - 1
        mem.write(DESC + 16 * idx[j], _DESC.pack(a, ln, f | (0 if last else 1), 0 if last else idx[j + 1]))
    return [idx[0]]


def build_case(mem: GuestMemory, src: Source) -> tuple[QueueConfig, int, bool]:
    size = SIZES[src.below(len(SIZES))]
    mem.write(DESC, b"".join(_desc(src, size, True) for _ in range(size)))
    for t in TABLES:
        mem.write(t, b"".join(_desc(src, 4, src.below(8) == 0) for _ in range(4)))
    for slot in HEADER_SLOTS:
        sector = _pick(src, lambda: src.below(140), lambda: src.bits(64), 10)
        hdr = _HDR.pack(REQ_TYPES[src.below(len(REQ_TYPES))], 0, sector)
        seg = _DWZ.pack(
            src.below(140), src.below(16), _pick(src, lambda: src.below(2), lambda: src.bits(32), 10)
        )
        mem.write(slot, hdr + seg)
    heads = _plant_wellformed(mem, src, size) if src.below(2) else []
    start = _pick(src, lambda: 0, lambda: src.bits(16), 50)
    ahead = _pick(src, lambda: src.below(size + 1), lambda: src.bits(16), 5)
    mem.write(AVAIL, struct.pack("<HH", src.below(2), (start + ahead) & 0xFFFF))
    ring_heads = [_pick(src, lambda: src.below(size), lambda: src.bits(16), 4) for _ in range(size)]
    for i, h in enumerate(heads):
        ring_heads[(start + i) % size] = h
    ring = b"".join(_U16.pack(h) for h in ring_heads)
    mem.write(AVAIL + 4, ring + _U16.pack(src.bits(16)))
    mem.write(USED, struct.pack("<HH", 0, start))
    cfg = QueueConfig(0, size, DESC, AVAIL, USED, -1, -1, bool(src.below(2)))
    return cfg, start, bool(src.below(8))


def run_case(
    mem: GuestMemory, src: Source, handlers: list[Callable[[DescriptorChain], int]], stats: Stats
) -> None:
    cfg, start, indirect = build_case(mem, src)
    handler = handlers[src.below(len(handlers))]
    q = SplitQueue(mem, cfg, indirect=indirect)
    q.set_position(start, start)
    try:
        q.validate()
        for _ in range(2 * cfg.size + 2):
            chain = q.pop()
            if chain is None:
                break
            written = handler(chain)
            if not 0 <= written <= chain.writable_len:
                raise AssertionError(f"handler wrote {written} of {chain.writable_len} bytes")
            q.add_used(chain.head_index, written)
            stats.chains += 1
            del chain
        q.needs_notification()
        q.enable_notification()
    except VirtqueueError as e:
        stats.guest_errors[type(e).__name__] += 1
    finally:
        q.close()


def make_devices(image_fd: int) -> tuple[list[Block], Rng]:
    blk = Block(image_fd, serial="fuzz")
    blk.ack_features(blk.device_features())
    blk_ro = Block(image_fd, serial="fuzz-ro", read_only=True)
    blk_ro.ack_features(blk_ro.device_features())
    return [blk, blk_ro], Rng(max_bytes_per_request=4096)


def handlers_of(blks: list[Block], rng: Rng) -> list[Callable[[DescriptorChain], int]]:
    out: list[Callable[[DescriptorChain], int]] = [b.process_request for b in blks]
    return [*out, rng.process_request]


def tally(stats: Stats, blks: list[Block]) -> None:
    """How deep the cases got into virtio-blk (a fuzzer that only hits the first check proves little)."""
    for b in blks:
        for k, v in vars(b.metrics).items():
            stats.blk_outcomes[k] += v


def run(cases: int, seed: int, *, out: TextIO | None = None, max_reports: int = 5) -> Stats:
    stats = Stats()
    with tempfile.TemporaryFile() as img, make_guest_memory(MAIN) as mem:
        img.truncate(64 * 1024)
        blks, rng = make_devices(img.fileno())
        handlers = handlers_of(blks, rng)
        for i in range(cases):
            case_seed = seed * 1_000_003 + i
            try:
                run_case(mem, RandomSource(case_seed), handlers, stats)
            except Exception:
                stats.crashes += 1
                if stats.crashes <= max_reports:
                    print(f"CRASH in case {i} (replay: --seed {seed} --case {i}):", file=out or sys.stdout)
                    traceback.print_exc(file=out or sys.stdout)
            stats.cases += 1
        tally(stats, blks)
    return stats


def run_atheris(argv: list[str]) -> int:
    import atheris  # type: ignore[import-not-found]

    atheris.instrument_all()  # pv/ is already imported: instrument its bytecode for coverage feedback

    img = tempfile.TemporaryFile()
    img.truncate(64 * 1024)
    mem = make_guest_memory(MAIN)
    handlers = handlers_of(*make_devices(img.fileno()))
    stats = Stats()

    def one_input(data: bytes) -> None:
        run_case(mem, AtherisSource(atheris.FuzzedDataProvider(data)), handlers, stats)

    atheris.Setup(argv, one_input)
    atheris.Fuzz()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--cases", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "little"))
    p.add_argument("--case", type=int, default=None, help="replay one case of --seed")
    p.add_argument(
        "--atheris", action="store_true", help="coverage-guided with atheris (remaining args to libFuzzer)"
    )
    args, rest = p.parse_known_args(argv)
    # Guest errors are expected here by the thousand; the devices' rate-limited warnings would only be noise.
    logging.getLogger("pv").setLevel(logging.CRITICAL)
    if args.atheris:
        return run_atheris([sys.argv[0], *rest])
    if rest:
        p.error(f"unknown arguments {rest}")
    if args.case is not None:
        stats = Stats()
        with tempfile.TemporaryFile() as img, make_guest_memory(MAIN) as mem:
            img.truncate(64 * 1024)
            handlers = handlers_of(*make_devices(img.fileno()))
            run_case(mem, RandomSource(args.seed * 1_000_003 + args.case), handlers, stats)
        print(f"case {args.case}: {stats.chains} chains, guest errors {dict(stats.guest_errors)}")
        return 0
    t0 = time.perf_counter()
    stats = run(args.cases, args.seed)
    dt = time.perf_counter() - t0
    errs = sum(stats.guest_errors.values())
    print(
        f"seed {args.seed}: {stats.cases} cases in {dt:.2f} s ({stats.cases / dt:,.0f} cases/s), "
        f"{stats.chains} chains served, {errs} guest errors caught"
    )
    print("guest errors: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.guest_errors.items())))
    print("virtio-blk outcomes: " + ", ".join(f"{k}={v}" for k, v in stats.blk_outcomes.items() if v))
    print(f"{stats.crashes} crashes")
    return 1 if stats.crashes else 0


if __name__ == "__main__":
    sys.exit(main())
