"""virtio-net's per-frame loop in C (cffi): split-ring parsing plus tap readv/writev, for the back-end process.

pv.net.NetEngine is the reference. Its Python per-frame path costs ~8 us here, which caps a queue at ~120 k
frames/s whatever the design around it. This module does the same per-frame work in C: walk and validate a
descriptor chain, hand the frame to the tap (tx) or copy one from the tap into chains (rx), publish the used
element. Everything else stays in Python: notification suppression and its re-check, used-buffer notifications,
metrics, thread, errors.

Division of labour, so that the guest-visible behaviour is exactly the reference's:
  * C serves only chains it fully understands. At the first one that breaks any rule (or that is merely unusual:
    an indirect table over 256 entries, more than 64 buffers, an avail idx too far ahead) it stops *without
    consuming it* and reports DEFER; the caller then lets the Python path process that one chain, which raises
    the specific guest error or serves it. So every guest error keeps its single definition in pv/queue.py and
    pv/net.py, and a differential test checks C against Python on random rings.
  * Ring positions (next_avail, cached avail idx, next_used, used entries added) live in SplitQueue; they are
    copied into struct kn_vq before a burst and back after it.
  * Guest memory is reached only through a copy of the GuestMemory region table (kn_mem), with the same rule:
    a buffer must lie inside one region. The region views are pinned for the engine's lifetime, so the memory
    cannot be unmapped under C.
  * Each descriptor is copied out of guest memory once before it is checked and used, and an indirect table is
    snapshotted, as in Python: a guest rewriting them concurrently cannot race a check.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import Any

from kvmcore import cext
from kvmcore.memory import GuestMemory
from pv.queue import SplitQueue, avail_ring_size, desc_table_size, used_ring_size

log = logging.getLogger(__name__)

MAX_REGIONS = 32
MAX_IOV = 64
MAX_INDIRECT = 256

# Return codes of kn_tx/kn_rx (the C code gets them, and the limits above, as #defines generated below).
EMPTY = 0  # tx: no chain left; rx: the tap had nothing to read
BUDGET = 1  # the budget ran out; more may be waiting
TAP_BLOCKED = 2  # tx: the tap is full (EAGAIN); the chain stays queued
NEED_BUFFERS = 3  # rx: a frame is waiting (in the bounce buffer) and the driver has not posted enough buffers
DEFER = 4  # the next chain (or avail idx) is not for C: let the Python path handle one chain/frame

# The structs Python and C share, written once: the cdef and the C source both start from this text.
_STRUCTS = """
struct kn_region { unsigned long long gpa, size; unsigned char *host; };
struct kn_mem { int n; struct kn_region r[MAX_REGIONS_]; };
struct kn_vq {
    unsigned char *desc, *avail, *used;
    unsigned int size;
    unsigned int next_avail, avail_idx, next_used;
    unsigned long long num_added;
    int indirect;
};
struct kn_stats {
    unsigned long long tx_packets, tx_bytes, tx_dropped, tx_bad_header;
    unsigned long long rx_packets, rx_bytes, rx_buffers, rx_too_big, rx_read_errors;
};
""".replace("MAX_REGIONS_", str(MAX_REGIONS))

CDEF = _STRUCTS + """
int kn_tx(struct kn_vq *q, const struct kn_mem *m, int fd, int budget, int csum_ok, const unsigned char *gso_ok,
          unsigned long long max_bytes, struct kn_stats *st, int *done);
int kn_rx(struct kn_vq *q, const struct kn_mem *m, int fd, int budget, int mergeable, unsigned char flags_mask,
          unsigned char *bounce, unsigned int bounce_size, unsigned int *rx_len, struct kn_stats *st, int *done);
"""

_DEFINES = "".join(f"#define {name} {value}\n" for name, value in (
    ("EMPTY", EMPTY), ("BUDGET", BUDGET), ("TAP_BLOCKED", TAP_BLOCKED), ("NEED_BUFFERS", NEED_BUFFERS),
    ("DEFER", DEFER), ("MAX_IOV", MAX_IOV), ("MAX_INDIRECT", MAX_INDIRECT),
))

SOURCE = r"""
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/uio.h>

