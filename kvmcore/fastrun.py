"""An optional C inner loop for KVM_RUN (cffi), for exits whose handling is trivial.

On this nested host one exit to userspace costs ~25 us of kernel work; the Python loop adds ~4 us on top of it,
QEMU's C loop ~1 us (bench/exits.py). Most of that Python cost is paid on exits that need no device at all:
port I/O and MMIO to addresses nobody claims (Linux's port-0x80 I/O delay, firmware and driver probes), which the
bus answers with all-ones reads and dropped writes. This loop answers those in C, with the same semantics, and
counts them. It also lets two hot devices answer in C (struct kvmdm_accel: their port ranges and shared state):

* the 16550 UART (devices/serial.py decides what C may do, and publishes it after every change it makes):
  side-effect-free register reads (LSR polling, IIR/IER/LCR/MCR/MSR/SCR when reading changes nothing) and THR
  writes into a TX ring that Python drains into the sink in order, signalling the THRE edge on the irqfd;
* config mechanism #1 (devices/pci/root.py): the CONFIG_ADDRESS latch lives here, data-port reads and writes go
  straight to PciConfiguration's own register arrays except where the device traps a dword (config_traps),
  absent functions read all-ones.

Every other exit (other claimed addresses, accesses those C halves decline, HLT, shutdown, errors, EINTR kicks)
returns to Python, which handles it exactly as without this module. Concurrency: each shared device struct holds
a mutex; the C loop takes it around every access it answers, Python around every access and state change it
makes, so a vCPU in C never sees a half-published UART state or a half-written config dword, and a Python
access never sees a half-done C one. The Python devices stay the reference: KVMDM_NO_FASTRUN=1 disables all this,
and the differential tests (tests/unit/devices/*fastpath*) run the same accesses through both.

The extension is compiled on first use with the system compiler into the cache directory (keyed by the source's
hash and the interpreter ABI) and loaded at import time — before a device model enters its jail, where there is no
filesystem. If it cannot be built, kvmdm runs the pure-Python loop and says so once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from kvmcore import cext

log = logging.getLogger(__name__)

# The structs Python and C share, written once for the cdef and the source.
_STRUCTS = """
struct kvmdm_ranges { int n; unsigned long long base[256]; unsigned long long end[256]; };
struct kvmdm_counts { unsigned long long pio_reads, pio_writes, mmio_reads, mmio_writes, dev_reads, dev_writes; };
struct kvmdm_uart {
    unsigned long long lock[8];
    unsigned char rd_value[8];
    unsigned int rd_fast;
    unsigned int thr_mode;
    int irq_fd, notify_fd;
    unsigned int thre_set;
    unsigned int tx_head, tx_tail;
    unsigned long long irqs;
    unsigned char tx[4096];
};
struct kvmdm_pcifn {
    unsigned int *regs, *writable, *w1c;
    unsigned long long read_trap, write_trap;
    unsigned long long reads, writes;
};
struct kvmdm_pci {
    unsigned long long lock[8];
    unsigned int address;
    unsigned int present;
    unsigned long long absent_reads, absent_writes;
    struct kvmdm_pcifn fn[32];
};
struct kvmdm_accel { int n; unsigned int base[8]; unsigned int len[8]; int kind[8]; void *dev[8]; };
"""

# Kinds of accelerated device in struct kvmdm_accel, and the TX ring size (the C code gets them as #defines).
ACCEL_UART = 1
ACCEL_PCI_CFG = 2
MAX_ACCEL = 8
TX_RING = 4096
THR_PYTHON, THR_RING, THR_RING_IRQ = 0, 1, 2
_DEFINES = "".join(f"#define {name} {value}\n" for name, value in (
    ("ACCEL_UART", ACCEL_UART), ("ACCEL_PCI_CFG", ACCEL_PCI_CFG), ("MAX_ACCEL", MAX_ACCEL), ("TX_RING", TX_RING),
    ("THR_PYTHON", THR_PYTHON), ("THR_RING", THR_RING), ("THR_RING_IRQ", THR_RING_IRQ)))

CDEF = _STRUCTS + """int kvmdm_run(int fd, void *run, unsigned long run_size, struct kvmdm_ranges *pio, struct kvmdm_ranges *mmio,
              struct kvmdm_counts *counts, long long max_exits, struct kvmdm_accel *accel);
