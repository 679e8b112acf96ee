"""Every KVM C struct and ioctl number kvmdm uses, in one place (mirrors <linux/kvm.h> and <asm/kvm.h>).

Grouped by the fd an ioctl is issued on, as in rust-vmm's kvm_ioctls.rs. tests/unit/kvmcore/test_kvmcore_abi.py compiles
a C program against the system headers and compares every size, offset and number below with the C compiler's.
"""

from __future__ import annotations

import ctypes as C
from typing import Any

KVMIO = 0xAE

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, ctype: type) -> int:
    return _ioc(_IOC_WRITE, nr, C.sizeof(ctype))


def _ior(nr: int, ctype: type) -> int:
    return _ioc(_IOC_READ, nr, C.sizeof(ctype))


def _iowr(nr: int, ctype: type) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, C.sizeof(ctype))


# --------------------------------------------------------------------------- structs
class kvm_userspace_memory_region(C.Structure):
    _fields_ = [
        ("slot", C.c_uint32),
        ("flags", C.c_uint32),
        ("guest_phys_addr", C.c_uint64),
        ("memory_size", C.c_uint64),
        ("userspace_addr", C.c_uint64),
    ]


KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1  # needs KVM_CAP_READONLY_MEM: guest writes exit as KVM_EXIT_MMIO


class kvm_regs(C.Structure):
    _fields_ = [
        (n, C.c_uint64)
        for n in (
            "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()
        )
    ]


class kvm_segment(C.Structure):
    _fields_ = [
        ("base", C.c_uint64),
        ("limit", C.c_uint32),
        ("selector", C.c_uint16),
        ("type", C.c_uint8),
        ("present", C.c_uint8),
        ("dpl", C.c_uint8),
        ("db", C.c_uint8),
        ("s", C.c_uint8),
        ("l", C.c_uint8),
        ("g", C.c_uint8),
        ("avl", C.c_uint8),
        ("unusable", C.c_uint8),
        ("padding", C.c_uint8),
    ]


