"""parse_exit on fake kvm_run pages laid out at kvmcore._abi's offsets (api.rst, "The kvm_run structure")."""

from __future__ import annotations

import struct

import pytest

from kvmcore import _abi as abi
from kvmcore import exits as ex

PAGE = 4096


def _page(reason: int) -> bytearray:
    run = bytearray(PAGE)
    struct.pack_into("<I", run, abi.RUN_EXIT_REASON, reason)
    return run


def _io_page(direction: int, size: int, port: int, count: int, data_offset: int, data: bytes = b"") -> bytearray:
    run = _page(abi.KVM_EXIT_IO)
    struct.pack_into("<B", run, abi.RUN_IO_DIRECTION, direction)
    struct.pack_into("<B", run, abi.RUN_IO_SIZE, size)
    struct.pack_into("<H", run, abi.RUN_IO_PORT, port)
    struct.pack_into("<I", run, abi.RUN_IO_COUNT, count)
    struct.pack_into("<Q", run, abi.RUN_IO_DATA_OFFSET, data_offset)
    run[data_offset : data_offset + len(data)] = data
    return run


def _mmio_page(addr: int, data: bytes, length: int, is_write: bool) -> bytearray:
    run = _page(abi.KVM_EXIT_MMIO)
    struct.pack_into("<Q", run, abi.RUN_MMIO_PHYS_ADDR, addr)
    run[abi.RUN_MMIO_DATA : abi.RUN_MMIO_DATA + 8] = data.ljust(8, b"\0")[:8]
    struct.pack_into("<I", run, abi.RUN_MMIO_LEN, length)
    struct.pack_into("<B", run, abi.RUN_MMIO_IS_WRITE, int(is_write))
    return run


def _parse(run: bytearray) -> ex.VcpuExit:
    return ex.parse_exit(run, memoryview(run))


# ---------------------------------------------------------------------------------------------- port I/O
@pytest.mark.parametrize("size,data", [(1, b"\x42"), (2, b"\x34\x12"), (4, b"\xef\xbe\xad\xde")])
def test_io_out_carries_port_size_and_a_copy_of_the_data(size: int, data: bytes) -> None:
    run = _io_page(abi.KVM_EXIT_IO_OUT, size, 0x3F8, 1, 0x100, data)
    e = _parse(run)
    assert e == ex.IoOut(0x3F8, size, 1, data)
    run[0x100] ^= 0xFF
    assert isinstance(e, ex.IoOut) and e.data == data  # a copy: later KVM_RUNs must not change it


def test_rep_outs_carries_size_times_count_bytes() -> None:
    payload = bytes(range(12))
    e = _parse(_io_page(abi.KVM_EXIT_IO_OUT, 2, 0x1F0, 6, 0x200, payload))
    assert e == ex.IoOut(0x1F0, 2, 6, payload)


@pytest.mark.parametrize("size,count", [(1, 1), (2, 1), (4, 1), (1, 5), (4, 3)])
def test_io_in_data_is_a_writable_view_into_the_run_page(size: int, count: int) -> None:
    run = _io_page(abi.KVM_EXIT_IO_IN, size, 0x60, count, 0x300)
    e = _parse(run)
    assert isinstance(e, ex.IoIn)
    assert (e.port, e.size, e.count, len(e.data)) == (0x60, size, count, size * count)
    assert not e.data.readonly
    fill = bytes(range(1, size * count + 1))
    e.data[:] = fill
    assert run[0x300 : 0x300 + size * count] == fill  # KVM copies this into the guest on the next KVM_RUN
    assert run[0x300 + size * count] == 0