int kvmdm_lock_init(unsigned long long *lock);
void kvmdm_lock(unsigned long long *lock);
void kvmdm_unlock(unsigned long long *lock);
int kvmdm_uart_io(struct kvmdm_uart *u, unsigned int off, int is_write, unsigned int size, unsigned char *data);
void kvmdm_uart_publish(struct kvmdm_uart *u, const unsigned char *values, unsigned int rd_fast,
                        unsigned int thr_mode);
unsigned int kvmdm_uart_pop(struct kvmdm_uart *u, unsigned char *out, unsigned int max);
int kvmdm_pci_io(struct kvmdm_pci *p, unsigned int off, int is_write, unsigned int size, unsigned char *data);
"""

SOURCE = r"""
#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>
""" + _DEFINES + _STRUCTS + r"""
/* Each shared device struct starts with storage for one recursive pthread mutex: the C loop takes it around every
   access it answers, Python (kvmdm_lock through cffi, which releases the GIL while it waits) around every access
   and state change it makes, so C never sees a half-published state and Python never a half-done C access. */
_Static_assert(sizeof(pthread_mutex_t) <= 8 * sizeof(unsigned long long), "mutex storage too small");

int kvmdm_lock_init(unsigned long long *lock) {
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_settype(&a, PTHREAD_MUTEX_RECURSIVE);
    int rc = pthread_mutex_init((pthread_mutex_t *)lock, &a);
    pthread_mutexattr_destroy(&a);
    return rc;
}
void kvmdm_lock(unsigned long long *lock) { pthread_mutex_lock((pthread_mutex_t *)lock); }
void kvmdm_unlock(unsigned long long *lock) { pthread_mutex_unlock((pthread_mutex_t *)lock); }

static void signal_fd(int fd) {
    unsigned long long one = 1;
    if (fd >= 0) {
        ssize_t rc = write(fd, &one, sizeof one);  /* eventfd: EAGAIN only at 2^64-2 pending, never in practice */
        (void)rc;
    }
}

/* 16550 UART (devices/serial.py is the reference). Python publishes, after every change it makes, the value each
   register read would return and which of those reads have no side effect (rd_fast bit k); C answers those. A THR
   write is C's when thr_mode says so (DLAB clear, no loopback, a sink, and THRE's interrupt state unaffected by
   the write): the byte goes to the TX ring, which Python drains into the sink in order, and with THR_RING_IRQ
   the write signals the one THRE edge the reference signals. Everything else returns 0: Python's. */
int kvmdm_uart_io(struct kvmdm_uart *u, unsigned int off, int is_write, unsigned int size, unsigned char *data) {
    int done = 0;
    if (size != 1 || off >= 8)
        return 0;
    kvmdm_lock(u->lock);
    if (!is_write) {
        if (u->rd_fast & (1u << off)) {
            data[0] = u->rd_value[off];
            done = 1;
        }
    } else if (off == 0 && u->thr_mode != THR_PYTHON && u->tx_head - u->tx_tail < TX_RING) {
        int was_empty = u->tx_head == u->tx_tail;
        u->tx[u->tx_head % TX_RING] = data[0];
        u->tx_head++;
        u->thre_set = 1;  /* the reference leaves THRE pending after every transmitted byte */
        if (u->thr_mode == THR_RING_IRQ) {
            u->irqs++;
            signal_fd(u->irq_fd);
        }
        if (was_empty)
            signal_fd(u->notify_fd);
        done = 1;
    }
    kvmdm_unlock(u->lock);
    return done;
}

void kvmdm_uart_publish(struct kvmdm_uart *u, const unsigned char *values, unsigned int rd_fast,
                        unsigned int thr_mode) {
    kvmdm_lock(u->lock);
    memcpy(u->rd_value, values, 8);
    u->rd_fast = rd_fast & 0xff;
    u->thr_mode = thr_mode;
    kvmdm_unlock(u->lock);
}

unsigned int kvmdm_uart_pop(struct kvmdm_uart *u, unsigned char *out, unsigned int max) {
    unsigned int n = 0;
    kvmdm_lock(u->lock);
    while (n < max && u->tx_tail != u->tx_head) {
        out[n++] = u->tx[u->tx_tail % TX_RING];
        u->tx_tail++;
    }
    kvmdm_unlock(u->lock);
    return n;
}

