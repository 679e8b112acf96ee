"""§2.7.8/§2.7.13: the driver polls used->idx while the device publishes it (and the device reads avail->idx while
the driver bumps it). Each index must move as one 16-bit access: a driver must never observe half of an update.

CPython's standard-size struct formats ('<H', '=H') store byte by byte, so publishing 0x0100 over 0x00FF could be
seen as 0x0000 for an instant. A C reader (released GIL, the other CPU) spins on the index while the queue publishes
values across the byte boundary, and must only ever see values that were published."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from pv.queue import SplitQueue
from pv.testing import MockSplitQueue, make_guest_memory

cffi = pytest.importorskip("cffi")

READER = r"""
#include <stdint.h>
/* Count reads of *p that are neither a nor b, until *stop becomes non-zero. */
long spin(volatile uint16_t *p, volatile int *stop, uint16_t a, uint16_t b, long *reads) {
    long odd = 0, n = 0;
    while (!*stop) {
        uint16_t v = *p;
        if (v != a && v != b) odd++;
        n++;
    }
    *reads = n;
    return odd;
}
"""


@pytest.fixture(scope="module")
def reader(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    ffi = cffi.FFI()
    ffi.cdef("long spin(volatile uint16_t *p, volatile int *stop, uint16_t a, uint16_t b, long *reads);")
    ffi.set_source("_idx_reader", READER)
    out = Path(ffi.compile(tmpdir=str(tmp_path_factory.mktemp("cffi")), verbose=False))
    import importlib.util

    spec = importlib.util.spec_from_file_location("_idx_reader", out)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_used_idx_is_published_as_one_16_bit_store(reader) -> None:  # type: ignore[no-untyped-def]
    mem = make_guest_memory()
    mock = MockSplitQueue(mem, 16, seed=1)
    q = SplitQueue(mem, mock.config())
    q.validate()
    ffi, lib = reader.ffi, reader.lib
    addr = q.mem.slots()[0].host_addr + mock.used_ring + 2
    p = ffi.cast("uint16_t *", addr)
    stop = ffi.new("int *")
    reads = ffi.new("long *")
    result: list[int] = []
    q.set_position(0, 0x00FF)
    q.add_used(0, 0)  # used idx now 0x0100
    t = threading.Thread(target=lambda: result.append(lib.spin(p, stop, 0x00FF, 0x0100, reads)))
    t.start()
    try:
        for _ in range(200_000):
            q.set_position(0, 0x00FE)
            q.add_used(0, 0)  # publishes 0x00FF over 0x0100: both bytes change
            q.set_position(0, 0x00FF)
            q.add_used(0, 0)  # publishes 0x0100 over 0x00FF
    finally:
        stop[0] = 1
        t.join()
    q.close()
    mem.close()
    assert reads[0] > 0
    assert result == [0], f"{result[0]} torn reads of used->idx out of {reads[0]}"