class kvm_dtable(C.Structure):
    _fields_ = [("base", C.c_uint64), ("limit", C.c_uint16), ("padding", C.c_uint16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(C.Structure):
    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", C.c_uint64),
        ("cr2", C.c_uint64),
        ("cr3", C.c_uint64),
        ("cr4", C.c_uint64),
        ("cr8", C.c_uint64),
        ("efer", C.c_uint64),
        ("apic_base", C.c_uint64),
        ("interrupt_bitmap", C.c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(C.Structure):
    _fields_ = [
        ("fpr", (C.c_uint8 * 16) * 8),
        ("fcw", C.c_uint16),
        ("fsw", C.c_uint16),
        ("ftwx", C.c_uint8),
        ("pad1", C.c_uint8),
        ("last_opcode", C.c_uint16),
        ("last_ip", C.c_uint64),
        ("last_dp", C.c_uint64),
        ("xmm", (C.c_uint8 * 16) * 16),
        ("mxcsr", C.c_uint32),
        ("pad2", C.c_uint32),
    ]


class kvm_msr_entry(C.Structure):
    _fields_ = [("index", C.c_uint32), ("reserved", C.c_uint32), ("data", C.c_uint64)]


class kvm_msrs(C.Structure):
    """Header only; entries follow (flexible array). Use msrs_buffer(n)."""

    _fields_ = [("nmsrs", C.c_uint32), ("pad", C.c_uint32)]


class kvm_msr_list(C.Structure):
    _fields_ = [("nmsrs", C.c_uint32)]


class kvm_cpuid_entry2(C.Structure):
    _fields_ = [
        ("function", C.c_uint32),
        ("index", C.c_uint32),
        ("flags", C.c_uint32),
        ("eax", C.c_uint32),
        ("ebx", C.c_uint32),
        ("ecx", C.c_uint32),
        ("edx", C.c_uint32),
        ("padding", C.c_uint32 * 3),
    ]


class kvm_cpuid2(C.Structure):
    """Header only; entries follow (flexible array). Use cpuid_buffer(n)."""

    _fields_ = [("nent", C.c_uint32), ("padding", C.c_uint32)]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1


class kvm_lapic_state(C.Structure):
    _fields_ = [("regs", C.c_char * 1024)]


class kvm_mp_state(C.Structure):
    _fields_ = [("mp_state", C.c_uint32)]


KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3


class kvm_pit_config(C.Structure):
    _fields_ = [("flags", C.c_uint32), ("pad", C.c_uint32 * 15)]


KVM_PIT_SPEAKER_DUMMY = 1


class kvm_irq_level(C.Structure):
    _fields_ = [("irq", C.c_uint32), ("level", C.c_uint32)]


class kvm_irqfd(C.Structure):
    _fields_ = [
        ("fd", C.c_uint32),
        ("gsi", C.c_uint32),
        ("flags", C.c_uint32),
        ("resamplefd", C.c_uint32),
        ("pad", C.c_uint8 * 16),
    ]


KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1


class kvm_ioeventfd(C.Structure):
    _fields_ = [
        ("datamatch", C.c_uint64),
        ("addr", C.c_uint64),
        ("len", C.c_uint32),
        ("fd", C.c_int32),
        ("flags", C.c_uint32),
        ("pad", C.c_uint8 * 36),
    ]


KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2


class kvm_msi(C.Structure):
    _fields_ = [
        ("address_lo", C.c_uint32),
        ("address_hi", C.c_uint32),
        ("data", C.c_uint32),
        ("flags", C.c_uint32),
        ("devid", C.c_uint32),
        ("pad", C.c_uint8 * 12),
    ]


class kvm_irq_routing_irqchip(C.Structure):
    _fields_ = [("irqchip", C.c_uint32), ("pin", C.c_uint32)]


class kvm_irq_routing_msi(C.Structure):
    _fields_ = [
        ("address_lo", C.c_uint32),
        ("address_hi", C.c_uint32),
        ("data", C.c_uint32),
        ("devid", C.c_uint32),
    ]


class _kvm_irq_routing_u(C.Union):
    _fields_ = [
        ("irqchip", kvm_irq_routing_irqchip),
        ("msi", kvm_irq_routing_msi),
        ("pad", C.c_uint32 * 8),
    ]


class kvm_irq_routing_entry(C.Structure):
    _fields_ = [
        ("gsi", C.c_uint32),
        ("type", C.c_uint32),
        ("flags", C.c_uint32),
        ("pad", C.c_uint32),
        ("u", _kvm_irq_routing_u),
    ]


class kvm_irq_routing(C.Structure):
    """Header only; entries follow (flexible array). Use routing_buffer(n)."""

    _fields_ = [("nr", C.c_uint32), ("flags", C.c_uint32)]


KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2


class kvm_enable_cap(C.Structure):
    _fields_ = [
        ("cap", C.c_uint32),
        ("flags", C.c_uint32),
        ("args", C.c_uint64 * 4),
        ("pad", C.c_uint8 * 64),
    ]


class kvm_vcpu_events(C.Structure):
    # Only sized here (64 bytes); fields are read with struct where needed.
    _fields_ = [("raw", C.c_uint8 * 64)]


def _flex(header: type, entry: Any, n: int) -> type:
    return type(
        f"{header.__name__}_{n}",
        (C.Structure,),
        {"_fields_": [("hdr", header), ("entries", entry * n)]},
    )


def msrs_buffer(n: int) -> type:
    return _flex(kvm_msrs, kvm_msr_entry, n)


def cpuid_buffer(n: int) -> type:
    return _flex(kvm_cpuid2, kvm_cpuid_entry2, n)


def routing_buffer(n: int) -> type:
    return _flex(kvm_irq_routing, kvm_irq_routing_entry, n)


# --------------------------------------------------------------------------- struct kvm_run layout
# Parsed with struct.unpack_from on the mmap (cheaper than a ctypes view on the hot path); the offsets are
# checked against offsetof() in C by test_kvmcore_abi.py.
RUN_IMMEDIATE_EXIT = 1
RUN_EXIT_REASON = 8
RUN_IF_FLAG = 13
RUN_UNION = 32
RUN_IO_DIRECTION = 32
RUN_IO_SIZE = 33
RUN_IO_PORT = 34
RUN_IO_COUNT = 36
RUN_IO_DATA_OFFSET = 40
RUN_MMIO_PHYS_ADDR = 32
RUN_MMIO_DATA = 40
RUN_MMIO_LEN = 48
RUN_MMIO_IS_WRITE = 52
RUN_INTERNAL_SUBERROR = 32
RUN_INTERNAL_NDATA = 36
RUN_INTERNAL_DATA = 40
RUN_SYSTEM_EVENT_TYPE = 32
RUN_SYSTEM_EVENT_NDATA = 36
RUN_SYSTEM_EVENT_DATA = 40
RUN_FAIL_ENTRY_REASON = 32
RUN_FAIL_ENTRY_CPU = 40
RUN_EXCEPTION_EXCEPTION = 32
RUN_EXCEPTION_ERROR_CODE = 36

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3

# --------------------------------------------------------------------------- capabilities (KVM_CHECK_EXTENSION)
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MP_STATE = 14
KVM_CAP_READONLY_MEM = 81
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_IOEVENTFD_ANY_LENGTH = 122
KVM_CAP_IMMEDIATE_EXIT = 136

# --------------------------------------------------------------------------- ioctls on the /dev/kvm fd
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, kvm_msr_list)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, kvm_cpuid2)

# --------------------------------------------------------------------------- ioctls on a VM fd
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, C.c_uint64)
KVM_CREATE_IRQCHIP = _io(0x60)  # needs KVM_CAP_IRQCHIP
KVM_IRQ_LINE = _iow(0x61, kvm_irq_level)
KVM_SET_GSI_ROUTING = _iow(0x6A, kvm_irq_routing)  # needs KVM_CAP_IRQ_ROUTING
KVM_IRQFD = _iow(0x76, kvm_irqfd)  # needs KVM_CAP_IRQFD
KVM_CREATE_PIT2 = _iow(0x77, kvm_pit_config)  # needs KVM_CAP_PIT2
KVM_IOEVENTFD = _iow(0x79, kvm_ioeventfd)  # needs KVM_CAP_IOEVENTFD
KVM_ENABLE_CAP = _iow(0xA3, kvm_enable_cap)
KVM_SIGNAL_MSI = _iow(0xA5, kvm_msi)  # needs KVM_CAP_SIGNAL_MSI