/* PCI configuration mechanism #1 at 0xCF8 (devices/pci/root.py PciConfigIo is the reference): the address latch
   lives here; data-port accesses of 1, 2 or 4 bytes inside 0xCFC..0xCFF go to a function's register file, which
   is the Python PciConfiguration's own array (regs, writable, w1c), unless Python traps that dword for reads or
   writes (side effects: BARs, command, MSI-X, virtio's PCI_CFG window). Absent functions read all-ones. Anything
   else (other sizes at 0xCF8, 0xCF9 reset control, straddling accesses) returns 0: Python's. */
int kvmdm_pci_io(struct kvmdm_pci *p, unsigned int off, int is_write, unsigned int size, unsigned char *data) {
    int done = 0;
    kvmdm_lock(p->lock);
    if (off == 0 && size == 4) {
        if (is_write) {
            unsigned int v;
            memcpy(&v, data, 4);
            p->address = v & 0xFFFFFFFCu;
        } else {
            memcpy(data, &p->address, 4);
        }
        done = 1;
    } else if (off >= 4 && (size == 1 || size == 2 || size == 4) && off + size <= 8) {
        unsigned int a = p->address;
        unsigned int bus = (a >> 16) & 0xff, slot = (a >> 11) & 0x1f, func = (a >> 8) & 7;
        unsigned int reg = (a & 0xfc) + (off - 4), d = reg >> 2, shift = (reg & 3) * 8;
        unsigned int lane = size == 4 ? 0xFFFFFFFFu : (((1u << (size * 8)) - 1) << shift);
        if (!(a & 0x80000000u)) {
            if (!is_write)
                memset(data, 0xff, size);
            done = 1;
        } else if (bus != 0 || func != 0 || !(p->present & (1u << slot))) {
            if (is_write) {
                p->absent_writes++;
            } else {
                memset(data, 0xff, size);
                p->absent_reads++;
            }
            done = 1;
        } else {
            struct kvmdm_pcifn *f = &p->fn[slot];
            if (!is_write && !(f->read_trap >> d & 1)) {
                unsigned int v = f->regs[d] >> shift;
                for (unsigned int i = 0; i < size; i++)
                    data[i] = (v >> (8 * i)) & 0xff;
                f->reads++;
                done = 1;
            } else if (is_write && !(f->write_trap >> d & 1)) {
                /* PciConfiguration.write: writable bits take the value, set W1C bits clear. */
                unsigned int value = 0;
                for (unsigned int i = 0; i < size; i++)
                    value |= (unsigned int)data[i] << (8 * i);
                value <<= shift;
                unsigned int writable = f->writable[d] & lane, w1c = f->w1c[d] & lane;
                unsigned int r = f->regs[d];
                r = (r & ~writable) | (value & writable);
                r &= ~(value & w1c);
                f->regs[d] = r;
                f->writes++;
                done = 1;
            }
        }
    }
    kvmdm_unlock(p->lock);
    return done;
}

/* Is [addr, addr+len) touched by any claimed range? Ranges are sorted and few: a linear scan is fastest. An access
   that merely overlaps a claimed range goes to Python, whose bus decides (it treats straddling as unclaimed). */
static int claimed(const struct kvmdm_ranges *r, unsigned long long addr, unsigned long long len) {
    for (int i = 0; i < r->n; i++)
        if (addr < r->end[i] && addr + len > r->base[i])
            return 1;
    return 0;
}

/* A single port access wholly inside an accelerated device: 1 if that device answered it in C, 0 for Python. */
static int accel_io(const struct kvmdm_accel *a, unsigned int port, int is_write, unsigned int size,
                    unsigned char *data) {
    for (int i = 0; i < a->n; i++) {
        if (port >= a->base[i] && port + size <= a->base[i] + a->len[i]) {
            if (a->kind[i] == ACCEL_UART)
                return kvmdm_uart_io(a->dev[i], port - a->base[i], is_write, size, data);
            if (a->kind[i] == ACCEL_PCI_CFG)
                return kvmdm_pci_io(a->dev[i], port - a->base[i], is_write, size, data);
            return 0;
        }
    }
    return 0;
}

/* Returns 0 when an exit needs Python (kvm_run describes it), -errno when KVM_RUN failed (EINTR: a kick), 1 when
   max_exits exits were handled (so Python regains control now and then). */
