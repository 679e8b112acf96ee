"""The vCPU run loop: a pure exit dispatcher (`handle_exit`) and a thread that drives KVM_RUN.

`handle_exit` knows nothing of KVM fds: tests feed it fake exits. Port I/O goes to the I/O-port bus, MMIO to the
MMIO bus (anything with ``read(addr, data) -> bool`` / ``write(addr, data) -> bool``, e.g. devices.bus.Bus).
Nothing the guest does raises out of here: unknown exits stop *that guest* with a reason.

Stopping/pausing a vCPU blocked in KVM_RUN: set kvm_run.immediate_exit, then signal the thread (api.rst,
"immediate_exit"): either KVM_RUN is interrupted by the signal, or it returns EINTR at once if the flag was set
before entry, so a kick can never be lost between our flag check and the ioctl.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import signal
import struct
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from kvmcore import _abi as abi
from kvmcore import exits as ex
from kvmcore import fastrun
from kvmcore.kvm import KvmError, Vcpu

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGUSR1

_REASON = struct.Struct("<I")
_IO = struct.Struct("<BBHIQ")  # kvm_run.io: direction, size, port, count, data_offset


class IoBus(Protocol):
    def read(self, addr: int, data: memoryview) -> bool: ...

    def write(self, addr: int, data: bytes | memoryview) -> bool: ...


@dataclass(frozen=True)
class StopReason:
    """Why a guest stopped. kind: poweroff | reset | crash | error | host."""

    kind: str
    message: str
    guest_status: int | None = None


def handle_exit(exit: ex.VcpuExit, pio: IoBus, mmio: IoBus) -> StopReason | None:
    """Dispatch one exit. Returns a StopReason when the exit ends the guest, None to keep running."""
    t = type(exit)
    if t is ex.IoOut:
        assert isinstance(exit, ex.IoOut)
        if exit.count == 1:
            pio.write(exit.port, exit.data)
        else:  # rep outs: count elements of size bytes each
            s = exit.size
            for i in range(exit.count):
                pio.write(exit.port, exit.data[i * s : (i + 1) * s])
        return None
    if t is ex.IoIn:
        assert isinstance(exit, ex.IoIn)
        if exit.count == 1:
            pio.read(exit.port, exit.data)
        else:
            s = exit.size
            for i in range(exit.count):
                pio.read(exit.port, exit.data[i * s : (i + 1) * s])
        return None
    if t is ex.MmioWrite:
        assert isinstance(exit, ex.MmioWrite)
        mmio.write(exit.addr, exit.data)
        return None
    if t is ex.MmioRead:
        assert isinstance(exit, ex.MmioRead)
        mmio.read(exit.addr, exit.data)
        return None
    if t is ex.Interrupted or t is ex.Hlt or t is ex.IrqWindowOpen:
        return None
    if t is ex.Shutdown:
        return StopReason("crash", "guest triple fault (KVM_EXIT_SHUTDOWN)")
    if t is ex.SystemEvent:
        assert isinstance(exit, ex.SystemEvent)
        if exit.type == abi.KVM_SYSTEM_EVENT_SHUTDOWN:
            return StopReason("poweroff", "guest powered off (system event)")
        if exit.type == abi.KVM_SYSTEM_EVENT_RESET:
            return StopReason("reset", "guest requested reset (system event)")
        return StopReason("crash", f"guest system event {exit.type}")
    if t is ex.InternalError:
        assert isinstance(exit, ex.InternalError)
        return StopReason("crash", exit.describe())
    if t is ex.FailEntry:
        assert isinstance(exit, ex.FailEntry)
        return StopReason("crash", f"KVM entry failure (hardware reason 0x{exit.reason:x})")
    if t is ex.Exception_:
        assert isinstance(exit, ex.Exception_)
        return StopReason("crash", f"unhandled guest exception {exit.exception}")
    reason = getattr(exit, "reason", -1)
    return StopReason("error", f"unsupported KVM exit reason {reason}")


class VmRunState:
    """Shared by a VM's vCPU threads: stop requests (first reason wins) and pause/resume."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.stop_reason: StopReason | None = None
        self.paused = False
        self._parked = 0
        self.threads: list[VcpuThread] = []

    def request_stop(self, reason: StopReason) -> None:
        with self._cond:
            if self.stop_reason is None:
                self.stop_reason = reason
            self._cond.notify_all()
        self.kick_all()

    def kick_all(self) -> None:
        for t in self.threads:
            t.kick()

    def pause(self, timeout: float = 5.0) -> bool:
        with self._cond:
            self.paused = True
        self.kick_all()
        with self._cond:
            return self._cond.wait_for(
                lambda: self._parked >= sum(1 for t in self.threads if t.is_alive()) or self.stop_reason is not None,
                timeout,
            )

    def resume(self) -> None:
        with self._cond:
            self.paused = False
            self._cond.notify_all()

    def park_if_paused(self) -> None:
        with self._cond:
            if not self.paused:
                return
            self._parked += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self.paused or self.stop_reason is not None)
            self._parked -= 1

    def wait(self, timeout: float | None = None) -> StopReason | None:
        with self._cond:
            self._cond.wait_for(lambda: self.stop_reason is not None, timeout)
            return self.stop_reason


