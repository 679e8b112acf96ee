"""Thin typed wrappers over the KVM ioctls: one class per fd (Kvm, Vm, Vcpu), one method per ioctl.

Every failed ioctl raises KvmError carrying the ioctl's name and errno. Struct layouts live in kvmcore._abi.
"""

from __future__ import annotations

import ctypes as C
import errno
import fcntl
import mmap
import os
import struct
from dataclasses import dataclass

from kvmcore import _abi as abi
from kvmcore.exits import VcpuExit, parse_exit
from kvmcore.memory import GuestMemory, MemorySlot


class KvmError(Exception):
    """A KVM ioctl failed: carries the ioctl name and errno."""

    def __init__(self, ioctl: str, err: int, detail: str = "") -> None:
        msg = f"{ioctl} failed: {os.strerror(err)} (errno {err})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)
        self.ioctl = ioctl
        self.errno = err


class KvmUnavailable(KvmError):
    """/dev/kvm cannot be opened (missing module, permissions, or busy)."""


class KvmApiMismatch(KvmError):
    """The kernel speaks a KVM API version other than 12."""


class KvmCapabilityMissing(KvmError):
    """A capability kvmdm needs is not offered by this kernel."""


def _name(req: int) -> str:
    return abi.IOCTL_NAMES.get(req, f"ioctl(0x{req:x})")


_libc = C.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [C.c_int, C.c_ulong, C.c_ulong]
_libc.ioctl.restype = C.c_int


def _ioctl(fd: int, req: int, arg: int | C.Structure | C.Array | C._SimpleCData | bytearray = 0) -> int:
    try:
        if isinstance(arg, int):
            if arg > 0x7FFF_FFFF:
                # fcntl.ioctl takes a C int; KVM_SET_TSS_ADDR's address does not fit one.
                ret = _libc.ioctl(fd, req, arg)
                if ret < 0:
                    raise OSError(C.get_errno(), os.strerror(C.get_errno()))
                return ret
            return fcntl.ioctl(fd, req, arg)
        # Passing a ctypes object: fcntl copies in/out through the buffer protocol (mutate_flag defaults True).
        return fcntl.ioctl(fd, req, arg, True)  # type: ignore[call-overload]
    except OSError as e:
        raise KvmError(_name(req), e.errno or errno.EIO) from None


# What KVM_GET_SUPPORTED_CPUID answered, per /dev/kvm node and buffer size. The answer is a property of the loaded
# kvm module and the host CPU, and the ioctl costs ~0.4 ms of kernel time on these hosts, every vCPU of every VM:
# the DM zygote asks once (daemon.zygote.warm) and each DM it forks finds the answer here. The key is the node's
# identity (device, inode, ctime), which reloading the module changes (udev makes a new node; libvirt's
# capability cache is invalidated by the same ctime), so a DM never uses what an earlier kvm module said.
_SUPPORTED_CPUID: dict[tuple[int, int, int, int, int], bytes] = {}