# --------------------------------------------------------------------------- ioctls on a vCPU fd
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, kvm_regs)
KVM_SET_REGS = _iow(0x82, kvm_regs)
KVM_GET_SREGS = _ior(0x83, kvm_sregs)
KVM_SET_SREGS = _iow(0x84, kvm_sregs)
KVM_GET_MSRS = _iowr(0x88, kvm_msrs)
KVM_SET_MSRS = _iow(0x89, kvm_msrs)
KVM_GET_FPU = _ior(0x8C, kvm_fpu)
KVM_SET_FPU = _iow(0x8D, kvm_fpu)
KVM_GET_LAPIC = _ior(0x8E, kvm_lapic_state)
KVM_SET_LAPIC = _iow(0x8F, kvm_lapic_state)
KVM_SET_CPUID2 = _iow(0x90, kvm_cpuid2)
KVM_GET_MP_STATE = _ior(0x98, kvm_mp_state)
KVM_SET_MP_STATE = _iow(0x99, kvm_mp_state)
KVM_GET_VCPU_EVENTS = _ior(0x9F, kvm_vcpu_events)

API_VERSION = 12

# Names for error messages: KvmError carries the ioctl's name, found here by number.
IOCTL_NAMES = {v: k for k, v in dict(globals()).items() if k.startswith("KVM_") and isinstance(v, int)
               and (v >> 8) & 0xFF == KVMIO}