#define HDR 12
#define F_NEXT 1
#define F_WRITE 2
#define F_INDIRECT 4
#define NEEDS_CSUM 1
#define MAX_CHAIN_BYTES (1ULL << 32)
""" + _DEFINES + _STRUCTS + r"""
struct desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct chain {
    uint16_t head;
    int niov, nread;           /* iovecs in total, of which the first nread are device-readable */
    int has_readable, has_writable; /* any such descriptor, even of length 0 (the Python path counts those too) */
    uint64_t rlen, wlen;
    struct iovec iov[MAX_IOV];
};

/* Guest-controlled words are read once, through volatile, so the compiler cannot re-load them after a check. */
static inline uint16_t load16(const unsigned char *p) { return *(const volatile uint16_t *)p; }
static inline void store16(unsigned char *p, uint16_t v) { *(volatile uint16_t *)p = v; }

/* Host pointer for [gpa, gpa + len) if it lies inside one region, else NULL (kvmcore.memory's rule). */
static unsigned char *xlate(const struct kn_mem *m, uint64_t gpa, uint64_t len) {
    if (gpa + len < gpa)
        return NULL;
    for (int i = 0; i < m->n; i++) {
        const struct kn_region *r = &m->r[i];
        if (gpa >= r->gpa && gpa + len <= r->gpa + r->size)
            return r->host + (gpa - r->gpa);
    }
    return NULL;
}

/* Walk and validate the chain at head, as pv.queue.SplitQueue._parse_chain does. 0, or -1: leave it to Python
   (a rule is broken, or the chain is beyond what this loop handles). Nothing is consumed either way. */
static int walk(const struct kn_vq *q, const struct kn_mem *m, uint16_t head, struct chain *c) {
    unsigned int size = q->size, table_len = size, ttl = size, idx = head;
    const unsigned char *table = q->desc;
    struct desc itab[MAX_INDIRECT];
    int in_indirect = 0, split = -1, ndesc = 0;
    c->head = head;
    c->niov = c->nread = c->has_readable = c->has_writable = 0;
    c->rlen = c->wlen = 0;
    if (head >= size)
        return -1;
    for (;;) {
        struct desc d;
        if (ttl == 0)
            return -1;
        ttl--;
        memcpy(&d, table + (size_t)idx * 16, 16);
        __asm__ __volatile__("" ::: "memory");
        if (d.flags & F_INDIRECT) {
            unsigned char *p;
            if (in_indirect || !q->indirect || (d.flags & F_NEXT))
                return -1;
            if (d.len == 0 || d.len % 16 || d.len / 16 > size || d.len / 16 > MAX_INDIRECT)
                return -1;
            p = xlate(m, d.addr, d.len);
            if (!p)
                return -1;
            memcpy(itab, p, d.len); /* snapshot: the driver cannot change it between check and use */
            table = (const unsigned char *)itab;
            table_len = ttl = d.len / 16;
            idx = 0;
            in_indirect = 1;
            continue;
        }
        if (d.flags & F_WRITE) {
            if (split < 0)
                split = ndesc;
            c->wlen += d.len;
            c->has_writable = 1;
        } else {
            if (split >= 0)
                return -1;
            c->rlen += d.len;
            c->has_readable = 1;
        }
        if (d.len) {
            unsigned char *p = xlate(m, d.addr, d.len);
            if (!p || c->niov == MAX_IOV)
                return -1;
            c->iov[c->niov].iov_base = p;
            c->iov[c->niov].iov_len = d.len;
            c->niov++;
            if (!(d.flags & F_WRITE))
                c->nread = c->niov;
        }
        ndesc++;
        if (!(d.flags & F_NEXT))
            break;
        if (d.next >= table_len)
            return -1;
        idx = d.next;
    }
    if (c->rlen + c->wlen > MAX_CHAIN_BYTES)
        return -1;
    return 0;
}

/* The driver's avail idx, or -1 if it claims more than size chains ahead (Python raises AvailRingOverflow). */
static int avail_idx(struct kn_vq *q) {
    uint16_t idx = load16(q->avail + 2);
    __atomic_thread_fence(__ATOMIC_ACQUIRE); /* ring entries after idx (x86: compiler barrier only) */
    if ((uint16_t)(idx - q->next_avail) > q->size)
        return -1;
    q->avail_idx = idx;
    return idx;
}

