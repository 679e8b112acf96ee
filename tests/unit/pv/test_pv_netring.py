"""pv.netring (the C per-frame loop) against pv.net's Python path, its reference: on the same rings, the same frames
and the same features, both must leave guest memory, the tap's traffic, the metrics and the error byte-identical.

Two worlds are built from the same seeds: guest memory, a SOCK_SEQPACKET pair standing in for the tap, driver-side
mock queues. The guest side is hostile (raw descriptors with random addresses, lengths, flags and links, published
alongside well-formed chains, direct and indirect); the C engine must defer everything it does not serve to the
Python path, so any divergence is a bug in one of them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmcore.memory import GuestMemory, GuestMemoryError
from pv import netring
from pv.device import VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1
from pv.errors import VirtqueueError
from pv.net import (
    NET_HDR,
    TX_QUEUE,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_MRG_RXBUF,
    NetEngine,
    NetMetrics,
    resolve_engine,
)
from pv.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, SplitQueue
from pv.testing import MockSplitQueue, make_guest_memory

MEM = 4 << 20
QSIZE = 32
V1 = 1 << VIRTIO_F_VERSION_1
FEATURES = [
    V1,
    V1 | (1 << VIRTIO_NET_F_MRG_RXBUF),
    V1 | (1 << VIRTIO_F_INDIRECT_DESC),
    V1 | (1 << VIRTIO_NET_F_MRG_RXBUF) | (1 << VIRTIO_F_INDIRECT_DESC) | (1 << VIRTIO_NET_F_CSUM),
]


def test_the_c_loop_builds_on_this_machine() -> None:
    # CI machines have gcc and the Python headers (scripts/setup): it must not silently fall back there.
    assert netring.AVAILABLE
    assert resolve_engine(None) == "c"


def test_engine_choice_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="engine must be one of"):
        resolve_engine("fortran")
    monkeypatch.setenv("KVMDM_NET_ENGINE", "python")
    assert resolve_engine(None) == "python"
    monkeypatch.setenv("KVMDM_NET_ENGINE", "gpu")
    with pytest.raises(ValueError, match="gpu"):
        resolve_engine(None)


class World:
    def __init__(self, engine: str, features: int, qsize: int = QSIZE) -> None:
        self.mem: GuestMemory = make_guest_memory(MEM)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        a.setblocking(False)
        b.setblocking(False)
        self.dev_sock, self.peer = a, b
        self.rx = MockSplitQueue(self.mem, qsize, base=0x1000, limit=0x200000, seed=3, max_gap=64)
        self.tx = MockSplitQueue(self.mem, qsize, base=0x200000, limit=MEM, seed=4, index=TX_QUEUE, max_gap=64)
        indirect = bool(features & (1 << VIRTIO_F_INDIRECT_DESC))
        self.rxq = SplitQueue(self.mem, self.rx.config(), indirect=indirect)
        self.txq = SplitQueue(self.mem, self.tx.config(), indirect=indirect)
        self.rxq.validate()
        self.txq.validate()
        self.metrics = NetMetrics()
        self.engine = NetEngine(self.rxq, self.txq, a.fileno(), features, self.metrics, budget=8, engine=engine)
        self.errors: list[str] = []
        self.returned: list[object] = []

    def step(self, fn: str) -> None:
        if self.errors:
            return  # a real device stops at its first guest error (NEEDS_RESET)
        try:
            self.returned.append(getattr(self.engine, fn)())  # what the loop waits for next must match too
        except (VirtqueueError, GuestMemoryError) as e:
            self.errors.append(type(e).__name__)

    def sent(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.peer.recv(1 << 17))
            except BlockingIOError:
                return out

    def outcome(self) -> dict[str, object]:
        eng = self.engine
        return {
            "errors": self.errors,
            "returned": self.returned,
            "sent": self.sent(),
            "memory": self.mem.read(0, MEM),
            "metrics": asdict(self.metrics),
            "tx_position": (self.txq.next_avail, self.txq.next_used),
            # The C loop gives back chains of a frame it cannot place; the Python path holds them: same ring.
            "rx_position": ((self.rxq.next_avail - len(eng._rx_held)) & 0xFFFF, self.rxq.next_used),
            "rx_pending_frame": bytes(eng._bounce[: eng._rx_len]) if eng._rx_len else b"",
        }

    def close(self) -> None:
        self.engine.close()
        self.rxq.close()
        self.txq.close()
        self.mem.close()
        self.dev_sock.close()
        self.peer.close()


@pytest.fixture
def worlds() -> Iterator[list[World]]:
    made: list[World] = []
    yield made
    for w in made:
        w.close()


_raw = st.tuples(
    st.integers(0, QSIZE - 1),  # descriptor index
    st.one_of(st.integers(0, MEM + 0x20_0000), st.sampled_from([0, 0x1000, MEM - 16, 2**64 - 8])),
    st.one_of(st.integers(0, 4000), st.sampled_from([0, 0, 12, 16, 32, 0xFFFF_FFFF])),
    st.sampled_from([0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
                     VIRTQ_DESC_F_INDIRECT, 7]),
    st.integers(0, QSIZE + 2),
)
_tx_chain = st.tuples(
    st.lists(st.integers(0, 1600), min_size=1, max_size=4),  # buffer lengths (header + frame split over them)
    st.sampled_from([0, 1, 2]),  # header flags
    st.sampled_from([0, 1, 4, 0x81, 3]),  # gso_type
    st.booleans(),  # indirect
)
_rx_chain = st.tuples(st.lists(st.integers(1, 2100), min_size=1, max_size=3), st.booleans())


def test_zero_length_readable_descriptor_in_an_rx_chain_is_rejected_like_the_reference(worlds: list[World]) -> None:
    for engine in ("python", "c"):
        w = World(engine, V1)
        worlds.append(w)
        a, b = w.rx._free.pop(), w.rx._free.pop()
        w.rx.write_desc(a, 0x1000, 0, VIRTQ_DESC_F_NEXT, b)  # readable, empty: still a readable descriptor
        w.rx.write_desc(b, 0x100000, 2048, VIRTQ_DESC_F_WRITE)
        w.rx.publish(a)
        w.peer.send(NET_HDR.pack(0, 0, 0, 0, 0, 0, 0) + b"z" * 60)
        w.step("process_rx")
        assert w.errors == ["RxChainReadable"], engine


def _build(w: World, raw: list[tuple[int, int, int, int, int]], raw_heads: list[int], on_tx: bool,
           tx_chains: list[tuple[list[int], int, int, bool]], rx_chains: list[tuple[list[int], bool]],
           raw_first: bool) -> None:
    mock = w.tx if on_tx else w.rx
    used = {i for i, *_ in raw}
    mock._free = [i for i in mock._free if i not in used]

    def put_raw() -> None:
        for i, addr, ln, fl, nx in raw:
            mock.write_desc(i, addr, ln, fl, nx)
        mock.publish(*raw_heads)

    if raw_first:
        put_raw()
    for lengths, flags, gso, indirect in tx_chains:
        total = sum(lengths)
        data = (NET_HDR.pack(flags, gso, 0, 0, 0, 0, 0) + bytes((i * 7) & 0xFF for i in range(2000)))[:total]
        data += bytes(total - len(data))
        parts, pos = [], 0
        for n in lengths:
            parts.append(data[pos : pos + n])
            pos += n
        if len(w.tx._free) >= len(parts):
            w.tx.add_chain([p for p in parts if p] or [b""], indirect=indirect)
    for lengths, indirect in rx_chains:
        if len(w.rx._free) >= len(lengths):
            w.rx.add_chain(lengths, indirect=indirect)
    if not raw_first:
        put_raw()


# KVMDM_FUZZ_EXAMPLES=20000 for a deep run (a few minutes); CI runs the default.
@settings(max_examples=int(os.environ.get("KVMDM_FUZZ_EXAMPLES", "300")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    features=st.sampled_from(FEATURES),
    raw=st.lists(_raw, max_size=8),
    raw_heads=st.lists(st.integers(0, QSIZE + 1), max_size=3),
    raw_on_tx=st.booleans(),
    raw_first=st.booleans(),
    tx_chains=st.lists(_tx_chain, max_size=10),
    rx_chains=st.lists(_rx_chain, max_size=10),
    frames=st.lists(st.integers(0, 3000), max_size=6),
    more_frames=st.lists(st.integers(14, 1600), max_size=4),
    more_rx=st.lists(_rx_chain, max_size=4),
)
def test_c_loop_and_python_path_leave_identical_traces(
    worlds: list[World],
    features: int,
    raw: list[tuple[int, int, int, int, int]],
    raw_heads: list[int],
    raw_on_tx: bool,
    raw_first: bool,
    tx_chains: list[tuple[list[int], int, int, bool]],
    rx_chains: list[tuple[list[int], bool]],
    frames: list[int],
    more_frames: list[int],
    more_rx: list[tuple[list[int], bool]],
) -> None:
    outcomes = []
    for engine in ("python", "c"):
        w = World(engine, features)
        worlds.append(w)  # closed by the fixture if this example fails; here otherwise (hundreds of examples)
        _build(w, raw, raw_heads, raw_on_tx, tx_chains, rx_chains, raw_first)
        for n in frames:
            w.peer.send(NET_HDR.pack(0, 0, 0, 0, 0, 0, 0) + bytes((n + i) & 0xFF for i in range(n)))
        for _ in range(3):  # budget 8: several rounds, so bursts resume mid-ring
            w.step("process_tx")
            w.step("process_rx")
        # More buffers and frames arrive: a frame left waiting for buffers must now land the same way.
        _build(w, [], [], False, [], more_rx, False)
        for n in more_frames:
            w.peer.send(NET_HDR.pack(0, 0, 0, 0, 0, 0, 0) + bytes((3 * n + i) & 0xFF for i in range(n)))
        for _ in range(3):
            w.step("process_rx")
        outcomes.append(w.outcome())
        worlds.remove(w)
        w.close()
    py, c = outcomes
    for key in py:
        assert c[key] == py[key], key


def test_chains_beyond_the_c_loops_limits_are_served_by_the_python_path_identically(worlds: list[World]) -> None:
    """Over 64 buffers in a chain, an indirect table over 256 entries, a frame needing over 64 rx chains: the C
    loop's fixed arrays must never overflow (the sanitizer run below checks that too); it defers, Python serves."""
    hdr = NET_HDR.pack(0, 0, 0, 0, 0, 0, 0)
    outcomes = []
    for engine in ("python", "c"):
        w = World(engine, FEATURES[3], qsize=512)
        worlds.append(w)
        payload = bytes(i & 0xFF for i in range(1400))
        w.tx.add_chain([hdr] + [payload[i : i + 14] for i in range(0, 1400, 14)])  # 101 direct buffers
        w.tx.add_chain([hdr] + [payload[i : i + 5] for i in range(0, 1400, 5)], indirect=True)  # 281 entries
        w.tx.add_chain([hdr, payload[:60]])  # and an ordinary one after them
        for _ in range(200):
            w.rx.add_chain([20])  # mergeable: a 3000-byte frame needs 150 of these
        w.peer.send(hdr + payload * 2 + payload[:200])
        w.peer.send(hdr + payload[:100])
        for _ in range(4):
            w.step("process_tx")
            w.step("process_rx")
        outcomes.append(w.outcome())
    py, c = outcomes
    assert not py["errors"] and py["metrics"]["tx_packets"] == 3 and py["metrics"]["rx_packets"] == 2
    for key in py:
        assert c[key] == py[key], key


