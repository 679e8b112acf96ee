"""kvmcore.kvm against the real /dev/kvm: capabilities, memory slots, a vCPU running a tiny 32-bit program,
register/LAPIC round trips, errors carrying ioctl name and errno, ioeventfd and irqfd registration.

With the in-kernel irqchip a `hlt` blocks inside KVM_RUN instead of exiting, so every guest program here ends with
an `out` to a port the test stops on (then a `jmp .` that is never reached by a test).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from kvmcore import _abi as abi
from kvmcore import exits as ex
from kvmcore import kvm as kvm_mod
from kvmcore import layout, x86
from kvmcore.kvm import Kvm, KvmError, KvmUnavailable, Vcpu, Vm
from kvmcore.memory import GuestMemory

pytestmark = pytest.mark.kvm

ENTRY = 0x10_0000
# mov $0x42,%al; out %al,$0x10; out %al,$0x11; jmp .
PROGRAM = bytes.fromhex("b042" "e610" "e611" "ebfe")


@dataclass
class Guest:
    kvm: Kvm
    vm: Vm
    mem: GuestMemory
    vcpu: Vcpu


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    k = Kvm()
    yield k
    k.close()


def _vm(kvm: Kvm) -> tuple[Vm, GuestMemory]:
    vm = kvm.create_vm()
    # Same order as the daemon's builder: KVM's real-mode helper pages before any vCPU (api.rst KVM_SET_TSS_ADDR).
    vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
    vm.set_tss_addr(layout.KVM_TSS_ADDR)
    vm.create_irqchip()
    mem = GuestMemory.create(layout.ram_layout(16 << 20))
    vm.map_memory(mem)
    return vm, mem


@pytest.fixture
def guest(kvm: Kvm) -> Iterator[Guest]:
    vm, mem = _vm(kvm)
    vcpu = vm.create_vcpu(0)
    x86.setup_common(kvm, vcpu, 1)
    mem.write(ENTRY, PROGRAM)
    x86.setup_multiboot_entry(vcpu, ENTRY, 0)
    yield Guest(kvm, vm, mem, vcpu)
    vm.close()
    mem.close()


def _run_until_io(vcpu: Vcpu, limit: int = 20) -> ex.VcpuExit:
    """KVM_RUN until something other than a spurious interruption comes back."""
    for _ in range(limit):
        e = vcpu.run()
        if not isinstance(e, ex.Interrupted | ex.IrqWindowOpen):
            return e
    raise AssertionError("the vCPU never produced an exit")


# ---------------------------------------------------------------------------------------------- system fd
def test_api_version_is_12(kvm: Kvm) -> None:
    assert kvm.api_version() == 12 == abi.API_VERSION


@pytest.mark.parametrize("cap", ["KVM_CAP_IRQCHIP", "KVM_CAP_IRQFD", "KVM_CAP_IOEVENTFD", "KVM_CAP_USER_MEMORY",
                                 "KVM_CAP_IRQ_ROUTING", "KVM_CAP_IMMEDIATE_EXIT"])
def test_capabilities_kvmdm_needs_are_offered(kvm: Kvm, cap: str) -> None:
    assert kvm.check_extension(getattr(abi, cap)) > 0
    kvm.require(getattr(abi, cap))


def test_unknown_capability_reports_zero(kvm: Kvm) -> None:
    assert kvm.check_extension(0x7FFF_0000) == 0


def test_supported_cpuid_is_non_empty_and_has_leaf_0(kvm: Kvm) -> None:
    entries = kvm.supported_cpuid()
    assert entries
    leaf0 = [e for e in entries if e.function == 0]
    assert leaf0 and leaf0[0].eax >= 1  # highest basic leaf


def _counting_cpuid_ioctls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = kvm_mod._ioctl

    def counting(fd: int, req: int, arg: object = 0) -> int:
        if req == abi.KVM_GET_SUPPORTED_CPUID:
            calls.append(fd)
        return real(fd, req, arg)  # type: ignore[arg-type]

    monkeypatch.setattr(kvm_mod, "_ioctl", counting)
    monkeypatch.setattr(kvm_mod, "_SUPPORTED_CPUID", {})
    return calls


def test_supported_cpuid_is_asked_once_per_kvm_node_and_handed_out_fresh(kvm: Kvm,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting_cpuid_ioctls(monkeypatch)
    first = kvm.supported_cpuid()
    other = Kvm()  # another fd of the same /dev/kvm node (as each DM gets from the daemon)
    try:
        again = other.supported_cpuid()
    finally:
        other.close()
    assert len(calls) == 1
    assert again == first and again is not first and again[0] is not first[0]
    first[0].eax ^= 0xFFFF  # callers edit their entries (x86.guest_cpuid): the next caller must not see it
    assert kvm.supported_cpuid() == again


def test_supported_cpuid_is_asked_again_when_the_node_is_another(kvm: Kvm, monkeypatch: pytest.MonkeyPatch) -> None:
    # Reloading the kvm module makes a new /dev/kvm node: what the old module answered must not be used.
    calls = _counting_cpuid_ioctls(monkeypatch)
    first = kvm.supported_cpuid()
    dev, ino, rdev, ctime = kvm_mod._node_of(kvm.fd)
    monkeypatch.setattr(kvm_mod, "_node_of", lambda fd: (dev, ino, rdev, ctime + 1))
    assert kvm.supported_cpuid() == first
    assert len(calls) == 2


def test_guest_cpuid_says_hypervisor_and_keeps_kvms_signature_leaves(kvm: Kvm) -> None:
    # Linux looks for KVM's 0x4000_0000 leaves (kvm-clock, PV EOI, steal time) only behind CPUID.1:ECX[31].
    supported = {(e.function, e.index) for e in kvm.supported_cpuid()}
    entries = {(e.function, e.index): e for e in x86.guest_cpuid(kvm, 1, 2)}
    leaf1 = entries[(1, 0)]
    assert leaf1.ecx & x86.CPUID_1_ECX_HYPERVISOR
    assert leaf1.ebx >> 24 == 1 and (leaf1.ebx >> 16) & 0xFF == 2  # APIC id, logical processors
    assert set(entries) == supported  # nothing dropped or invented
    if (0x4000_0000, 0) in entries:
        sig = entries[(0x4000_0000, 0)]
        assert sig.ebx.to_bytes(4, "little") + sig.ecx.to_bytes(4, "little") + sig.edx.to_bytes(4, "little") \
            == b"KVMKVMKVM\0\0\0"


def test_vcpu_mmap_size_covers_kvm_run_and_the_pio_page(kvm: Kvm) -> None:
    assert kvm.vcpu_mmap_size() >= 2 * 4096


def test_msr_index_list_contains_sysenter_cs_and_efer_class_msrs(kvm: Kvm) -> None:
    msrs = kvm.msr_index_list()
    assert 0x174 in msrs  # IA32_SYSENTER_CS: in KVM's msrs_to_save on every x86 host
    assert len(msrs) == len(set(msrs)) > 10


def test_missing_device_raises_kvm_unavailable_with_one_line_message() -> None:
    with pytest.raises(KvmUnavailable) as ei:
        Kvm(path="/nonexistent")
    msg = str(ei.value)
    assert "\n" not in msg and "/nonexistent" in msg
    assert ei.value.errno == errno.ENOENT


# ---------------------------------------------------------------------------------------------- running code
def test_tiny_program_exits_with_two_port_writes(guest: Guest) -> None:
    first = _run_until_io(guest.vcpu)
    assert first == ex.IoOut(0x10, 1, 1, b"B")
    second = _run_until_io(guest.vcpu)
    assert second == ex.IoOut(0x11, 1, 1, b"B")
    assert guest.vcpu.get_regs().rip == ENTRY + 6  # just past the second out


def test_io_in_fills_al_from_the_exit_buffer(kvm: Kvm) -> None:
    vm, mem = _vm(kvm)
    try:
        vcpu = vm.create_vcpu(0)
        x86.setup_common(kvm, vcpu, 1)
        # in $0x99,%al; out %al,$0x11; jmp .   (0x99: no in-kernel device; 0x20 would be the in-kernel PIC)
        mem.write(ENTRY, bytes.fromhex("e499" "e611" "ebfe"))
        x86.setup_multiboot_entry(vcpu, ENTRY, 0)
        e = _run_until_io(vcpu)
        assert isinstance(e, ex.IoIn) and (e.port, e.size, e.count) == (0x99, 1, 1)
        e.data[0] = 0x7E
        assert _run_until_io(vcpu) == ex.IoOut(0x11, 1, 1, b"\x7e")
    finally:
        vm.close()
        mem.close()


def test_multiboot_entry_state_is_what_the_spec_promises(guest: Guest) -> None:
    regs = guest.vcpu.get_regs()
    assert (regs.rip, regs.rax, regs.rbx) == (ENTRY, 0x2BADB002, 0)
    sregs = guest.vcpu.get_sregs()
    assert sregs.cr0 & x86.CR0_PE and not sregs.cr0 & x86.CR0_PG
    assert sregs.cs.db == 1 and sregs.cs.base == 0 and sregs.cs.limit == 0xFFFF_FFFF


def test_multiboot_entry_tr_is_the_architectural_reset_state(guest: Guest) -> None:
    # SDM Vol. 3A Table 10-1: TR base 0, limit 0xFFFF, present busy TSS; what a firmware-booted kernel inherits.
    tr = guest.vcpu.get_sregs().tr
    assert (tr.base, tr.limit, tr.present, tr.type) == (0, 0xFFFF, 1, 0xB)


def test_immediate_exit_makes_run_return_interrupted(guest: Guest) -> None:
    guest.vcpu.set_immediate_exit(True)
    assert guest.vcpu.run() == ex.Interrupted()
    guest.vcpu.set_immediate_exit(False)
    assert _run_until_io(guest.vcpu) == ex.IoOut(0x10, 1, 1, b"B")


# ---------------------------------------------------------------------------------------------- state round trips
def test_regs_round_trip(guest: Guest) -> None:
    regs = abi.kvm_regs()
    names = [f[0] for f in abi.kvm_regs._fields_]
    for i, n in enumerate(names):
        setattr(regs, n, 0x1111_0000_0000_0000 + i)
    regs.rflags = 0x2 | (1 << 0)  # CF; bit 1 is always 1
    regs.rip = ENTRY + 2
    guest.vcpu.set_regs(regs)
    got = guest.vcpu.get_regs()
    for n in names:
        assert getattr(got, n) == getattr(regs, n), n


def test_sregs_round_trip(guest: Guest) -> None:
    s = guest.vcpu.get_sregs()
    s.cr2 = 0xDEAD_B000
    guest.vcpu.set_sregs(s)
    assert guest.vcpu.get_sregs().cr2 == 0xDEAD_B000


def test_lapic_round_trip_keeps_all_1024_bytes(guest: Guest) -> None:
    regs = bytearray(guest.vcpu.get_lapic())
    assert len(regs) == 1024
    # The setup recipe programmed LINT0 as ExtINT and LINT1 as NMI (MP spec virtual-wire mode).
    assert (int.from_bytes(regs[x86.APIC_LVT0 : x86.APIC_LVT0 + 4], "little") >> 8) & 7 == x86.APIC_MODE_EXTINT
    assert (int.from_bytes(regs[x86.APIC_LVT1 : x86.APIC_LVT1 + 4], "little") >> 8) & 7 == x86.APIC_MODE_NMI
    regs[0x80:0x84] = (0x20).to_bytes(4, "little")  # TPR
    guest.vcpu.set_lapic(bytes(regs))
    again = guest.vcpu.get_lapic()
    assert len(again) == 1024
    assert again[0x80] == 0x20
    # PPR (0xA0) is derived from TPR by the APIC itself (SDM vol. 3 §11.8.3.1); every other byte is kept as set.
    assert again[0xA0] == 0x20
    assert again[:0xA0] + again[0xA4:] == bytes(regs[:0xA0] + regs[0xA4:])


def test_msrs_round_trip(guest: Guest) -> None:
    got = guest.vcpu.get_msrs([x86.MSR_IA32_MISC_ENABLE])
    assert got[x86.MSR_IA32_MISC_ENABLE] & x86.MISC_ENABLE_FAST_STRING


def test_refused_msr_raises_naming_the_msr(guest: Guest) -> None:
    with pytest.raises(KvmError, match="0x12345678"):
        guest.vcpu.set_msrs({0x1234_5678: 1})


# ---------------------------------------------------------------------------------------------- errors
def test_create_vcpu_with_absurd_index_raises_kvm_error_with_name_and_errno(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    try:
        with pytest.raises(KvmError) as ei:
            vm.create_vcpu(1 << 30)
        assert ei.value.ioctl == "KVM_CREATE_VCPU" and ei.value.errno == errno.EINVAL
        assert "KVM_CREATE_VCPU" in str(ei.value) and "errno 22" in str(ei.value)
        assert vm.vcpus == []
    finally:
        vm.close()


def test_unaligned_memory_slot_raises_einval(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    try:
        with GuestMemory.create([(0, 0x2000)]) as mem:
            host = mem.slots()[0].host_addr
            with pytest.raises(KvmError) as ei:
                vm.set_user_memory_region(0, 0x1001, 0x1000, host)
            assert ei.value.ioctl == "KVM_SET_USER_MEMORY_REGION" and ei.value.errno == errno.EINVAL
    finally:
        vm.close()


# ---------------------------------------------------------------------------------------------- eventfds
def test_pio_ioeventfd_with_datamatch_swallows_the_write_in_the_kernel(guest: Guest) -> None:
    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        guest.vm.ioeventfd(fd, 0x10, 1, pio=True, datamatch=0x42)
        assert _run_until_io(guest.vcpu) == ex.IoOut(0x11, 1, 1, b"B")  # the out to 0x10 never reached us
        assert os.eventfd_read(fd) == 1
    finally:
        guest.vm.ioeventfd(fd, 0x10, 1, pio=True, datamatch=0x42, deassign=True)
        os.close(fd)


def test_pio_ioeventfd_with_other_datamatch_lets_the_write_exit(guest: Guest) -> None:
    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        guest.vm.ioeventfd(fd, 0x10, 1, pio=True, datamatch=0x43)
        assert _run_until_io(guest.vcpu) == ex.IoOut(0x10, 1, 1, b"B")
        with pytest.raises(BlockingIOError):
            os.eventfd_read(fd)
    finally:
        os.close(fd)


def test_deassigning_an_unknown_ioeventfd_is_a_kvm_error(guest: Guest) -> None:
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        with pytest.raises(KvmError) as ei:
            guest.vm.ioeventfd(fd, 0x99, 1, pio=True, deassign=True)
        assert ei.value.ioctl == "KVM_IOEVENTFD"
    finally:
        os.close(fd)


def test_irqfd_on_gsi_4_registers_after_create_irqchip(guest: Guest) -> None:
    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        guest.vm.irqfd(fd, 4)
        os.eventfd_write(fd, 1)  # KVM consumes the count when it injects
        guest.vm.irqfd(fd, 4, deassign=True)
    finally:
        os.close(fd)


def test_irqfd_registered_twice_is_refused(guest: Guest) -> None:
    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        guest.vm.irqfd(fd, 4)
        with pytest.raises(KvmError) as ei:
            guest.vm.irqfd(fd, 4)
        assert ei.value.ioctl == "KVM_IRQFD" and ei.value.errno == errno.EBUSY
    finally:
        guest.vm.irqfd(fd, 4, deassign=True)
        os.close(fd)


def test_close_is_idempotent_and_releases_the_vcpu(kvm: Kvm) -> None:
    vm, mem = _vm(kvm)
    vcpu = vm.create_vcpu(0)
    vm.close()
    assert vcpu.fd == -1 and vm.fd == -1
    vm.close()
    vcpu.close()
    mem.close()


def test_close_while_an_io_in_exit_still_holds_its_buffer_closes_every_fd(kvm: Kvm) -> None:
    # Regression: Vcpu.close() raised BufferError (the exit's view kept kvm_run mapped), leaking vCPU and VM fds.
    vm, mem = _vm(kvm)
    vcpu = vm.create_vcpu(0)
    x86.setup_common(kvm, vcpu, 1)
    mem.write(ENTRY, bytes.fromhex("e499" "ebfe"))  # in $0x99,%al; jmp .
    x86.setup_multiboot_entry(vcpu, ENTRY, 0)
    pending = _run_until_io(vcpu)
    assert isinstance(pending, ex.IoIn)
    vcpu_fd, vm_fd = vcpu.fd, vm.fd
    vm.close()
    mem.close()
    assert vcpu.fd == -1 and vm.fd == -1
    for fd in (vcpu_fd, vm_fd):
        with pytest.raises(OSError):
            os.fstat(fd)
    pending.data[0] = 1  # still mapped until the exit goes away: writing is safe, not a use-after-unmap


# ---------------------------------------------------------------------------------------------- the vCPU thread
def test_vcpu_thread_pauses_a_spinning_guest_and_stops_on_request(kvm: Kvm) -> None:
    import signal
    import threading
    import time

    from devices.bus import pio_bus
    from kvmcore.vcpu_loop import KICK_SIGNAL, StopReason, VcpuThread, VmRunState, install_kick_handler

    old_handler = signal.getsignal(KICK_SIGNAL)
    install_kick_handler()
    vm, mem = _vm(kvm)
    try:
        vcpu = vm.create_vcpu(0)
        x86.setup_common(kvm, vcpu, 1)
        mem.write(ENTRY, bytes.fromhex("e610" "ebfe"))  # out %al,$0x10; jmp .  (spins inside KVM_RUN)
        x86.setup_multiboot_entry(vcpu, ENTRY, 0)
        pio, mmio = pio_bus(), pio_bus()
        state = VmRunState()
        t = VcpuThread(vcpu, pio, mmio, state, threading.Lock())
        state.threads.append(t)
        t.start()
        deadline = time.monotonic() + 10
        while pio.stats.unclaimed_writes == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert pio.stats.unclaimed_writes == 1  # the out reached the (empty) bus; the guest now spins
        # The only way out of `jmp .` is a kick: immediate_exit + signal -> EINTR -> park.
        assert state.pause(timeout=10) is True
        state.resume()
        state.request_stop(StopReason("host", "test over"))
        t.join(10)
        assert not t.is_alive()
        assert state.stop_reason == StopReason("host", "test over")
        counts = t.exit_counts()  # includes exits the C fast path answered
        assert counts["IoOut"] == 1 and counts["Interrupted"] >= 1
    finally:
        vm.close()
        mem.close()
        signal.signal(KICK_SIGNAL, old_handler)