def _node_of(fd: int) -> tuple[int, int, int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_rdev, st.st_ctime_ns


class Kvm:
    """The /dev/kvm system fd."""

    def __init__(self, fd: int | None = None, path: str = "/dev/kvm") -> None:
        if fd is None:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as e:
                raise KvmUnavailable("open " + path, e.errno or errno.ENODEV,
                                     "is the kvm module loaded and are you allowed to use it?") from None
        self.fd = fd
        version = self.api_version()
        if version != abi.API_VERSION:
            raise KvmApiMismatch("KVM_GET_API_VERSION", errno.EINVAL, f"kernel speaks {version}, we need 12")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def api_version(self) -> int:
        return _ioctl(self.fd, abi.KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, abi.KVM_CHECK_EXTENSION, cap)

    def require(self, *caps: int) -> None:
        for cap in caps:
            if self.check_extension(cap) <= 0:
                raise KvmCapabilityMissing("KVM_CHECK_EXTENSION", errno.ENOSYS, f"capability {cap}")

    def vcpu_mmap_size(self) -> int:
        return _ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self, max_entries: int = 256) -> list[CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID, answered from :data:`_SUPPORTED_CPUID` when this fd is of the /dev/kvm node
        the answer was read through; fresh entries either way (callers edit them)."""
        key = (*_node_of(self.fd), max_entries)
        raw = _SUPPORTED_CPUID.get(key)
        if raw is None:
            buf = abi.cpuid_buffer(max_entries)()
            buf.hdr.nent = max_entries
            _ioctl(self.fd, abi.KVM_GET_SUPPORTED_CPUID, buf)
            if len(_SUPPORTED_CPUID) < 4:
                _SUPPORTED_CPUID[key] = bytes(memoryview(buf).cast("B"))
        else:
            buf = abi.cpuid_buffer(max_entries).from_buffer_copy(raw)  # type: ignore[attr-defined]
        return [CpuidEntry.from_c(buf.entries[i]) for i in range(buf.hdr.nent)]

    def msr_index_list(self) -> list[int]:
        buf = (C.c_uint32 * 1025)()
        buf[0] = 1024
        _ioctl(self.fd, abi.KVM_GET_MSR_INDEX_LIST, buf)  # type: ignore[arg-type]
        return list(buf[1 : 1 + buf[0]])

    def create_vm(self) -> Vm:
        return Vm(self, _ioctl(self.fd, abi.KVM_CREATE_VM, 0))


@dataclass
class CpuidEntry:
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    @classmethod
    def from_c(cls, e: abi.kvm_cpuid_entry2) -> CpuidEntry:
        return cls(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)


@dataclass(frozen=True)
class MsiRoute:
    gsi: int
    address: int
    data: int


@dataclass(frozen=True)
class IrqchipRoute:
    gsi: int
    irqchip: int
    pin: int


class Vm:
    """A VM fd: memory slots, irqchip, routing, irqfd/ioeventfd, vCPU creation."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.vcpus: list[Vcpu] = []

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0) -> None:
        r = abi.kvm_userspace_memory_region(slot, flags, gpa, size, host_addr)
        _ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, r)

    def map_memory(self, mem: GuestMemory) -> list[MemorySlot]:
        slots = mem.slots()
        for s in slots:
            self.set_user_memory_region(s.slot, s.gpa, s.size, s.host_addr)
        return slots

    def set_tss_addr(self, addr: int) -> None:
        _ioctl(self.fd, abi.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        _ioctl(self.fd, abi.KVM_SET_IDENTITY_MAP_ADDR, C.c_uint64(addr))

    def create_irqchip(self) -> None:
        _ioctl(self.fd, abi.KVM_CREATE_IRQCHIP, 0)

    def create_pit2(self, flags: int = abi.KVM_PIT_SPEAKER_DUMMY) -> None:
        cfg = abi.kvm_pit_config()
        cfg.flags = flags
        _ioctl(self.fd, abi.KVM_CREATE_PIT2, cfg)

    def irq_line(self, irq: int, level: int) -> None:
        _ioctl(self.fd, abi.KVM_IRQ_LINE, abi.kvm_irq_level(irq, level))

    def set_gsi_routing(self, routes: list[IrqchipRoute | MsiRoute]) -> None:
        buf = abi.routing_buffer(len(routes))()
        buf.hdr.nr = len(routes)
        for i, r in enumerate(routes):
            e = buf.entries[i]
            e.gsi = r.gsi
            if isinstance(r, MsiRoute):
                e.type = abi.KVM_IRQ_ROUTING_MSI
                e.u.msi.address_lo = r.address & 0xFFFF_FFFF
                e.u.msi.address_hi = r.address >> 32
                e.u.msi.data = r.data
            else:
                e.type = abi.KVM_IRQ_ROUTING_IRQCHIP
                e.u.irqchip.irqchip = r.irqchip
                e.u.irqchip.pin = r.pin
        _ioctl(self.fd, abi.KVM_SET_GSI_ROUTING, buf)

    def irqfd(self, fd: int, gsi: int, *, resample_fd: int | None = None, deassign: bool = False) -> None:
        s = abi.kvm_irqfd()
        s.fd = fd
        s.gsi = gsi
        if deassign:
            s.flags |= abi.KVM_IRQFD_FLAG_DEASSIGN
        if resample_fd is not None:
            s.flags |= abi.KVM_IRQFD_FLAG_RESAMPLE
            s.resamplefd = resample_fd
        _ioctl(self.fd, abi.KVM_IRQFD, s)

    def ioeventfd(self, fd: int, addr: int, length: int, *, pio: bool, datamatch: int | None = None,
                  deassign: bool = False) -> None:
        s = abi.kvm_ioeventfd()
        s.fd = fd
        s.addr = addr
        s.len = length
        if pio:
            s.flags |= abi.KVM_IOEVENTFD_FLAG_PIO
        if datamatch is not None:
            s.flags |= abi.KVM_IOEVENTFD_FLAG_DATAMATCH
            s.datamatch = datamatch
        if deassign:
            s.flags |= abi.KVM_IOEVENTFD_FLAG_DEASSIGN
        _ioctl(self.fd, abi.KVM_IOEVENTFD, s)

    def signal_msi(self, address: int, data: int) -> int:
        m = abi.kvm_msi()
        m.address_lo = address & 0xFFFF_FFFF
        m.address_hi = address >> 32
        m.data = data
        return _ioctl(self.fd, abi.KVM_SIGNAL_MSI, m)

    def create_vcpu(self, index: int) -> Vcpu:
        fd = _ioctl(self.fd, abi.KVM_CREATE_VCPU, index)
        try:
            vcpu = Vcpu(self, index, fd, self.kvm.vcpu_mmap_size())
        except BaseException:
            os.close(fd)
            raise
        self.vcpus.append(vcpu)
        return vcpu


_U8 = struct.Struct("<B")


class Vcpu:
    """A vCPU fd and its kvm_run mmap (owned: unmapped on close)."""

    def __init__(self, vm: Vm, index: int, fd: int, mmap_size: int) -> None:
        self.vm = vm
        self.index = index
        self.fd = fd
        self.run_mmap = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_view = memoryview(self.run_mmap)

    def close(self) -> None:
        if self.fd >= 0:
            self.run_view.release()
            try:
                self.run_mmap.close()
            except BufferError:
                # A live IoIn/MmioRead exit still holds a view of kvm_run. Unmapping is refused while it exists
                # (it is unmapped when that view is dropped); raising here used to leak this fd and the VM's.
                pass
            os.close(self.fd)
            self.fd = -1

    # --- run -------------------------------------------------------------------------------------------------
    def run(self) -> VcpuExit:
        """KVM_RUN once; returns a typed exit. EINTR (a kick) comes back as exits.Interrupted."""
        try:
            fcntl.ioctl(self.fd, abi.KVM_RUN, 0)
        except OSError as e:
            if e.errno in (errno.EINTR, errno.EAGAIN):
                return parse_exit(self.run_mmap, self.run_view, interrupted=True)
            raise KvmError("KVM_RUN", e.errno or errno.EIO) from None
        return parse_exit(self.run_mmap, self.run_view)

    def run_address(self) -> int:
        """Host address of the kvm_run page (for kvmcore.fastrun's C loop; valid until close())."""
        return C.addressof(C.c_char.from_buffer(self.run_mmap))

    def set_immediate_exit(self, value: bool) -> None:
        self.run_mmap[abi.RUN_IMMEDIATE_EXIT] = 1 if value else 0

    # --- registers -------------------------------------------------------------------------------------------
    def get_regs(self) -> abi.kvm_regs:
        r = abi.kvm_regs()
        _ioctl(self.fd, abi.KVM_GET_REGS, r)
        return r

    def set_regs(self, regs: abi.kvm_regs) -> None:
        _ioctl(self.fd, abi.KVM_SET_REGS, regs)

    def get_sregs(self) -> abi.kvm_sregs:
        s = abi.kvm_sregs()
        _ioctl(self.fd, abi.KVM_GET_SREGS, s)
        return s

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        _ioctl(self.fd, abi.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> abi.kvm_fpu:
        f = abi.kvm_fpu()
        _ioctl(self.fd, abi.KVM_GET_FPU, f)
        return f

    def set_fpu(self, fpu: abi.kvm_fpu) -> None:
        _ioctl(self.fd, abi.KVM_SET_FPU, fpu)

    def set_msrs(self, msrs: dict[int, int]) -> int:
        buf = abi.msrs_buffer(len(msrs))()
        buf.hdr.nmsrs = len(msrs)
        for i, (index, value) in enumerate(msrs.items()):
            buf.entries[i].index = index
            buf.entries[i].data = value
        n = _ioctl(self.fd, abi.KVM_SET_MSRS, buf)
        if n != len(msrs):
            bad = list(msrs)[n]
            raise KvmError("KVM_SET_MSRS", errno.EINVAL, f"MSR 0x{bad:x} was refused")
        return n

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        buf = abi.msrs_buffer(len(indices))()
        buf.hdr.nmsrs = len(indices)
        for i, index in enumerate(indices):
            buf.entries[i].index = index
        n = _ioctl(self.fd, abi.KVM_GET_MSRS, buf)
        return {buf.entries[i].index: buf.entries[i].data for i in range(n)}

    def set_cpuid2(self, entries: list[CpuidEntry]) -> None:
        buf = abi.cpuid_buffer(len(entries))()
        buf.hdr.nent = len(entries)
        for i, e in enumerate(entries):
            c = buf.entries[i]
            c.function, c.index, c.flags = e.function, e.index, e.flags
            c.eax, c.ebx, c.ecx, c.edx = e.eax, e.ebx, e.ecx, e.edx
        _ioctl(self.fd, abi.KVM_SET_CPUID2, buf)

    def get_lapic(self) -> bytes:
        s = abi.kvm_lapic_state()
        _ioctl(self.fd, abi.KVM_GET_LAPIC, s)
        return bytes(memoryview(s).cast("B"))  # not s.regs: a c_char array stops at the first NUL

    def set_lapic(self, regs: bytes) -> None:
        s = abi.kvm_lapic_state()
        C.memmove(C.addressof(s), regs, min(len(regs), 1024))  # not s.regs: that attribute is a bytes copy
        _ioctl(self.fd, abi.KVM_SET_LAPIC, s)

    def get_mp_state(self) -> int:
        s = abi.kvm_mp_state()
        _ioctl(self.fd, abi.KVM_GET_MP_STATE, s)
        return s.mp_state

    def set_mp_state(self, state: int) -> None:
        _ioctl(self.fd, abi.KVM_SET_MP_STATE, abi.kvm_mp_state(state))