int kvmdm_run(int fd, void *runp, unsigned long run_size, struct kvmdm_ranges *pio, struct kvmdm_ranges *mmio,
              struct kvmdm_counts *counts, long long max_exits, struct kvmdm_accel *accel) {
    struct kvm_run *run = runp;
    for (long long i = 0; i < max_exits; i++) {
        if (ioctl(fd, KVM_RUN, 0) < 0)
            return -errno;
        if (run->exit_reason == KVM_EXIT_IO) {
            unsigned long long n = (unsigned long long)run->io.size * run->io.count;
            /* The data area is in the mapping (KVM puts it on the page after struct kvm_run). */
            if (n == 0 || run->io.data_offset + n > run_size)
                return 0;
            int is_write = run->io.direction == KVM_EXIT_IO_OUT;
            if (run->io.count == 1 && accel->n > 0 &&
                accel_io(accel, run->io.port, is_write, run->io.size, (unsigned char *)run + run->io.data_offset)) {
                if (is_write)
                    counts->dev_writes++;
                else
                    counts->dev_reads++;
                continue;
            }
            if (claimed(pio, run->io.port, run->io.size))
                return 0;
            if (!is_write) {
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


class _SharedDevice:
    """A device state struct shared by Python and the C loop; ``with accel:`` holds its mutex (see SOURCE)."""

    kind = 0

    def __init__(self, ctype: str) -> None:
        assert _MOD is not None
        self._ffi, self._lib = _MOD.ffi, _MOD.lib
        self.state: Any = self._ffi.new(ctype)
        self._lockp = self.state.lock
        if self._lib.kvmdm_lock_init(self._lockp) != 0:
            raise OSError("pthread_mutex_init failed")

    def __enter__(self) -> None:
        self._lib.kvmdm_lock(self._lockp)

    def __exit__(self, *exc: object) -> None:
        self._lib.kvmdm_unlock(self._lockp)

    def pointer(self) -> Any:
        return self.state

    def needs_flush(self) -> bool:
        return False

    def flush(self) -> None:
        return None


class UartAccel(_SharedDevice):
    """The 16550's C half: the published read values, the THR mode and the TX ring (devices.serial drives it).

    irq_fd is the eventfd behind the UART's irqfd (the one devices.irq.EventFdTrigger writes); notify_fd, when
    given, is signalled whenever a byte lands in an empty TX ring, so a host thread can drain it even while the
    guest never leaves KVM_RUN again (it idles in the in-kernel HLT)."""

    kind = ACCEL_UART

    def __init__(self, irq_fd: int = -1, notify_fd: int = -1) -> None:
        super().__init__("struct kvmdm_uart *")
        self.state.irq_fd = irq_fd
        self.state.notify_fd = notify_fd
        self._irqs_seen = 0
        self._buf = self._ffi.new("unsigned char[]", TX_RING)
        self.on_flush: Any = None  # set by the device: drains the ring into its sink (caller holds the device lock)

    def publish(self, values: bytes, rd_fast: int, thr_mode: int) -> None:
        self._lib.kvmdm_uart_publish(self.state, values, rd_fast, thr_mode)

    def take(self) -> tuple[bool, int]:
        """(a C THR write happened since the last take, THRE edges C signalled since then). Hold the lock."""
        st = self.state
        thre, st.thre_set = bool(st.thre_set), 0
        irqs = int(st.irqs)
        new, self._irqs_seen = irqs - self._irqs_seen, irqs
        return thre, new

    def pop_tx(self) -> bytes:
        n = self._lib.kvmdm_uart_pop(self.state, self._buf, TX_RING)
        return bytes(self._ffi.buffer(self._buf, n))

    def needs_flush(self) -> bool:
        st = self.state
        return bool(st.tx_head != st.tx_tail or st.thre_set or st.irqs != self._irqs_seen)

    def flush(self) -> None:
        if self.on_flush is not None:
            self.on_flush()

    def io(self, offset: int, is_write: bool, data: bytearray) -> bool:
        """The C handler on one access (what kvmdm_run calls): True if C answered it, False for Python."""
        buf = self._ffi.from_buffer("unsigned char[]", data)
        return bool(self._lib.kvmdm_uart_io(self.state, offset, int(is_write), len(data), buf))


class PciConfigAccel(_SharedDevice):
    """Config mechanism #1's C half: the CONFIG_ADDRESS latch, and per slot the register file of the function
    (PciConfiguration's own arrays, pinned here) with the dwords whose reads or writes Python must see."""

    kind = ACCEL_PCI_CFG

    def __init__(self) -> None:
        super().__init__("struct kvmdm_pci *")
        self._pinned: dict[int, tuple[Any, ...]] = {}

    @property
    def address(self) -> int:
        return int(self.state.address)

    @address.setter
    def address(self, value: int) -> None:
        self.state.address = value

    def set_function(self, slot: int, regs: Any, writable: Any, w1c: Any, read_trap: int, write_trap: int) -> None:
        """Serve slot's config space from these uint32[64] buffers (kept alive and unresizable here). Hold the lock."""
        ffi = self._ffi
        bufs = tuple(ffi.from_buffer("unsigned int[]", b) for b in (regs, writable, w1c))
        for b in bufs:
            if len(b) != 64:
                raise ValueError("a PCI register file is 64 dwords")
        f = self.state.fn[slot]
        f.regs, f.writable, f.w1c = bufs
        f.read_trap = read_trap & (1 << 64) - 1
        f.write_trap = write_trap & (1 << 64) - 1
        self._pinned[slot] = bufs
        self.state.present |= 1 << slot

    def clear_function(self, slot: int) -> None:
        """Stop serving slot (it reads as absent). Hold the lock."""
        self.state.present &= ~(1 << slot) & 0xFFFF_FFFF
        f = self.state.fn[slot]
        f.regs = f.writable = f.w1c = self._ffi.NULL
        self._pinned.pop(slot, None)

    def function_counts(self, slot: int) -> tuple[int, int]:
        f = self.state.fn[slot]
        return int(f.reads), int(f.writes)

    def reset_function_counts(self, slot: int) -> None:
        f = self.state.fn[slot]
        f.reads = f.writes = 0

    def absent_counts(self) -> tuple[int, int]:
        return int(self.state.absent_reads), int(self.state.absent_writes)

    def io(self, offset: int, is_write: bool, data: bytearray) -> bool:
        buf = self._ffi.from_buffer("unsigned char[]", data)
        return bool(self._lib.kvmdm_pci_io(self.state, offset, int(is_write), len(data), buf))


SHARED_TYPES = (UartAccel, PciConfigAccel)


class FastRunner:
    """Per-vCPU state for kvmdm_run: the claimed-range tables and the accelerated devices (refreshed when the
    buses change) and counters."""

    def __init__(self, vcpu_fd: int, run_addr: int, run_size: int) -> None:
        assert _MOD is not None
        ffi, lib = _MOD.ffi, _MOD.lib
        self._ffi = ffi
        self._lib = lib
        self._fd = vcpu_fd
        self._run = ffi.cast("void *", run_addr)
        self._run_size = run_size
        self._pio: Any = ffi.new("struct kvmdm_ranges *")
        self._mmio: Any = ffi.new("struct kvmdm_ranges *")
        self._accel: Any = ffi.new("struct kvmdm_accel *")
        self.accels: list[_SharedDevice] = []
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

    def set_ranges(self, pio: list[tuple[int, int]], mmio: list[tuple[int, int]], generation: object,
                   accels: Sequence[tuple[int, int, _SharedDevice]] = ()) -> None:
        # Only the owning vCPU thread calls this, between runs: the C loop never sees a half-written table.
        self._fill(self._pio, pio)
        self._fill(self._mmio, mmio)
        accels = list(accels)[:MAX_ACCEL]
        t = self._accel
        for i, (base, end, acc) in enumerate(accels):
            t.base[i], t.len[i], t.kind[i] = base, end - base, acc.kind
            t.dev[i] = self._ffi.cast("void *", acc.pointer())
        t.n = len(accels)
        self.accels = [a for _b, _e, a in accels]
        self.generation = generation

    def run(self, max_exits: int = 4096) -> int:
        """0: an exit for Python is in kvm_run; 1: budget used up; -errno: KVM_RUN failed (-EINTR: kicked).

        The budget (~0.1 s of exits on this host) bounds how stale the exit and bus counters can get: they are
        accounted in Python between calls, and operators watch them (stats, /metrics)."""
        return int(self._lib.kvmdm_run(self._fd, self._run, self._run_size, self._pio, self._mmio, self.counts,
                                       max_exits, self._accel))