/* Next avail head without consuming it: 1 found, 0 none, -1 overflow. */
static int peek_head(struct kn_vq *q, uint16_t *head) {
    if ((uint16_t)q->next_avail == (uint16_t)q->avail_idx) {
        if (avail_idx(q) < 0)
            return -1;
        if ((uint16_t)q->next_avail == (uint16_t)q->avail_idx)
            return 0;
    }
    *head = load16(q->avail + 4 + 2 * (q->next_avail & (q->size - 1)));
    return 1;
}

static void put_used(struct kn_vq *q, unsigned int slot, uint16_t head, uint32_t len) {
    unsigned char *e = q->used + 4 + 8 * (slot & (q->size - 1));
    uint32_t id = head;
    memcpy(e, &id, 4);
    memcpy(e + 4, &len, 4);
}

/* Publish used entries up to next_used with one 16-bit store, after the elements (release). */
static void publish(struct kn_vq *q, unsigned int n) {
    __atomic_thread_fence(__ATOMIC_RELEASE);
    q->next_used = (q->next_used + n) & 0xffff;
    store16(q->used + 2, (uint16_t)q->next_used);
    q->num_added += n;
}

/* tx (virtio 1.2 5.1.6.2): each chain's readable buffers (header + frame) to the tap in one writev. */
int kn_tx(struct kn_vq *q, const struct kn_mem *m, int fd, int budget, int csum_ok, const unsigned char *gso_ok,
          unsigned long long max_bytes, struct kn_stats *st, int *done) {
    struct chain c;
    *done = 0;
    while (budget > 0) {
        uint16_t head;
        int r = peek_head(q, &head);
        if (r < 0)
            return DEFER;
        if (r == 0)
            return EMPTY;
        if (walk(q, m, head, &c) < 0 || c.has_writable || c.rlen < HDR)
            return DEFER; /* TxChainWritable, TxHeaderTooShort and every ring error are raised by Python */
        unsigned char h[2];
        /* flags and gso_type: the first two bytes, which may straddle buffers */
        if (c.iov[0].iov_len >= 2) {
            memcpy(h, c.iov[0].iov_base, 2);
        } else {
            h[0] = ((unsigned char *)c.iov[0].iov_base)[0];
            h[1] = ((unsigned char *)c.iov[1].iov_base)[0];
        }
        if (((h[0] & NEEDS_CSUM) && !csum_ok) || !gso_ok[h[1]]) {
            st->tx_bad_header++;
        } else if (c.rlen > max_bytes) {
            st->tx_dropped++;
        } else {
            ssize_t n;
            do {
                n = writev(fd, c.iov, c.nread);
            } while (n < 0 && errno == EINTR);
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                return TAP_BLOCKED;
            if (n < 0) {
                st->tx_dropped++; /* the kernel refused the frame: the guest's problem, not a ring violation */
            } else {
                st->tx_packets++;
                st->tx_bytes += n > HDR ? (unsigned long long)(n - HDR) : 0;
            }
        }
        q->next_avail = (q->next_avail + 1) & 0xffff;
        put_used(q, q->next_used, head, 0);
        publish(q, 1);
        budget--;
        (*done)++;
    }
    return BUDGET;
}

static ssize_t read_tap(int fd, unsigned char *buf, unsigned int size, struct kn_stats *st) {
    for (;;) {
        ssize_t n = read(fd, buf, size);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                st->rx_read_errors++;
            return 0;
        }
        if (n == 0)
            return 0;
        if (n < HDR) {
            st->rx_read_errors++;
            continue;
        }
        return n;
    }
}

/* rx (5.1.6.3, 5.1.6.4): frames from the tap, through the bounce buffer, into one chain, or with MRG_RXBUF as many
   as the frame needs; num_buffers says how many and all of them appear with one used-idx store. A frame that
   cannot be placed yet stays in the bounce buffer (*rx_len != 0) and the chains it would use stay queued. */
