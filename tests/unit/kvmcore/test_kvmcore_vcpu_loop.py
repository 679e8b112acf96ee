"""handle_exit with fake buses (no /dev/kvm) and VmRunState's stop/pause protocol with fake vCPU threads."""

from __future__ import annotations

import threading
import time

import pytest

from devices.bus import Bus, BusDevice, mmio_bus, pio_bus
from kvmcore import _abi as abi
from kvmcore import exits as ex
from kvmcore.vcpu_loop import StopReason, VmRunState, handle_exit


class RecordingBus:
    """Records every access; reads fill the buffer with a per-call pattern (call number in every byte)."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []
        self.reads: list[tuple[int, int]] = []

    def read(self, addr: int, data: memoryview) -> bool:
        self.reads.append((addr, len(data)))
        data[:] = bytes([len(self.reads)]) * len(data)
        return True

    def write(self, addr: int, data: bytes | memoryview) -> bool:
        self.writes.append((addr, bytes(data)))
        return True


@pytest.fixture
def pio() -> RecordingBus:
    return RecordingBus()


@pytest.fixture
def mmio() -> RecordingBus:
    return RecordingBus()


# ---------------------------------------------------------------------------------------------- port I/O
def test_io_out_single_goes_to_the_pio_bus_only(pio: RecordingBus, mmio: RecordingBus) -> None:
    assert handle_exit(ex.IoOut(0x3F8, 1, 1, b"A"), pio, mmio) is None
    assert pio.writes == [(0x3F8, b"A")] and not pio.reads
    assert not mmio.writes and not mmio.reads


def test_rep_outs_is_split_into_count_writes_of_size_bytes(pio: RecordingBus, mmio: RecordingBus) -> None:
    assert handle_exit(ex.IoOut(0x1F0, 2, 3, b"aabbcc"), pio, mmio) is None
    assert pio.writes == [(0x1F0, b"aa"), (0x1F0, b"bb"), (0x1F0, b"cc")]


def test_io_in_single_fills_the_exit_buffer(pio: RecordingBus, mmio: RecordingBus) -> None:
    buf = bytearray(4)
    assert handle_exit(ex.IoIn(0x60, 4, 1, memoryview(buf)), pio, mmio) is None
    assert pio.reads == [(0x60, 4)]
    assert buf == b"\x01\x01\x01\x01"


def test_rep_ins_reads_count_elements_of_size_bytes_in_order(pio: RecordingBus, mmio: RecordingBus) -> None:
    buf = bytearray(8)
    assert handle_exit(ex.IoIn(0x1F0, 2, 4, memoryview(buf)), pio, mmio) is None
    assert pio.reads == [(0x1F0, 2)] * 4
    assert buf == b"\x01\x01\x02\x02\x03\x03\x04\x04"


# ---------------------------------------------------------------------------------------------- MMIO
def test_mmio_write_goes_to_the_mmio_bus_only(pio: RecordingBus, mmio: RecordingBus) -> None:
    assert handle_exit(ex.MmioWrite(0xFEBF_1000, b"\x01\x02\x03\x04"), pio, mmio) is None
    assert mmio.writes == [(0xFEBF_1000, b"\x01\x02\x03\x04")]
    assert not pio.writes


def test_mmio_read_fills_the_exit_buffer(pio: RecordingBus, mmio: RecordingBus) -> None:
    buf = bytearray(8)
    assert handle_exit(ex.MmioRead(0xFF00_0000, memoryview(buf)), pio, mmio) is None
    assert mmio.reads == [(0xFF00_0000, 8)] and not pio.reads
    assert buf == b"\x01" * 8


# ---------------------------------------------------------------------------------------------- stops
def test_exits_that_need_no_work_keep_running(pio: RecordingBus, mmio: RecordingBus) -> None:
    for e in (ex.Hlt(), ex.Interrupted(), ex.IrqWindowOpen()):
        assert handle_exit(e, pio, mmio) is None
    assert not (pio.reads or pio.writes or mmio.reads or mmio.writes)


def test_shutdown_is_a_crash(pio: RecordingBus, mmio: RecordingBus) -> None:
    r = handle_exit(ex.Shutdown(), pio, mmio)
    assert r is not None and r.kind == "crash" and "triple fault" in r.message


@pytest.mark.parametrize("typ,kind", [(abi.KVM_SYSTEM_EVENT_SHUTDOWN, "poweroff"),
                                      (abi.KVM_SYSTEM_EVENT_RESET, "reset"),
                                      (abi.KVM_SYSTEM_EVENT_CRASH, "crash"), (77, "crash")])
def test_system_events_map_to_stop_kinds(pio: RecordingBus, mmio: RecordingBus, typ: int, kind: str) -> None:
    r = handle_exit(ex.SystemEvent(typ, ()), pio, mmio)
    assert r is not None and r.kind == kind


def test_internal_error_is_a_crash_whose_message_names_the_emulation_failure(
    pio: RecordingBus, mmio: RecordingBus
) -> None:
    r = handle_exit(ex.InternalError(abi.KVM_INTERNAL_ERROR_EMULATION, (0x10,)), pio, mmio)
    assert r is not None and r.kind == "crash"
    assert "emulation failure" in r.message


def test_fail_entry_and_exception_are_crashes_with_details(pio: RecordingBus, mmio: RecordingBus) -> None:
    r = handle_exit(ex.FailEntry(0x21, 0), pio, mmio)
    assert r is not None and r.kind == "crash" and "0x21" in r.message
    r = handle_exit(ex.Exception_(13, 0), pio, mmio)
    assert r is not None and r.kind == "crash" and "13" in r.message


def test_unsupported_exit_is_an_error_naming_the_reason(pio: RecordingBus, mmio: RecordingBus) -> None:
    r = handle_exit(ex.Unsupported(42), pio, mmio)
    assert r == StopReason("error", "unsupported KVM exit reason 42")


# ---------------------------------------------------------------------------------------------- with a real Bus
class Latch(BusDevice):
    def __init__(self) -> None:
        self.value = 0x5A
        self.written: list[tuple[int, bytes]] = []

    def read(self, offset: int, data: memoryview) -> None:
        data[0] = self.value + offset

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.written.append((offset, bytes(data)))


def test_real_bus_unclaimed_io_in_reads_all_ones_and_is_counted() -> None:
    pio, mmio = pio_bus(), mmio_bus()
    buf = bytearray(4)
    assert handle_exit(ex.IoIn(0x1234, 4, 1, memoryview(buf)), pio, mmio) is None
    assert buf == b"\xff" * 4
    assert pio.stats.unclaimed_reads == 1 and mmio.stats.reads == 0


def test_real_bus_routes_to_the_device_with_its_offset() -> None:
    pio, mmio = pio_bus(), Bus("mmio", 1 << 64)
    dev = Latch()
    pio.insert(dev, 0x70, 2)
    buf = bytearray(1)
    handle_exit(ex.IoIn(0x71, 1, 1, memoryview(buf)), pio, mmio)
    assert buf == bytes([0x5B])
    handle_exit(ex.IoOut(0x70, 1, 2, b"\x0a\x0b"), pio, mmio)
    assert dev.written == [(0, b"\x0a"), (0, b"\x0b")]
    rep = bytearray(b"\x00\x00\x00")
    handle_exit(ex.IoIn(0x70, 1, 3, memoryview(rep)), pio, mmio)
    assert rep == b"\x5a\x5a\x5a"


# ---------------------------------------------------------------------------------------------- VmRunState
class FakeThread:
    def __init__(self, alive: bool = True) -> None:
        self.kicks = 0
        self.alive = alive

    def kick(self) -> None:
        self.kicks += 1

    def is_alive(self) -> bool:
        return self.alive


def test_request_stop_first_reason_wins_and_every_thread_is_kicked() -> None:
    s = VmRunState()
    threads = [FakeThread(), FakeThread()]
    s.threads = threads  # type: ignore[assignment]
    first, second = StopReason("poweroff", "first"), StopReason("crash", "second")
    s.request_stop(first)
    s.request_stop(second)
    assert s.stop_reason is first
    assert s.wait(0) is first
    assert [t.kicks for t in threads] == [2, 2]


def test_wait_times_out_with_none_when_nobody_stops() -> None:
    assert VmRunState().wait(0.01) is None


def test_wait_wakes_when_another_thread_requests_stop() -> None:
    s = VmRunState()
    reason = StopReason("reset", "r")
    timer = threading.Timer(0.05, s.request_stop, (reason,))
    timer.start()
    t0 = time.monotonic()
    assert s.wait(5) is reason
    assert time.monotonic() - t0 < 4
    timer.join()


def test_pause_with_no_live_threads_succeeds_at_once() -> None:
    s = VmRunState()
    s.threads = [FakeThread(alive=False)]  # type: ignore[list-item]
    assert s.pause(timeout=0.01) is True
    assert s.paused


def test_pause_times_out_when_a_live_thread_never_parks() -> None:
    s = VmRunState()
    t = FakeThread()
    s.threads = [t]  # type: ignore[list-item]
    assert s.pause(timeout=0.05) is False
    assert t.kicks == 1  # pause kicked it out of KVM_RUN


def test_pause_waits_for_the_thread_to_park_and_resume_releases_it() -> None:
    s = VmRunState()
    fake = FakeThread()
    s.threads = [fake]  # type: ignore[list-item]
    parked_and_back = threading.Event()
    iterations = []

    def vcpu_loop() -> None:  # what VcpuThread.run does between KVM_RUNs
        while s.stop_reason is None:
            iterations.append(1)
            if s.paused:
                s.park_if_paused()
                parked_and_back.set()
            time.sleep(0.001)

    worker = threading.Thread(target=vcpu_loop, daemon=True)
    worker.start()
    try:
        assert s.pause(timeout=5) is True
        assert s._parked == 1 and not parked_and_back.is_set()
        n = len(iterations)
        time.sleep(0.05)
        assert len(iterations) == n  # really parked: the loop is not spinning
        s.resume()
        assert parked_and_back.wait(5)
        assert not s.paused
    finally:
        s.request_stop(StopReason("host", "test over"))
        worker.join(5)
    assert not worker.is_alive()


def test_stop_request_releases_a_parked_thread_and_a_pending_pause() -> None:
    s = VmRunState()
    s.threads = [FakeThread()]  # type: ignore[list-item]
    s.paused = True
    released = threading.Event()

    def parker() -> None:
        s.park_if_paused()
        released.set()

    w = threading.Thread(target=parker, daemon=True)
    w.start()
    time.sleep(0.02)
    assert not released.is_set()
    s.request_stop(StopReason("host", "shutdown while paused"))
    assert released.wait(5)
    w.join(5)
    assert s.pause(timeout=0.01) is True  # a stopped VM never blocks a pause request


def test_park_if_paused_returns_at_once_when_not_paused() -> None:
    s = VmRunState()
    s.park_if_paused()
    assert s._parked == 0
