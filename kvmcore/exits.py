"""Typed vCPU exits, parsed from the kvm_run page.

IoIn and MmioRead carry a writable view of kvm_run's data area: the handler fills it before the next KVM_RUN
(as rust-vmm's VcpuExit::IoIn does). Exit reasons we do not model become Unsupported(reason): the consumer decides.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

from kvmcore import _abi as abi

_U32 = struct.Struct("<I")
_IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
_MMIO = struct.Struct("<Q8sIB")  # phys_addr, data[8], len, is_write
_INTERNAL = struct.Struct("<II")  # suberror, ndata
_SYSEV = struct.Struct("<II")  # type, ndata
_FAIL = struct.Struct("<QI")  # hardware_entry_failure_reason, cpu
_EXC = struct.Struct("<II")


@dataclass(frozen=True, slots=True)
class IoOut:
    port: int
    size: int
    count: int
    data: bytes  # size * count bytes


@dataclass(frozen=True, slots=True)
class IoIn:
    port: int
    size: int
    count: int
    data: memoryview  # size * count bytes to fill


@dataclass(frozen=True, slots=True)
class MmioWrite:
    addr: int
    data: bytes


@dataclass(frozen=True, slots=True)
class MmioRead:
    addr: int
    data: memoryview  # len bytes to fill


@dataclass(frozen=True, slots=True)
class Hlt:
    pass


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Triple fault (or a guest-initiated shutdown the hardware reports this way)."""


@dataclass(frozen=True, slots=True)
class SystemEvent:
    type: int  # KVM_SYSTEM_EVENT_*
    data: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class InternalError:
    suberror: int
    data: tuple[int, ...]

    def describe(self) -> str:
        names = {
            abi.KVM_INTERNAL_ERROR_EMULATION: "emulation failure",
            abi.KVM_INTERNAL_ERROR_SIMUL_EX: "simultaneous exceptions",
            abi.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failure",
        }
        what = names.get(self.suberror, f"suberror {self.suberror}")
        return f"KVM internal error: {what} data=[{', '.join(hex(d) for d in self.data)}]"


@dataclass(frozen=True, slots=True)
class FailEntry:
    reason: int
    cpu: int


@dataclass(frozen=True, slots=True)
class Exception_:
    exception: int
    error_code: int


@dataclass(frozen=True, slots=True)
class Interrupted:
    """KVM_RUN returned EINTR: a signal or immediate_exit kicked the vCPU out."""


@dataclass(frozen=True, slots=True)
class IrqWindowOpen:
    pass


@dataclass(frozen=True, slots=True)
class Unsupported:
    reason: int


VcpuExit = (
    IoOut | IoIn | MmioWrite | MmioRead | Hlt | Shutdown | SystemEvent | InternalError | FailEntry
    | Exception_ | Interrupted | IrqWindowOpen | Unsupported
)

_INTERRUPTED = Interrupted()
_HLT = Hlt()
_SHUTDOWN = Shutdown()
_IRQ_WINDOW = IrqWindowOpen()


def parse_exit(run: mmap.mmap | bytes | bytearray, view: memoryview, interrupted: bool = False) -> VcpuExit:
    """Decode kvm_run after KVM_RUN returned. ``view`` is a writable view of the same page (for In/Read)."""
    if interrupted:
        return _INTERRUPTED
    reason = _U32.unpack_from(run, abi.RUN_EXIT_REASON)[0]
    if reason == abi.KVM_EXIT_IO:
        direction, size, port, count, off = _IO.unpack_from(run, abi.RUN_UNION)
        n = size * count
        # data_offset comes from the kernel, but a bogus one must not make us index outside the page.
        if off + n > len(view) or n <= 0:
            return Unsupported(reason)
        if direction == abi.KVM_EXIT_IO_OUT:
            return IoOut(port, size, count, bytes(view[off : off + n]))
        return IoIn(port, size, count, view[off : off + n])
    if reason == abi.KVM_EXIT_MMIO:
        addr, data, length, is_write = _MMIO.unpack_from(run, abi.RUN_UNION)
        length = min(length, 8)
        if is_write:
            return MmioWrite(addr, data[:length])
        return MmioRead(addr, view[abi.RUN_MMIO_DATA : abi.RUN_MMIO_DATA + length])
    if reason == abi.KVM_EXIT_HLT:
        return _HLT
    if reason == abi.KVM_EXIT_SHUTDOWN:
        return _SHUTDOWN
    if reason == abi.KVM_EXIT_INTR:
        return _INTERRUPTED
    if reason == abi.KVM_EXIT_SYSTEM_EVENT:
        typ, ndata = _SYSEV.unpack_from(run, abi.RUN_UNION)
        ndata = min(ndata, 16)
        data = struct.unpack_from(f"<{ndata}Q", run, abi.RUN_SYSTEM_EVENT_DATA)
        return SystemEvent(typ, data)
    if reason == abi.KVM_EXIT_INTERNAL_ERROR:
        sub, ndata = _INTERNAL.unpack_from(run, abi.RUN_UNION)
        ndata = min(ndata, 16)
        data = struct.unpack_from(f"<{ndata}Q", run, abi.RUN_INTERNAL_DATA)
        return InternalError(sub, data)
    if reason == abi.KVM_EXIT_FAIL_ENTRY:
        hw, cpu = _FAIL.unpack_from(run, abi.RUN_UNION)
        return FailEntry(hw, cpu)
    if reason == abi.KVM_EXIT_EXCEPTION:
        exc, code = _EXC.unpack_from(run, abi.RUN_UNION)
        return Exception_(exc, code)
    if reason == abi.KVM_EXIT_IRQ_WINDOW_OPEN:
        return _IRQ_WINDOW
    return Unsupported(reason)