def install_kick_handler() -> None:
    """Must run in the main thread once: a no-op handler so the kick signal interrupts KVM_RUN, not the process."""
    signal.signal(KICK_SIGNAL, lambda _signum, _frame: None)


class VcpuThread(threading.Thread):
    def __init__(self, vcpu: Vcpu, pio: IoBus, mmio: IoBus, state: VmRunState,
                 device_lock: threading.Lock) -> None:
        super().__init__(name=f"vcpu{vcpu.index}", daemon=True)
        self.vcpu = vcpu
        self.pio = pio
        self.mmio = mmio
        self.state = state
        self.lock = device_lock
        self.exits: Counter[str] = Counter()
        # Fast-path counters, plain ints (cheaper than Counter on the hot path); merged by exit_counts().
        self.fast_io_out = 0
        self.fast_io_in = 0
        self._fast: fastrun.FastRunner | None = None  # the C loop's state, when it serves this vCPU

    def exit_counts(self) -> Counter[str]:
        c = Counter(self.exits)
        c["IoOut"] += self.fast_io_out
        c["IoIn"] += self.fast_io_in
        fast = self._fast
        if fast is not None:  # read live: a guest may never exit to Python again after its last trivial exit
            k = fast.counts
            c["IoIn"] += k.pio_reads + k.dev_reads
            c["IoOut"] += k.pio_writes + k.dev_writes
            c["MmioRead"] += k.mmio_reads
            c["MmioWrite"] += k.mmio_writes
        return +c

    def _fast_runner(self, vcpu: Vcpu, pio: IoBus, mmio: IoBus) -> fastrun.FastRunner | None:
        needed = ("generation", "ranges", "add_counter_source", "accelerated")
        if not fastrun.AVAILABLE or not all(hasattr(b, a) for b in (pio, mmio) for a in needed):
            return None
        fast = fastrun.FastRunner(vcpu.fd, vcpu.run_address(), len(vcpu.run_mmap))
        k = fast.counts
        pio.add_counter_source(  # type: ignore[attr-defined]
            lambda: (k.dev_reads, k.dev_writes, k.pio_reads, k.pio_writes))
        mmio.add_counter_source(lambda: (0, 0, k.mmio_reads, k.mmio_writes))  # type: ignore[attr-defined]
        self._fast = fast
        return fast


    def kick(self) -> None:
        if self.vcpu.fd < 0:
            return
        self.vcpu.set_immediate_exit(True)
        if self.ident is not None and self.is_alive():
            try:
                signal.pthread_kill(self.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def run(self) -> None:
        vcpu, state, lock, counts = self.vcpu, self.state, self.lock, self.exits
        pio, mmio = self.pio, self.mmio
        try:
            self._loop(vcpu, state, lock, counts, pio, mmio)
        except KvmError as e:
            state.request_stop(StopReason("error", f"vcpu{vcpu.index}: {e}"))
        except Exception as e:  # a bug in a device must stop this guest, not hang it
            log.exception("vcpu%d: unexpected error", vcpu.index)
            state.request_stop(StopReason("error", f"vcpu{vcpu.index}: internal error: {e!r}"))
        finally:
            counts["IoOut"] += self.fast_io_out
            counts["IoIn"] += self.fast_io_in
            self.fast_io_out = self.fast_io_in = 0

    def _loop(self, vcpu: Vcpu, state: VmRunState, lock: threading.Lock, counts: Counter[str], pio: IoBus,
              mmio: IoBus) -> None:
        fast = self._fast_runner(vcpu, pio, mmio)
        # Our own export of the kvm_run mapping: Vcpu.close() cannot unmap it while this loop (and the C loop,
        # which holds a raw pointer into it) still runs; the mapping goes when this view does.
        guard = memoryview(vcpu.run_mmap)
        try:
            self._run_loop(vcpu, state, lock, counts, pio, mmio, fast)
        finally:
            guard.release()

    def _run_loop(self, vcpu: Vcpu, state: VmRunState, lock: threading.Lock, counts: Counter[str], pio: IoBus,
                  mmio: IoBus, fast: fastrun.FastRunner | None) -> None:
        # Port I/O is the hot exit (UART, PCI config, guests' doorbells before ioeventfds exist): on this
        # nested host every microsecond of Python per exit shows (bench/exits.py), so single-element port I/O
        # is dispatched straight from the kvm_run page without building a typed exit. Everything else takes
        # the typed path through parse_exit/handle_exit.
        fd, run_mm, view = vcpu.fd, vcpu.run_mmap, vcpu.run_view
        page = len(view)
        ioctl, kvm_run = fcntl.ioctl, abi.KVM_RUN
        reason_at, io_at = _REASON.unpack_from, _IO.unpack_from
        exit_io = abi.KVM_EXIT_IO
        while state.stop_reason is None:
            if state.paused:
                state.park_if_paused()
                continue
            if fast is not None:
                # KVM_RUN in C: unclaimed port/MMIO accesses are answered there (see kvmcore.fastrun); we get
                # control back for everything else, with kvm_run describing the exit exactly as after our ioctl.
                gen = (pio.generation, mmio.generation)  # type: ignore[attr-defined]
                if gen != fast.generation:
                    fast.set_ranges(pio.ranges(), mmio.ranges(), gen,  # type: ignore[attr-defined]
                                    [a for a in pio.accelerated()  # type: ignore[attr-defined]
                                     if isinstance(a[2], fastrun.SHARED_TYPES)])
                rc = fast.run()
                # What accelerated devices did in C (a UART's queued bytes, its interrupt count) reaches their
                # Python half before Python handles anything else, so side effects keep the guest's order.
                for acc in fast.accels:
                    if acc.needs_flush():
                        with lock:
                            acc.flush()
                if rc == 1:
                    continue
                if rc < 0:
                    if -rc not in (errno.EINTR, errno.EAGAIN):
                        raise KvmError("KVM_RUN", -rc)
                    counts["Interrupted"] += 1
                    vcpu.set_immediate_exit(False)
                    continue
            else:
                try:
                    ioctl(fd, kvm_run, 0)
                except OSError as e:
                    if e.errno not in (errno.EINTR, errno.EAGAIN):
                        raise KvmError("KVM_RUN", e.errno or errno.EIO) from None
                    counts["Interrupted"] += 1
                    vcpu.set_immediate_exit(False)
                    continue
            if reason_at(run_mm, abi.RUN_EXIT_REASON)[0] == exit_io:
                direction, size, port, count, off = io_at(run_mm, abi.RUN_UNION)
                if count == 1 and off + size <= page:
                    with lock:
                        if direction:
                            pio.write(port, view[off : off + size])
                            self.fast_io_out += 1
                        else:
                            pio.read(port, view[off : off + size])
                            self.fast_io_in += 1
                    continue
            exit = ex.parse_exit(run_mm, view)
            counts[type(exit).__name__] += 1
            with lock:
                reason = handle_exit(exit, pio, mmio)
            if reason is not None:
                state.request_stop(reason)
                break