@pytest.mark.parametrize(
    "size,count,offset",
    [(1, 1, PAGE), (4, 1, PAGE - 3), (2, 4, PAGE - 7), (1, 1, 1 << 63), (4, 0xFFFF_FFFF, 0x100), (0, 1, 0x100),
     (1, 0, 0x100)],
    ids=["offset-at-end", "last-bytes-straddle", "rep-straddles", "offset-2**63", "huge-count", "size-0", "count-0"],
)
@pytest.mark.parametrize("direction", [abi.KVM_EXIT_IO_IN, abi.KVM_EXIT_IO_OUT], ids=["in", "out"])
def test_io_data_outside_the_page_is_unsupported_not_an_index_error(
    direction: int, size: int, count: int, offset: int
) -> None:
    assert _parse(_io_page(direction, size, 0x80, count, offset)) == ex.Unsupported(abi.KVM_EXIT_IO)


def test_io_data_ending_exactly_at_the_page_end_is_accepted() -> None:
    e = _parse(_io_page(abi.KVM_EXIT_IO_OUT, 4, 0x80, 2, PAGE - 8, b"12345678"))
    assert e == ex.IoOut(0x80, 4, 2, b"12345678")


# ---------------------------------------------------------------------------------------------- MMIO
@pytest.mark.parametrize("length", range(1, 9))
def test_mmio_write_carries_exactly_len_bytes(length: int) -> None:
    data = bytes(range(0xA1, 0xA9))
    e = _parse(_mmio_page(0xFEBF_0000, data, length, True))
    assert e == ex.MmioWrite(0xFEBF_0000, data[:length])


@pytest.mark.parametrize("length", range(1, 9))
def test_mmio_read_data_is_a_writable_view_of_len_bytes_in_the_run_page(length: int) -> None:
    run = _mmio_page(0xFF00_0010, b"", length, False)
    e = _parse(run)
    assert isinstance(e, ex.MmioRead) and e.addr == 0xFF00_0010
    assert len(e.data) == length and not e.data.readonly
    e.data[:] = b"\x5a" * length
    assert run[abi.RUN_MMIO_DATA : abi.RUN_MMIO_DATA + 8] == b"\x5a" * length + bytes(8 - length)


@pytest.mark.parametrize("bogus", [9, 16, 0xFFFF_FFFF])
def test_mmio_len_above_8_is_clamped_to_the_8_byte_data_field(bogus: int) -> None:
    data = b"ABCDEFGH"
    w = _parse(_mmio_page(0x1000, data, bogus, True))
    assert w == ex.MmioWrite(0x1000, data)
    run = _mmio_page(0x1000, b"", bogus, False)
    r = _parse(run)
    assert isinstance(r, ex.MmioRead) and len(r.data) == 8
    r.data[:] = b"\xff" * 8
    assert run[abi.RUN_MMIO_LEN] == bogus & 0xFF  # the fill stayed inside data[8]


# ---------------------------------------------------------------------------------------------- other exits
def test_hlt() -> None:
    assert _parse(_page(abi.KVM_EXIT_HLT)) == ex.Hlt()


def test_shutdown_is_a_triple_fault() -> None:
    assert _parse(_page(abi.KVM_EXIT_SHUTDOWN)) == ex.Shutdown()


def test_intr_reason_and_interrupted_flag_both_mean_interrupted() -> None:
    assert _parse(_page(abi.KVM_EXIT_INTR)) == ex.Interrupted()
    run = _page(abi.KVM_EXIT_HLT)  # stale reason from the previous exit must be ignored on EINTR
    assert ex.parse_exit(run, memoryview(run), interrupted=True) == ex.Interrupted()


def test_irq_window_open() -> None:
    assert _parse(_page(abi.KVM_EXIT_IRQ_WINDOW_OPEN)) == ex.IrqWindowOpen()


@pytest.mark.parametrize("typ", [abi.KVM_SYSTEM_EVENT_SHUTDOWN, abi.KVM_SYSTEM_EVENT_RESET,
                                 abi.KVM_SYSTEM_EVENT_CRASH])
def test_system_event_carries_type_and_ndata_words(typ: int) -> None:
    run = _page(abi.KVM_EXIT_SYSTEM_EVENT)
    struct.pack_into("<II", run, abi.RUN_SYSTEM_EVENT_TYPE, typ, 2)
    struct.pack_into("<3Q", run, abi.RUN_SYSTEM_EVENT_DATA, 0x11, 0x22, 0x33)
    assert _parse(run) == ex.SystemEvent(typ, (0x11, 0x22))


