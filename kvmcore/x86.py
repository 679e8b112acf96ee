"""x86 vCPU state recipes: the machine state a boot protocol promises at the kernel's entry point.

Multiboot v1 (§3.2 "Machine state"): 32-bit protected mode, flat 4 GiB code/data segments, paging off,
EAX = 0x2BADB002, EBX = physical address of the multiboot information structure.
Linux 64-bit boot protocol (Documentation/arch/x86/boot.rst, "64-bit BOOT PROTOCOL"): long mode, paging on with
an identity map covering the kernel, boot_params and cmdline, __BOOT_CS/__BOOT_DS flat segments, RSI = boot_params.
"""

from __future__ import annotations

import struct

from kvmcore import _abi as abi
from kvmcore.kvm import CpuidEntry, Kvm, Vcpu
from kvmcore.memory import GuestMemory

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

MSR_IA32_APICBASE = 0x1B
MSR_IA32_MISC_ENABLE = 0x1A0
MISC_ENABLE_FAST_STRING = 1
MSR_MTRR_DEF_TYPE = 0x2FF
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WB = 6

APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_EXTINT = 0x7
APIC_MODE_NMI = 0x4


def _segment(selector: int, *, code: bool, long: bool = False) -> abi.kvm_segment:
    s = abi.kvm_segment()
    s.base = 0
    s.limit = 0xFFFF_FFFF
    s.selector = selector
    s.type = 0xB if code else 0x3  # execute/read accessed; read/write accessed
    s.present = 1
    s.dpl = 0
    s.db = 0 if long else 1
    s.s = 1
    s.l = 1 if long else 0
    s.g = 1
    return s


TR_RESET_LIMIT = 0xFFFF


def _system_segments(sregs: abi.kvm_sregs) -> None:
    # VMX requires a usable TR and a valid LDTR at entry even when the guest never uses them. TR gets its
    # architectural reset state (SDM Vol. 3A 10.1.1, Table 10-1: base 0, limit 0xFFFF), which is what a kernel
    # booted by firmware (QEMU's SeaBIOS + multiboot ROM) inherits, since no boot loader loads TR. The limit is
    # not cosmetic: kvm_pvm emulates CPL3 IN/OUT and raises #GP when port / 8 exceeds TR's limit, even at IOPL=3
    # and whatever the bitmap holds (measured: limit 0x9F faults port 0x501, 0xA0 passes), so a guest that never
    # loads TR triple-faulted on ports >= 0x340 with a 104-byte limit (issue 9, tests/guests/bare_iopl.S).
    tr = abi.kvm_segment()
    tr.limit = TR_RESET_LIMIT
    tr.type = 0xB  # 32/64-bit busy TSS
    tr.present = 1
    tr.selector = 0
    sregs.tr = tr
    ldt = abi.kvm_segment()
    ldt.type = 0x2
    ldt.present = 1
    ldt.unusable = 1
    sregs.ldt = ldt


def setup_fpu(vcpu: Vcpu) -> None:
    fpu = abi.kvm_fpu()
    fpu.fcw = 0x37F  # x87 reset value
    fpu.mxcsr = 0x1F80  # all SSE exceptions masked
    vcpu.set_fpu(fpu)


def setup_lapic(vcpu: Vcpu) -> None:
    """LINT0 as ExtINT (so the 8259 reaches the BSP) and LINT1 as NMI, as the MP spec's virtual-wire mode expects."""
    regs = bytearray(vcpu.get_lapic())
    for off, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        v = struct.unpack_from("<I", regs, off)[0]
        v = (v & ~0x700 & ~(1 << 16)) | (mode << 8)
        struct.pack_into("<I", regs, off, v)
    vcpu.set_lapic(bytes(regs))


CPUID_1_ECX_HYPERVISOR = 1 << 31