def test_the_c_loop_under_address_and_undefined_behaviour_sanitizers() -> None:
    """This file again, in a child whose C loop is built with -fsanitize=address,undefined and libasan preloaded:
    an out-of-bounds access to the loop's own arrays or the bounce buffer, or undefined arithmetic, aborts it.
    (Guest-memory bounds are the loop's region check, which the differential test covers: ASan does not track
    the memfd mapping.)"""
    if os.environ.get("KVMDM_NETRING_SANITIZE") == "1":
        pytest.skip("already the sanitizer run")
    libs = []
    for lib in ("libasan.so", "libubsan.so"):
        path = subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
        if not os.path.isabs(path):
            pytest.fail(f"gcc has no {lib} (scripts/setup installs gcc): {path!r}")
        libs.append(path)
    env = dict(os.environ, KVMDM_NETRING_SANITIZE="1", LD_PRELOAD=":".join(libs),
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1", UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-W", "ignore", __file__,
                        "-k", "not sanitizers"], env=env, capture_output=True, text=True, timeout=900,
                       cwd=Path(__file__).resolve().parents[3])
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[:4000])  # the sanitizer report comes first
    assert " passed" in r.stdout and "failed" not in r.stdout


def test_a_long_stream_through_the_c_loop_is_exact(worlds: list[World]) -> None:
    """Thousands of frames each way through recycled buffers, with ring indices wrapping past 65535."""
    w = World("c", FEATURES[1])
    worlds.append(w)
    w.txq.set_position(65500, 65500)
    w.rxq.set_position(65500, 65500)
    w.tx.avail_idx = w.tx.last_used = w.rx.avail_idx = w.rx.last_used = 65500
    got_tx: list[bytes] = []
    sent_rx: list[bytes] = []
    got_rx: list[bytes] = []
    for rnd in range(300):
        for k in range(4):
            n = 60 + (rnd * 4 + k) % 1400
            w.tx.add_chain([NET_HDR.pack(0, 0, 0, 0, 0, 0, 0), bytes([k]) * n])
            f = NET_HDR.pack(0, 0, 0, 0, 0, 0, 0) + bytes([rnd & 0xFF]) * n
            w.peer.send(f)
            sent_rx.append(f[12:])
            w.rx.add_chain([1600])
        w.step("process_tx")
        w.step("process_rx")
        w.tx.read_used()
        for head, n in w.rx.read_used():
            got_rx.append(w.rx.read_buffer(w.rx.buffers(head)[0])[12:n])
        got_tx += w.sent()
    assert not w.errors
    assert len(got_tx) == 1200 and got_rx == sent_rx
    assert w.metrics.tx_packets == w.metrics.rx_packets == 1200
    assert w.txq.next_used == (65500 + 1200) & 0xFFFF