int kn_rx(struct kn_vq *q, const struct kn_mem *m, int fd, int budget, int mergeable, unsigned char flags_mask,
          unsigned char *bounce, unsigned int bounce_size, unsigned int *rx_len, struct kn_stats *st, int *done) {
    struct chain cs[MAX_IOV]; /* ~68 KiB of stack: far below a thread's 8 MiB */
    *done = 0;
    while (budget > 0) {
        uint16_t head;
        int r;
        if (*rx_len == 0) {
            /* A fresh read of avail idx before every frame, as the Python path's avail_pending(): the same
               overflow check at the same moments (the differential test holds us to it). */
            if (avail_idx(q) < 0)
                return DEFER;
            if ((uint16_t)q->next_avail == (uint16_t)q->avail_idx)
                return NEED_BUFFERS; /* leave the frame in the kernel: backpressure, not a drop */
            ssize_t n = read_tap(fd, bounce, bounce_size, st);
            if (n == 0)
                return EMPTY;
            *rx_len = (unsigned int)n;
        }
        unsigned int n = *rx_len, k = 0, start = q->next_avail;
        uint64_t room = 0;
        int dropped = 0;
        while (room < n) {
            if (!mergeable && k == 1) {
                /* 5.1.6.3.1 SHOULD: too small a buffer: drop the frame, keep the chain for the next one */
                dropped = 1;
                break;
            }
            if (k == MAX_IOV || k >= q->size) {
                if (k >= q->size) {
                    dropped = 1; /* even the whole ring cannot hold it: drop, keep the chains */
                    break;
                }
                q->next_avail = start;
                return DEFER;
            }
            r = peek_head(q, &head);
            if (r < 0) {
                q->next_avail = start;
                return DEFER;
            }
            if (r == 0) {
                q->next_avail = start;
                return NEED_BUFFERS;
            }
            if (walk(q, m, head, &cs[k]) < 0 || cs[k].has_readable || cs[k].wlen < HDR) {
                q->next_avail = start; /* RxChainReadable, RxBufferTooSmall, ring errors: Python raises them */
                return DEFER;
            }
            room += cs[k].wlen;
            q->next_avail = (q->next_avail + 1) & 0xffff;
            k++;
        }
        if (dropped) {
            st->rx_too_big++;
            q->next_avail = start;
            *rx_len = 0;
            budget--;
            (*done)++; /* a dropped frame uses budget, as in the Python path */
            continue;
        }
        bounce[0] &= flags_mask; /* 5.1.6.4: without GUEST_CSUM flags are zero */
        bounce[10] = (unsigned char)k;
        bounce[11] = (unsigned char)(k >> 8);
        unsigned int pos = 0;
        for (unsigned int i = 0; i < k; i++) {
            unsigned int first = pos;
            for (int j = 0; j < cs[i].niov && pos < n; j++) {
                size_t len = cs[i].iov[j].iov_len;
                if (len > n - pos)
                    len = n - pos;
                memcpy(cs[i].iov[j].iov_base, bounce + pos, len);
                pos += len;
            }
            put_used(q, q->next_used + i, cs[i].head, pos - first);
        }
        publish(q, k);
        st->rx_packets++;
        st->rx_bytes += n - HDR;
        st->rx_buffers += k;
        *rx_len = 0;
        budget--;
        (*done)++;
    }
    return BUDGET;
}
"""


def _load() -> ModuleType | None:
    if os.environ.get("KVMDM_NO_NETRING") == "1":
        return None
    try:
        flags: tuple[str, ...] = ("-O2",)
        link: tuple[str, ...] = ()
        if os.environ.get("KVMDM_NETRING_SANITIZE") == "1":
            # For a run under LD_PRELOAD=libasan.so (tests/unit/pv/test_pv_netring.py does one): ASan checks every
            # access of the C loop, UBSan traps undefined arithmetic.
            flags = ("-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                     "-fno-omit-frame-pointer")
            link = ("-fsanitize=address,undefined",)
        return cext.build("netring", CDEF, SOURCE, extra_compile_args=flags, extra_link_args=link)
    except Exception as e:  # no compiler or headers: the Python engine is the reference anyway
        log.warning("C virtio-net loop unavailable, using the Python one: %s", e)
        return None


_MOD = _load()
AVAILABLE = _MOD is not None

class RingQueue:
    """struct kn_vq for one validated SplitQueue; its ring pointers come from the engine's pinned regions."""

    def __init__(self, ffi: Any, q: SplitQueue, host: Any) -> None:
        q._views()  # raises unless validate() succeeded: the three rings are inside guest RAM
        self.q = q
        self.c: Any = ffi.new("struct kn_vq *")
        self.c.desc = host(q.desc_table, desc_table_size(q.size))
        self.c.avail = host(q.avail_ring, avail_ring_size(q.size))
        self.c.used = host(q.used_ring, used_ring_size(q.size))
        self.c.size = q.size
        self.c.indirect = int(q.indirect)

    def load(self) -> None:
        q, c = self.q, self.c
        c.next_avail = q.next_avail
        c.avail_idx = q._avail_idx
        c.next_used = q.next_used
        c.num_added = 0

    def store(self) -> None:
        q, c = self.q, self.c
        q.next_avail = c.next_avail
        q._avail_idx = c.avail_idx
        q.next_used = c.next_used
        q._num_added += c.num_added


