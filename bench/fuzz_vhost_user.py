#!/usr/bin/env python3
"""Fuzz target: random and mutated vhost-user messages + fds through the Decoder and VhostUserSession.

Each case starts a fresh session on a virtio-blk device (tmp image, memfd guest RAM), builds a plausible
front-end conversation (handshake, memory table, ring setup, kicks) and mutates it: flipped bits in headers and
payloads, swapped request ids, wrong sizes, truncation, fds added, dropped or replaced by fds of the wrong kind
(memfd for an eventfd, eventfd for memory, pipes, sockets, a directory). Every byte goes through
``Decoder.feed``/``next_message`` and ``VhostUserSession.dispatch`` exactly as the socket server would, with
random split points. Invariants: nothing but ``FrontendError`` leaves the decoder, nothing at all leaves
dispatch, and after ``session.close()`` the process holds exactly the fds it held before the case (no leak).

    .venv/bin/python bench/fuzz_vhost_user.py [--cases N] [--seed S]

Exits non-zero on any crash or leak; a failing case replays with ``--seed S --cases 1``.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import socket
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmcore.memory import GuestMemory  # noqa: E402
from pv.blk import Block  # noqa: E402
from pv.testing import MockSplitQueue  # noqa: E402
from pv.vhost_user import protocol as P  # noqa: E402
from pv.vhost_user.backend import VhostUserSession  # noqa: E402

R = P.Request
UVA = 0x7F00_0000_0000
RAM = 1 << 20


def open_fds() -> set[int]:
    out = set()
    for n in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(n))
        except OSError:
            continue
        out.add(int(n))
    return out


class Case:
    """One fuzz case: a fresh device + session and a fd factory whose every fd is closed at the end."""

    def __init__(self, rng: random.Random, image_fd: int, mem: GuestMemory) -> None:
        self.rng = rng
        self.mem = mem
        self.session = VhostUserSession(Block(image_fd, num_queues=2, queue_size=64), max_memory=8 << 20)
        self.mine: list[int] = []  # fds the fuzzer owns (the session gets dups, as through SCM_RIGHTS)

    def _own(self, fd: int) -> int:
        self.mine.append(fd)
        return fd

    def fd(self, kind: str | None = None) -> int:
        kind = kind or self.rng.choice(["eventfd", "eventfd", "memfd", "pipe", "socket", "dir", "ram"])
        if kind == "eventfd":
            return self._own(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        if kind == "memfd":
            fd = self._own(os.memfd_create("fuzz", os.MFD_CLOEXEC))
            os.ftruncate(fd, self.rng.choice([0, 4096, 1 << 16]))
            return fd
        if kind == "pipe":
            r, w = os.pipe2(os.O_CLOEXEC)
            self._own(w)
            return self._own(r)
        if kind == "socket":
            a, b = socket.socketpair()
            self._own(b.detach())
            return self._own(a.detach())
        if kind == "dir":
            return self._own(os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        return self._own(os.dup(self.mem.slots()[0].fd))

    def conversation(self) -> list[tuple[bytes, list[int]]]:
        """A valid front-end conversation (QEMU's order), as (wire bytes, fds) per message."""
        rng = self.rng
        msgs: list[tuple[int, int, bytes, list[int]]] = []

        def add(req: int, payload: bytes = b"", fds: list[int] | None = None, need_reply: bool = False) -> None:
            msgs.append((req, 1 | (P.FLAG_NEED_REPLY if need_reply else 0), payload, fds or []))

        u64 = struct.Struct("=Q").pack
        add(R.GET_FEATURES)
        add(R.GET_PROTOCOL_FEATURES)
        add(R.SET_PROTOCOL_FEATURES, u64(self.session.protocol_features_offered))
        add(R.GET_QUEUE_NUM)
        add(R.SET_OWNER)
        add(R.GET_CONFIG, P.ConfigPayload(0, 60, 0, bytes(60)).pack())
        add(R.SET_FEATURES, u64(self.session.features_offered), need_reply=True)
        regions = []
        fds = []
        for s in self.mem.slots():
            regions.append(P.MemoryRegion(s.gpa, s.size, UVA + s.gpa, s.fd_offset))
            fds.append(self._own(os.dup(s.fd)))
        add(R.SET_MEM_TABLE, P.pack_mem_table(regions), fds, need_reply=True)
        for i in range(rng.randint(1, 2)):
            q = MockSplitQueue(self.mem, 16, base=0x1000 + i * 0x20000, limit=0x21000 + i * 0x20000, index=i,
                               seed=rng.randrange(1 << 30))
            add(R.SET_VRING_NUM, P.VringState(i, 16).pack())
            add(R.SET_VRING_BASE, P.VringState(i, 0).pack())
            add(R.SET_VRING_ADDR, P.VringAddr(i, 0, UVA + q.desc_table, UVA + q.used_ring, UVA + q.avail_ring,
                                              0).pack())
            add(R.SET_VRING_KICK, u64(i), [self.fd("eventfd")])
            add(R.SET_VRING_CALL, u64(i), [self.fd("eventfd")])
            add(R.SET_VRING_ERR, u64(i), [self.fd("eventfd")])
            add(R.SET_VRING_ENABLE, P.VringState(i, 1).pack(), need_reply=True)
            for _ in range(rng.randint(0, 3)):
                q.add_chain([struct.pack("<IIQ", rng.choice([0, 1, 4, 8, 99]), 0, rng.randrange(4096)),
                             rng.randbytes(rng.choice([0, 512, 1024])), rng.choice([1, 513])])
        if rng.random() < 0.5:
            add(R.GET_VRING_BASE, P.VringState(0, 0).pack())
        if rng.random() < 0.3:
            add(R.RESET_DEVICE, need_reply=True)
        return [(P.HEADER.pack(req, fl, len(pl)) + pl, f) for req, fl, pl, f in msgs]

    def mutate(self, conv: list[tuple[bytes, list[int]]]) -> list[tuple[bytes, list[int]]]:
        rng = self.rng
        out = [(bytearray(b), list(f)) for b, f in conv]
        for _ in range(rng.randint(0, 6)):
            if not out:
                break
            i = rng.randrange(len(out))
            raw, fds = out[i]
            op = rng.randrange(11)
            if op == 0 and raw:  # flip a bit anywhere
                j = rng.randrange(len(raw))
                raw[j] ^= 1 << rng.randrange(8)
            elif op == 1 and len(raw) >= 12:  # another request id (known or not)
                struct.pack_into("=I", raw, 0, rng.choice([*map(int, R), 0, 41, 0xFFFFFFFF]))
            elif op == 2 and len(raw) >= 12:  # lie about the size
                struct.pack_into("=I", raw, 8, rng.choice([0, 1, 7, 8, 39, 40, 264, 268, 269, 1 << 31]))
            elif op == 3 and len(raw) > 1:  # truncate
                del raw[rng.randrange(1, len(raw)) :]
            elif op == 4:  # extra fd of any kind
                fds.append(self.fd())
            elif op == 5 and fds:  # drop an fd
                fds.pop(rng.randrange(len(fds)))
            elif op == 6 and fds:  # wrong kind of fd
                fds[rng.randrange(len(fds))] = self.fd()
            elif op == 7:  # duplicate or reorder messages
                j = rng.randrange(len(out))
                out.insert(j, (bytearray(raw), list(fds)))
            elif op == 8:  # random payload word
                if len(raw) >= 20:
                    struct.pack_into("=Q", raw, rng.randrange(12, len(raw) - 7), rng.randrange(1 << 64))
            elif op == 9:  # random garbage message
                out.insert(i, (bytearray(rng.randbytes(rng.randrange(1, 40))), []))
            else:  # too many fds
                out[i] = (raw, fds + [self.fd("eventfd") for _ in range(rng.randint(8, 10))])
        return [(bytes(b), f) for b, f in out]

    def run(self, conv: list[tuple[bytes, list[int]]]) -> None:
        rng = self.rng
        dec = P.Decoder()
        try:
            for raw, fds in conv:
                # The session gets its own copies, as recvmsg would install them.
                recv_fds = [os.dup(fd) for fd in fds]
                if not raw:
                    P.close_fds(recv_fds)
                    continue
                cut = rng.randrange(1, len(raw) + 1)  # fds ride with the first bytes, like SCM_RIGHTS
                for chunk, chunk_fds in ((raw[:cut], recv_fds), (raw[cut:], [])):
                    if not chunk:
                        continue
                    try:
                        dec.feed(chunk, chunk_fds)
                        while (msg := dec.next_message()) is not None:
                            _reply, keep = self.session.dispatch(msg)
                            if not keep:
                                return
                    except P.FrontendError:
                        return
                # Let ring workers race with the next message now and then.
                if rng.random() < 0.05:
                    time.sleep(0.001)
        finally:
            dec.close()
            self.session.close()

    def close(self) -> None:
        P.close_fds(self.mine)


TOTALS = {"messages": 0, "refused": 0, "activations": 0}


def run_case(seed: int, image_fd: int, mem: GuestMemory) -> None:
    rng = random.Random(seed)
    case = Case(rng, image_fd, mem)
    try:
        conv = case.conversation()
        if rng.random() < 0.9:
            conv = case.mutate(conv)
        case.run(conv)
    finally:
        case.close()
        st = case.session.stats
        TOTALS["messages"] += st.messages
        TOTALS["refused"] += st.errors
        TOTALS["activations"] += st.activations


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    args = ap.parse_args(argv)
    logging.disable(logging.CRITICAL)  # the session logs every refusal; the fuzzer wants speed
    crashes = leaks = 0
    with tempfile.TemporaryFile() as img:
        img.truncate(1 << 20)
        mem = GuestMemory.create([(0, RAM), (RAM + (1 << 20), 1 << 16)], name="fuzz-vhost-user")
        baseline = open_fds()
        t0 = time.monotonic()
        for i in range(args.cases):
            seed = args.seed + i
            try:
                run_case(seed, img.fileno(), mem)
            except Exception:
                crashes += 1
                print(f"CRASH seed={seed}", file=sys.stderr)
                traceback.print_exc()
            now = open_fds()
            if now != baseline:
                leaks += 1
                print(f"FD LEAK seed={seed}: {sorted(now - baseline)} extra, {sorted(baseline - now)} missing",
                      file=sys.stderr)
                baseline = now
        dt = time.monotonic() - t0
        mem.close()
    print(f"{args.cases} cases in {dt:.1f} s ({args.cases / dt:.0f}/s), seed {args.seed}: "
          f"{crashes} crashes, {leaks} fd leaks; {TOTALS['messages']} messages dispatched, "
          f"{TOTALS['refused']} refused, {TOTALS['activations']} device activations")
    return 1 if crashes or leaks else 0


if __name__ == "__main__":
    sys.exit(main())