def test_guest_memory_stays_mapped_while_the_c_loop_holds_it(worlds: list[World]) -> None:
    w = World("c", V1)
    worlds.append(w)
    w.tx.add_chain([NET_HDR.pack(0, 0, 0, 0, 0, 0, 0), b"x" * 60])
    w.mem.close()  # the mapping is pinned by the engine: closing cannot pull it from under the C loop
    w.step("process_tx")
    assert w.sent() == [NET_HDR.pack(0, 0, 0, 0, 0, 0, 0) + b"x" * 60]


def test_defer_leaves_the_chain_for_the_python_path_to_reject(worlds: list[World]) -> None:
    w = World("c", V1)
    worlds.append(w)
    good = w.tx.add_chain([NET_HDR.pack(0, 0, 0, 0, 0, 0, 0), b"y" * 100])
    bad = w.tx._free.pop()
    w.tx.write_desc(bad, 0x1000, 64, VIRTQ_DESC_F_WRITE)  # §5.1.6.2: tx buffers are device-readable
    w.tx.publish(bad)
    w.step("process_tx")
    assert w.errors == ["TxChainWritable"]
    assert [h for h, _n in w.tx.read_used()] == [good]
    assert len(w.sent()) == 1


if os.environ.get("KVMDM_NO_NETRING") == "1":  # pragma: no cover - the reference-only configuration
    pytestmark = pytest.mark.skip(reason="KVMDM_NO_NETRING=1: the C loop is disabled")