def test_system_event_ndata_is_clamped_to_16() -> None:
    run = _page(abi.KVM_EXIT_SYSTEM_EVENT)
    struct.pack_into("<II", run, abi.RUN_SYSTEM_EVENT_TYPE, abi.KVM_SYSTEM_EVENT_RESET, 0xFFFF_FFFF)
    struct.pack_into("<17Q", run, abi.RUN_SYSTEM_EVENT_DATA, *range(100, 117))
    e = _parse(run)
    assert isinstance(e, ex.SystemEvent) and e.data == tuple(range(100, 116))


def test_internal_error_carries_suberror_and_data() -> None:
    run = _page(abi.KVM_EXIT_INTERNAL_ERROR)
    struct.pack_into("<II", run, abi.RUN_INTERNAL_SUBERROR, abi.KVM_INTERNAL_ERROR_EMULATION, 3)
    struct.pack_into("<3Q", run, abi.RUN_INTERNAL_DATA, 1, 0xCAFE, 3)
    e = _parse(run)
    assert e == ex.InternalError(abi.KVM_INTERNAL_ERROR_EMULATION, (1, 0xCAFE, 3))
    assert isinstance(e, ex.InternalError)
    assert "emulation failure" in e.describe() and "0xcafe" in e.describe()


@pytest.mark.parametrize("ndata", [16, 17, 1000, 0xFFFF_FFFF])
def test_internal_error_ndata_is_clamped_to_16(ndata: int) -> None:
    run = _page(abi.KVM_EXIT_INTERNAL_ERROR)
    struct.pack_into("<II", run, abi.RUN_INTERNAL_SUBERROR, abi.KVM_INTERNAL_ERROR_DELIVERY_EV, ndata)
    struct.pack_into("<16Q", run, abi.RUN_INTERNAL_DATA, *range(16))
    e = _parse(run)
    assert isinstance(e, ex.InternalError) and e.data == tuple(range(16))
    assert "event delivery failure" in e.describe()


def test_internal_error_describe_names_unknown_suberrors_by_number() -> None:
    assert "suberror 99" in ex.InternalError(99, ()).describe()
    assert "simultaneous exceptions" in ex.InternalError(abi.KVM_INTERNAL_ERROR_SIMUL_EX, ()).describe()


def test_fail_entry_carries_hardware_reason_and_cpu() -> None:
    run = _page(abi.KVM_EXIT_FAIL_ENTRY)
    struct.pack_into("<Q", run, abi.RUN_FAIL_ENTRY_REASON, 0x8000_0021)
    struct.pack_into("<I", run, abi.RUN_FAIL_ENTRY_CPU, 3)
    assert _parse(run) == ex.FailEntry(0x8000_0021, 3)


def test_exception_exit_carries_vector_and_error_code() -> None:
    run = _page(abi.KVM_EXIT_EXCEPTION)
    struct.pack_into("<II", run, abi.RUN_EXCEPTION_EXCEPTION, 13, 0x18)
    assert _parse(run) == ex.Exception_(13, 0x18)


@pytest.mark.parametrize("reason", [abi.KVM_EXIT_UNKNOWN, abi.KVM_EXIT_HYPERCALL, abi.KVM_EXIT_DEBUG, 11, 23, 999,
                                    0xFFFF_FFFF])
def test_unknown_reasons_become_unsupported_with_the_reason(reason: int) -> None:
    assert _parse(_page(reason)) == ex.Unsupported(reason)


def test_parse_accepts_an_mmap_like_kvm_does() -> None:
    import mmap

    mm = mmap.mmap(-1, PAGE)
    try:
        mm[:] = _io_page(abi.KVM_EXIT_IO_IN, 1, 0x71, 1, 0x400)
        view = memoryview(mm)
        e = ex.parse_exit(mm, view)
        assert isinstance(e, ex.IoIn)
        e.data[0] = 0x99
        assert mm[0x400] == 0x99
        del e
        view.release()
    finally:
        mm.close()
