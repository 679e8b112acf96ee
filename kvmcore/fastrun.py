"""An optional C inner loop for KVM_RUN (cffi), for exits whose handling is trivial.

On this nested host one exit to userspace costs ~25 us of kernel work; the Python loop adds ~4 us on top of it,
QEMU's C loop ~1 us (bench/exits.py). Most of that Python cost is paid on exits that need no device at all:
port I/O and MMIO to addresses nobody claims (Linux's port-0x80 I/O delay, firmware and driver probes), which the
bus answers with all-ones reads and dropped writes. This loop answers those in C, with the same semantics, and
counts them; every other exit (any claimed address, HLT, shutdown, errors, EINTR kicks) returns to Python, which
handles it exactly as without this module. The Python path stays the reference: KVMDM_NO_FASTRUN=1 disables this.

The extension is compiled on first use with the system compiler into the cache directory (keyed by the source's
hash and the interpreter ABI) and loaded at import time — before a device model enters its jail, where there is no
filesystem. If it cannot be built, kvmdm runs the pure-Python loop and says so once.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import Any

from kvmcore import cext

log = logging.getLogger(__name__)

# The structs Python and C share, written once for the cdef and the source.
_STRUCTS = """
struct kvmdm_ranges { int n; unsigned long long base[256]; unsigned long long end[256]; };
struct kvmdm_counts { unsigned long long pio_reads, pio_writes, mmio_reads, mmio_writes; };
"""

CDEF = _STRUCTS + """int kvmdm_run(int fd, void *run, unsigned long run_size, struct kvmdm_ranges *pio, struct kvmdm_ranges *mmio,
              struct kvmdm_counts *counts, long long max_exits);
"""

SOURCE = r"""
#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>
""" + _STRUCTS + r"""
/* Is [addr, addr+len) touched by any claimed range? Ranges are sorted and few: a linear scan is fastest. An access
   that merely overlaps a claimed range goes to Python, whose bus decides (it treats straddling as unclaimed). */
static int claimed(const struct kvmdm_ranges *r, unsigned long long addr, unsigned long long len) {
    for (int i = 0; i < r->n; i++)
        if (addr < r->end[i] && addr + len > r->base[i])
            return 1;
    return 0;
}

/* Returns 0 when an exit needs Python (kvm_run describes it), -errno when KVM_RUN failed (EINTR: a kick), 1 when
   max_exits trivial exits were handled (so Python regains control now and then). */
int kvmdm_run(int fd, void *runp, unsigned long run_size, struct kvmdm_ranges *pio, struct kvmdm_ranges *mmio,
              struct kvmdm_counts *counts, long long max_exits) {
    struct kvm_run *run = runp;
    for (long long i = 0; i < max_exits; i++) {
        if (ioctl(fd, KVM_RUN, 0) < 0)
            return -errno;
        if (run->exit_reason == KVM_EXIT_IO) {
            unsigned long long n = (unsigned long long)run->io.size * run->io.count;
            /* The data area is in the mapping (KVM puts it on the page after struct kvm_run). */
            if (n == 0 || run->io.data_offset + n > run_size || claimed(pio, run->io.port, run->io.size))
                return 0;
            if (run->io.direction == KVM_EXIT_IO_IN) {
                memset((char *)run + run->io.data_offset, 0xff, n);
                counts->pio_reads++;
            } else {
                counts->pio_writes++;
            }
            continue;
        }
        if (run->exit_reason == KVM_EXIT_MMIO) {
            unsigned int len = run->mmio.len > 8 ? 8 : run->mmio.len;
            if (claimed(mmio, run->mmio.phys_addr, len))
                return 0;
            if (run->mmio.is_write) {
                counts->mmio_writes++;
            } else {
                memset(run->mmio.data, 0xff, len);
                counts->mmio_reads++;
            }
            continue;
        }
        return 0;
    }
    return 1;
}
"""

MAX_RANGES = 256


def _load() -> ModuleType | None:
    if os.environ.get("KVMDM_NO_FASTRUN") == "1":
        return None
    try:
        return cext.build("fastrun", CDEF, SOURCE)
    except Exception as e:  # no compiler, no headers, read-only cache: the Python loop is the reference anyway
        log.warning("C fast path unavailable, using the Python vCPU loop only: %s", e)
        return None


_MOD = _load()
AVAILABLE = _MOD is not None


class FastRunner:
    """Per-vCPU state for kvmdm_run: the claimed-range tables (refreshed when the buses change) and counters."""

    def __init__(self, vcpu_fd: int, run_addr: int, run_size: int) -> None:
        assert _MOD is not None
        ffi, lib = _MOD.ffi, _MOD.lib
        self._lib = lib
        self._fd = vcpu_fd
        self._run = ffi.cast("void *", run_addr)
        self._run_size = run_size
        self._pio: Any = ffi.new("struct kvmdm_ranges *")
        self._mmio: Any = ffi.new("struct kvmdm_ranges *")
        self.counts: Any = ffi.new("struct kvmdm_counts *")
        self.generation: object = None

    @staticmethod
    def _fill(table: Any, ranges: list[tuple[int, int]]) -> None:
        if len(ranges) > MAX_RANGES:
            raise ValueError(f"more than {MAX_RANGES} claimed ranges")
        for i, (base, end) in enumerate(ranges):
            table.base[i] = base
            table.end[i] = end
        table.n = len(ranges)

    def set_ranges(self, pio: list[tuple[int, int]], mmio: list[tuple[int, int]], generation: object) -> None:
        # Only the owning vCPU thread calls this, between runs: the C loop never sees a half-written table.
        self._fill(self._pio, pio)
        self._fill(self._mmio, mmio)
        self.generation = generation

    def run(self, max_exits: int = 4096) -> int:
        """0: an exit for Python is in kvm_run; 1: budget used up; -errno: KVM_RUN failed (-EINTR: kicked).

        The budget (~0.1 s of exits on this host) bounds how stale the exit and bus counters can get: they are
        accounted in Python between calls, and operators watch them (stats, /metrics)."""
        return int(self._lib.kvmdm_run(self._fd, self._run, self._run_size, self._pio, self._mmio, self.counts,
                                       max_exits))