class RingEngine:
    """The C side of one NetEngine: both queues, the guest memory table and the counters."""

    def __init__(self, mem: GuestMemory, rxq: SplitQueue, txq: SplitQueue) -> None:
        if _MOD is None:
            raise RuntimeError("the C virtio-net loop is not available")
        ffi, lib = _MOD.ffi, _MOD.lib
        self.ffi, self.lib = ffi, lib
        regions = mem.host_views()
        if len(regions) > MAX_REGIONS:
            raise ValueError(f"more than {MAX_REGIONS} guest memory regions")
        self.mem: Any = ffi.new("struct kn_mem *")
        self._views = [view for _gpa, view in regions]
        self._pins: list[Any] = []
        for i, (gpa, view) in enumerate(regions):
            ptr = ffi.from_buffer(view)  # pins the mapping until close()
            self._pins.append(ptr)
            self.mem.r[i].gpa = gpa
            self.mem.r[i].size = len(view)
            self.mem.r[i].host = ptr
        self.mem.n = len(regions)
        self.rxq = RingQueue(ffi, rxq, self._host)
        self.txq = RingQueue(ffi, txq, self._host)
        self.stats: Any = ffi.new("struct kn_stats *")
        self._stat_fields = [name for name, _field in ffi.typeof("struct kn_stats").fields]
        self.done: Any = ffi.new("int *")
        self.rx_len: Any = ffi.new("unsigned int *")
        self.gso_ok: Any = ffi.new("unsigned char[256]")

    def _host(self, gpa: int, length: int) -> Any:
        for i in range(self.mem.n):
            r = self.mem.r[i]
            if r.gpa <= gpa and gpa + length <= r.gpa + r.size:
                return r.host + (gpa - r.gpa)
        raise ValueError(f"ring 0x{gpa:x}+0x{length:x} is not inside one region")  # validate() said it is

    def close(self) -> None:
        """Unpin guest memory. The engine must not be used afterwards (its thread has stopped)."""
        self.mem.n = 0
        for ptr in self._pins:
            self.ffi.release(ptr)
        for view in self._views:
            view.release()
        self._pins = []
        self._views = []

    def set_tx_gso(self, allowed: frozenset[int]) -> None:
        for g in range(256):
            self.gso_ok[g] = 1 if g in allowed else 0

    def tx(self, fd: int, budget: int, csum_ok: bool, max_bytes: int) -> tuple[int, int]:
        """(status, chains completed)."""
        self.txq.load()
        try:
            rc = self.lib.kn_tx(self.txq.c, self.mem, fd, budget, int(csum_ok), self.gso_ok, max_bytes,
                                self.stats, self.done)
        finally:
            self.txq.store()
        return int(rc), int(self.done[0])

    def rx(self, fd: int, budget: int, mergeable: bool, flags_mask: int, bounce: Any, bounce_size: int,
           rx_len: int) -> tuple[int, int, int]:
        """(status, frames consumed from the budget (delivered or dropped), rx_len after)."""
        self.rxq.load()
        self.rx_len[0] = rx_len
        try:
            rc = self.lib.kn_rx(self.rxq.c, self.mem, fd, budget, int(mergeable), flags_mask, bounce, bounce_size,
                                self.rx_len, self.stats, self.done)
        finally:
            self.rxq.store()
        return int(rc), int(self.done[0]), int(self.rx_len[0])

    def take_stats(self) -> dict[str, int]:
        """Counters since the last call (then zeroed)."""
        out = {f: int(getattr(self.stats, f)) for f in self._stat_fields}
        for f in self._stat_fields:
            setattr(self.stats, f, 0)
        return out