def guest_cpuid(kvm: Kvm, vcpu_index: int, ncpus: int) -> list[CpuidEntry]:
    """What the host KVM supports, with per-vCPU topology fields filled in."""
    entries = kvm.supported_cpuid()
    for e in entries:
        if e.function == 1:
            # EBX[31:24] initial APIC id, EBX[23:16] logical processor count.
            e.ebx = (e.ebx & 0x0000_FFFF) | (vcpu_index << 24) | (max(ncpus, 1) << 16)
            if ncpus > 1:
                e.edx |= 1 << 28  # HTT: the count above is meaningful
            # KVM does not report the hypervisor bit as supported; QEMU and Firecracker set it. Without it Linux
            # never reads KVM's 0x4000_0000 leaves: "Booting paravirtualized kernel on bare hardware", no
            # kvm-clock, and the TSC calibrated against a PIT/PM timer that a VM exit makes unreliable.
            e.ecx |= CPUID_1_ECX_HYPERVISOR
        elif e.function == 0xB:
            e.edx = vcpu_index  # x2APIC id
    return entries


def setup_common(kvm: Kvm, vcpu: Vcpu, ncpus: int) -> None:
    vcpu.set_cpuid2(guest_cpuid(kvm, vcpu.index, ncpus))
    # MTRRs enabled with write-back as the default type, as firmware leaves them (and as Firecracker sets them):
    # with MTRRs disabled every guest access would be uncacheable, which no real guest is ever booted with.
    vcpu.set_msrs({MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING, MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_TYPE_WB})
    setup_fpu(vcpu)
    setup_lapic(vcpu)


def setup_multiboot_entry(vcpu: Vcpu, entry: int, mbi_addr: int) -> None:
    """Multiboot v1 machine state (spec §3.2)."""
    sregs = vcpu.get_sregs()
    sregs.cs = _segment(0x10, code=True)
    data = _segment(0x18, code=False)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    _system_segments(sregs)
    sregs.cr0 = CR0_PE | CR0_ET
    sregs.cr4 = 0
    sregs.efer = 0
    vcpu.set_sregs(sregs)
    regs = abi.kvm_regs()
    regs.rip = entry
    regs.rflags = 0x2
    regs.rax = 0x2BADB002
    regs.rbx = mbi_addr
    vcpu.set_regs(regs)


# --- Linux 64-bit entry ------------------------------------------------------------------------------------------
# Where the loader puts the boot-time GDT and identity-mapping page tables (low RAM, below the EBDA, above
# the zero page and the command line; see kvmcore.loader.linux for the rest of that map).
BOOT_GDT_ADDR = 0x500
BOOT_PML4_ADDR = 0x9000
BOOT_PDPTE_ADDR = 0xA000
BOOT_PDE_ADDR = 0xB000  # 4 pages: 4 x 512 x 2 MiB = the first 4 GiB


def write_boot_gdt(mem: GuestMemory) -> None:
    gdt = [
        0,  # null
        0,  # unused
        0x00AF9B000000FFFF,  # 0x10 __BOOT_CS: 64-bit code
        0x00CF93000000FFFF,  # 0x18 __BOOT_DS: data
    ]
    mem.write(BOOT_GDT_ADDR, struct.pack("<4Q", *gdt))


def write_identity_page_tables(mem: GuestMemory) -> None:
    """Identity-map 0..4 GiB with 2 MiB pages (the 64-bit protocol's 'ident mapping' requirement)."""
    mem.write_u64(BOOT_PML4_ADDR, BOOT_PDPTE_ADDR | 0x3)
    for i in range(4):
        mem.write_u64(BOOT_PDPTE_ADDR + i * 8, (BOOT_PDE_ADDR + i * 0x1000) | 0x3)
    pdes = struct.pack("<2048Q", *[(i << 21) | 0x83 for i in range(2048)])
    mem.write(BOOT_PDE_ADDR, pdes)


def setup_linux64_entry(vcpu: Vcpu, mem: GuestMemory, entry: int, boot_params: int) -> None:
    write_boot_gdt(mem)
    write_identity_page_tables(mem)
    sregs = vcpu.get_sregs()
    sregs.gdt.base = BOOT_GDT_ADDR
    sregs.gdt.limit = 4 * 8 - 1
    sregs.idt.base = 0
    sregs.idt.limit = 0
    sregs.cs = _segment(0x10, code=True, long=True)
    data = _segment(0x18, code=False)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    _system_segments(sregs)
    sregs.cr3 = BOOT_PML4_ADDR
    sregs.cr4 = CR4_PAE
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG
    sregs.efer = EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)
    regs = abi.kvm_regs()
    regs.rip = entry
    regs.rsi = boot_params
    regs.rflags = 0x2
    vcpu.set_regs(regs)
