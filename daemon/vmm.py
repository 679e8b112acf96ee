"""The one recipe that turns a validated machine description into a running VM (Firecracker's builder.rs).

Independent ``attach_*`` steps on top of the KVM core: memory, irqchip + PIT, the platform devices on the
port-I/O and MMIO buses, the PCI root, virtio devices, the kernel, the vCPUs. Used by the per-guest
device-model process (daemon.dm) and by the one-shot runner (daemon.runner). Imports no web framework.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from daemon.firmware_boot import FirmwareBoot
from devices.acpi_pm import AcpiPm
from devices.bus import Bus, BusDevice, mmio_bus, pio_bus
from devices.debug_exit import DebugExit
from devices.i8042 import I8042
from devices.irq import EventFdTrigger
from devices.pci import PciConfigIo, PciRoot, assign_bars
from devices.rtc import REG_CENTURY, Rtc
from devices.serial import Serial, SerialSink
from devices.testdev import TestDevIoport, TestDevMmio
from kvmcore import _abi as abi
from kvmcore import fastrun, layout, x86
from kvmcore.acpi import AcpiPlatform, build_tables
from kvmcore.kvm import IrqchipRoute, Kvm, MsiRoute, Vm
from kvmcore.loader.linux import load_linux
from kvmcore.loader.multiboot import load_multiboot
from kvmcore.memory import GuestMemory
from kvmcore.vcpu_loop import KICK_SIGNAL, StopReason, VcpuThread, VmRunState, install_kick_handler
from pv.device import VirtioDevice

if TYPE_CHECKING:
    from devices.virtio_pci import VirtioPciDevice

log = logging.getLogger(__name__)

# The port map and interrupt wiring live in kvmcore.layout, which the ACPI tables describe too.
COM1_PORT, COM1_GSI = layout.COM1_PORT, layout.COM1_IRQ
I8042_PORT = layout.I8042_PORT
RTC_PORT = layout.RTC_PORT
DEBUG_EXIT_PORT = layout.DEBUG_EXIT_PORT
TESTDEV_PORT = layout.TESTDEV_PORT
PCI_CONFIG_PORT = layout.PCI_CONFIG_PORT
PCI_INTX_GSI_BASE = layout.PCI_INTX_GSI_BASE  # IOAPIC pins 16..23 are free for PCI INTx
FIRST_MSI_GSI = layout.IOAPIC_PINS


@dataclass
class MachineConfig:
    mem_size: int
    vcpus: int = 1
    kernel: bytes = b""
    cmdline: str = ""
    initrd: bytes | None = None
    testdev: bool = True  # QEMU pc-testdev compatible scratch device (used by the test guests)
    acpi: bool = True  # ACPI tables at layout.ACPI_TABLES_ADDR and the ACPI PM block (direct boot)
    # A BIOS image (kvmcore.firmware.check_bios): the guest boots it from the reset vector instead of a kernel,
    # with fw_cfg, shadow RAM behind the PAM registers and the debug port (daemon.firmware_boot).
    firmware: bytes | None = None
    # Boot order for the firmware: (kind "disk" | "net", index into the virtio devices in attach order).
    boot_order: tuple[tuple[str, int], ...] = ()
    option_roms: dict[str, bytes] = field(default_factory=dict)  # fw_cfg genroms/<name>
    pci_roms: dict[tuple[int, int], bytes] = field(default_factory=dict)  # (vendor, device) -> option ROM


class KernelFormatError(Exception):
    """The kernel image is neither a multiboot ELF nor a Linux bzImage."""


def detect_kernel_format(image: bytes) -> str:
    if image[:4] == b"\x7fELF":
        return "multiboot"
    if len(image) > 0x206 and image[0x202:0x206] == b"HdrS":
        return "linux"
    raise KernelFormatError("kernel image is neither an ELF (multiboot) nor a Linux bzImage")


class _Routing:
    """The VM's GSI routing table. KVM_SET_GSI_ROUTING replaces the whole table, so keep all of it here."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.msi: dict[int, tuple[int, int]] = {}
        self.next_gsi = FIRST_MSI_GSI

    def _defaults(self) -> list[IrqchipRoute | MsiRoute]:
        # What KVM_CREATE_IRQCHIP installs: GSI 0-15 on both PICs and the IOAPIC, 16-23 on the IOAPIC only.
        routes: list[IrqchipRoute | MsiRoute] = []
        for gsi in range(24):
            if gsi < 16:
                chip = abi.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else abi.KVM_IRQCHIP_PIC_SLAVE
                if gsi != 2:
                    routes.append(IrqchipRoute(gsi, chip, gsi % 8))
            routes.append(IrqchipRoute(gsi, abi.KVM_IRQCHIP_IOAPIC, 2 if gsi == 0 else gsi))
        return routes

    def set_msi(self, gsi: int, address: int, data: int) -> None:
        self.msi[gsi] = (address, data)
        self.vm.set_gsi_routing(self._defaults() + [MsiRoute(g, a, d) for g, (a, d) in self.msi.items()])

    def allocate(self) -> int:
        gsi = self.next_gsi
        self.next_gsi += 1
        return gsi


class _PciPlatformAdapter:
    """devices.pci.PciPlatform for one device, on top of the VMM's buses and VM fd."""

    def __init__(self, vmm: Vmm, intx_gsi: int) -> None:
        self.vmm = vmm
        self.intx_gsi = intx_gsi

    def map_mmio(self, device: BusDevice, addr: int, size: int) -> None:
        self.vmm.mmio.insert(device, addr, size)

    def unmap_mmio(self, addr: int) -> None:
        self.vmm.mmio.remove(addr)

    def map_pio(self, device: BusDevice, port: int, size: int) -> None:
        self.vmm.pio.insert(device, port, size)

    def unmap_pio(self, port: int) -> None:
        self.vmm.pio.remove(port)

    def register_ioeventfd(self, addr: int, length: int, datamatch: int | None, fd: int) -> None:
        self.vmm.vm.ioeventfd(fd, addr, length, pio=False, datamatch=datamatch)

    def unregister_ioeventfd(self, addr: int, length: int, datamatch: int | None, fd: int) -> None:
        self.vmm.vm.ioeventfd(fd, addr, length, pio=False, datamatch=datamatch, deassign=True)

    def set_msi_route(self, gsi: int, address: int, data: int, masked: bool) -> None:
        self.vmm.routing.set_msi(gsi, address, data)

    def allocate_gsi(self) -> int:
        return self.vmm.routing.allocate()

    def irqfd(self, gsi: int, fd: int, register: bool) -> None:
        self.vmm.vm.irqfd(fd, gsi, deassign=not register)

    def intx(self, level: bool) -> None:
        self.vmm.vm.irq_line(self.intx_gsi, 1 if level else 0)


class _TxPump:
    """Empties the UART's C TX ring into its sink when the C loop signals (notify_fd) that bytes wait there: a
    guest may print and then idle in KVM_RUN (HLT is in-kernel), never returning to the vCPU loop that also
    flushes. It waits BATCH_S after a wake-up so a stream of bytes costs one wake-up per batch, not per byte."""

    BATCH_S = 0.001

    def __init__(self, serial: Serial, lock: threading.Lock, notify_fd: int) -> None:
        self._serial = serial
        self._lock = lock
        self._notify = notify_fd
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name="serial-tx", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._notify, select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        while True:
            fds = [fd for fd, _ev in poller.poll()]
            if self._stop_fd in fds:
                break
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._notify)
            time.sleep(self.BATCH_S)
            with self._lock:
                self._serial.flush_tx()
        with self._lock:  # what the last vCPU exits left in the ring
            self._serial.flush_tx()

    def stop(self) -> None:
        if self._thread.is_alive():
            os.eventfd_write(self._stop_fd, 1)
            self._thread.join(timeout=5)
        else:
            with self._lock:
                self._serial.flush_tx()
        os.close(self._stop_fd)


class Vmm:
    """A VM being assembled, then run. Call the attach_* steps (or build()), then start(), wait(), close()."""

    def __init__(self, cfg: MachineConfig, *, kvm: Kvm | None = None, serial_sink: SerialSink | None = None,
                 mem: GuestMemory | None = None) -> None:
        self.cfg = cfg
        self._owns_kvm = kvm is None  # a /dev/kvm fd we opened is ours to close (kvmdm run builds one VM per boot)
        self.kvm = kvm or Kvm()
        self.vm = self.kvm.create_vm()
        self.mem: GuestMemory | None = mem  # pre-created by a caller that must allocate before its jail
        self.pio: Bus = pio_bus()
        self.mmio: Bus = mmio_bus()
        self.state = VmRunState()
        self.device_lock = threading.Lock()
        self.serial_sink = serial_sink
        self.serial: Serial | None = None
        self.pci_root: PciRoot | None = None
        self.acpi_pm: AcpiPm | None = None
        self.acpi_rsdp: int | None = None  # where attach_acpi put the RSDP
        self.routing = _Routing(self.vm)
        self._fds: list[int] = []
        # Set by attach_kernel: which boot protocol's entry state vCPU 0 gets, and its (entry, info address).
        self._entry_kind = ""
        self._entry_args: tuple[int, int] = (0, 0)
        self.started_at: float | None = None
        self.virtio_devices: list[VirtioPciDevice] = []
        self.device_alerts: list[str] = []
        self.on_device_alert: Callable[[str], None] | None = None
        self.firmware: FirmwareBoot | None = None  # set by attach_memory when cfg.firmware is given
        self.firmware_log_sink: SerialSink | None = None  # where the BIOS debug port (0x402) writes
        self._tx_pump: _TxPump | None = None

    # ------------------------------------------------------------------ steps
    def attach_memory(self) -> None:
        if self.mem is None:
            self.mem = GuestMemory.create(layout.ram_layout(self.cfg.mem_size))
        if self.cfg.firmware is not None:
            self.kvm.require(abi.KVM_CAP_READONLY_MEM)
            self.firmware = FirmwareBoot(self.vm, self.mem, self.cfg.firmware, self.mmio)
        else:
            self.vm.map_memory(self.mem)

    def attach_irqchip(self) -> None:
        self.kvm.require(abi.KVM_CAP_IRQCHIP, abi.KVM_CAP_IRQFD, abi.KVM_CAP_IOEVENTFD, abi.KVM_CAP_IRQ_ROUTING)
        # Where KVM's real-mode helpers live must be set before vCPUs exist (api.rst KVM_SET_TSS_ADDR).
        self.vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        self.vm.set_tss_addr(layout.KVM_TSS_ADDR)
        self.vm.create_irqchip()
        self.vm.create_pit2()

    def _eventfd_irq(self, gsi: int) -> EventFdTrigger:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._fds.append(fd)
        self.vm.irqfd(fd, gsi)
        return EventFdTrigger(fd)

    def attach_platform_devices(self) -> None:
        irq = self._eventfd_irq(COM1_GSI)
        self.serial = Serial(irq, self.serial_sink)
        if fastrun.AVAILABLE:
            # The UART's C half answers LSR polls and THR writes in the vCPU's C loop (devices/serial.py says
            # which); its TX ring is drained into the sink by the vCPU loop and, while the guest stays in
            # KVM_RUN, by a pump thread woken through this eventfd.
            notify = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._fds.append(notify)
            self.serial.attach_accel(fastrun.UartAccel(irq.fd, notify))
            self._tx_pump = _TxPump(self.serial, self.device_lock, notify)
        self.pio.insert(self.serial, COM1_PORT, 8)
        self.pio.insert(I8042(on_reset=lambda: self._guest_reset("i8042")), I8042_PORT, 5)
        rtc = Rtc()
        below = min(self.cfg.mem_size, layout.LOW_RAM_END)
        rtc.set_memory_size(below, self.cfg.mem_size - below, self.cfg.vcpus)
        self.pio.insert(rtc, RTC_PORT, 2)
        self.pio.insert(DebugExit(on_exit=self._debug_exit), DEBUG_EXIT_PORT, 1)
        if self.cfg.testdev:
            self.pio.insert(TestDevIoport(), TESTDEV_PORT, 4)
            self.mmio.insert(TestDevMmio(), layout.TESTDEV_MMIO_BASE, layout.TESTDEV_MMIO_SIZE)

    def _debug_exit(self, status: int) -> None:
        self.state.request_stop(StopReason("poweroff", f"guest exited through debug-exit with status {status}",
                                           guest_status=status))

    def attach_pci(self) -> None:
        self.pci_root = PciRoot(self.firmware.host_bridge() if self.firmware is not None else None)
        if fastrun.AVAILABLE:  # config mechanism #1 answered in C where no device traps it (devices/pci/root.py)
            self.pci_root.attach_accel(fastrun.PciConfigAccel())
        self.pio.insert(PciConfigIo(self.pci_root, on_reset=lambda: self._guest_reset("port 0xcf9")),
                        PCI_CONFIG_PORT, 8)

    def _guest_reset(self, source: str) -> None:
        """A reset the guest asked for: a reboot, unless the BIOS asks for it because nothing in the boot order
        booted (daemon.firmware_boot.BOOT_FAILURE_LINE): then the guest ends as a crash with that reason, and
        whether to try again is the restart policy's call (``kvmdm run`` exits 4)."""
        if self.firmware is not None and self.firmware.boot_failed:
            self.state.request_stop(StopReason("crash", f"no bootable device: the BIOS found nothing to boot in "
                                                        f"the boot order and reset ({source})"))
            return
        self.state.request_stop(StopReason("reset", f"guest requested reset ({source})"))

    def acpi_platform(self) -> AcpiPlatform:
        """What the ACPI tables describe: this VM's vCPUs on kvmdm's fixed platform (kvmcore.layout). No 64-bit
        PCI window: finish() places 64-bit BARs below 4 GiB, and a window at layout.PCI_MMIO64_START lies beyond
        the physical address width of many CPUs (Linux: "host bridge window ... ignored, not CPU addressable")."""
        if self.firmware is not None:
            # The firmware places BARs from the end of low RAM up (SeaBIOS pciinit); the window must hold them.
            low_end = min(self.cfg.mem_size, layout.LOW_RAM_END)
            return AcpiPlatform(vcpus=self.cfg.vcpus, rtc_century=REG_CENTURY, pci_mmio64=None,
                                pci_mmio32=(low_end, layout.PCI_MMIO32_END))
        return AcpiPlatform(vcpus=self.cfg.vcpus, rtc_century=REG_CENTURY, pci_mmio64=None)

    def attach_acpi(self) -> None:
        """The ACPI PM block on the port bus (SCI on its ISA IRQ through an irqfd) and the tables in guest RAM at
        layout.ACPI_TABLES_ADDR, RSDP first: found there by the BIOS-area scan and through boot_params."""
        assert self.mem is not None
        tables = build_tables(self.acpi_platform())
        if self.firmware is not None:
            self.firmware.acpi_files = tables.table_loader()  # the firmware runs the table loader
        else:
            blob = tables.place(layout.ACPI_TABLES_ADDR)
            if layout.ACPI_TABLES_ADDR + len(blob) > layout.ACPI_TABLES_END:
                raise ValueError(f"ACPI tables ({len(blob)} bytes) do not fit below 1 MiB")
            self.mem.write(layout.ACPI_TABLES_ADDR, blob)
            self.acpi_rsdp = layout.ACPI_TABLES_ADDR
        self.acpi_pm = AcpiPm(on_poweroff=lambda: self.state.request_stop(
            StopReason("poweroff", "guest powered off (ACPI S5)")), sci=self._eventfd_irq(layout.ACPI_SCI_IRQ))
        self.pio.insert(self.acpi_pm, layout.ACPI_PM_BASE, layout.ACPI_PM_LENGTH)

    def power_button(self) -> bool:
        """Press the ACPI power button (an SCI if the guest enabled it); False when the VM has no ACPI."""
        if self.acpi_pm is None:
            return False
        with self.device_lock:
            self.acpi_pm.power_button()
        return True

    def attach_virtio(self, device: VirtioDevice) -> VirtioPciDevice:
        """Put a pv.device.VirtioDevice behind a virtio-pci function on the root bus."""
        from devices.virtio_pci import VirtioPciDevice

        assert self.pci_root is not None and self.mem is not None
        platform = _PciPlatformAdapter(self, intx_gsi=-1)
        dev = VirtioPciDevice(device, self.mem, platform)
        slot = self.pci_root.add_device(dev)
        # INTA# of slot N on IOAPIC pin 16 + N % 8 (the DSDT's _PRT says the same); the interrupt line register
        # says so, as firmware would.
        platform.intx_gsi = layout.pci_intx_gsi(slot, 0)
        dev.config.write(0x3C, bytes([platform.intx_gsi]))
        label = f"{type(device).__name__} (PCI slot {slot})"
        dev.on_needs_reset = lambda why: self._device_alert(f"{label} needs reset: {why}")
        self.virtio_devices.append(dev)
        return dev

    def _device_alert(self, message: str) -> None:
        self.device_alerts.append(message)
        if self.on_device_alert is not None:
            self.on_device_alert(message)

    def attach_kernel(self) -> None:
        assert self.mem is not None
        if self.firmware is not None:
            return  # the BIOS boots from the reset vector: KVM's vCPU reset state (CS base 0xFFFF0000, IP 0xFFF0)
        kind = detect_kernel_format(self.cfg.kernel)
        if kind == "multiboot":
            k = load_multiboot(self.mem, self.cfg.kernel, self.cfg.cmdline)
            self._entry_kind, self._entry_args = "multiboot", (k.entry, k.mbi_addr)
        else:
            lk = load_linux(self.mem, self.cfg.kernel, self.cfg.cmdline, self.cfg.initrd, acpi_rsdp=self.acpi_rsdp)
            self._entry_kind, self._entry_args = "linux", (lk.entry64, lk.boot_params)

    def attach_vcpus(self) -> None:
        assert self.mem is not None
        for i in range(self.cfg.vcpus):
            vcpu = self.vm.create_vcpu(i)
            x86.setup_common(self.kvm, vcpu, self.cfg.vcpus)
            if i == 0 and self.firmware is None:
                if self._entry_kind == "multiboot":
                    x86.setup_multiboot_entry(vcpu, *self._entry_args)
                else:
                    x86.setup_linux64_entry(vcpu, self.mem, *self._entry_args)
            # Application processors stay in wait-for-SIPI, as on real hardware (KVM's default mp_state).
            t = VcpuThread(vcpu, self.pio, self.mmio, self.state, self.device_lock)
            self.state.threads.append(t)

    def build(self) -> Vmm:
        self.attach_memory()
        self.attach_irqchip()
        self.attach_platform_devices()
        self.attach_pci()
        if self.cfg.acpi:
            self.attach_acpi()
        self.attach_kernel()
        return self

    def finish(self) -> None:
        """After every device is attached: place PCI BARs (unless firmware does), the firmware's fw_cfg, vCPUs."""
        if self.firmware is not None:
            assert self.pci_root is not None
            slots = {id(dev): slot for slot, dev in self.pci_root.devices()}
            boot = [(kind, slots[id(self.virtio_devices[i])]) for kind, i in self.cfg.boot_order]
            self.firmware.attach_io(self.pio, vcpus=self.cfg.vcpus, boot=boot, option_roms=self.cfg.option_roms,
                                    pci_roms=self.cfg.pci_roms, log_sink=self.firmware_log_sink)
        elif self.pci_root is not None and self.virtio_devices:
            assign_bars(self.pci_root)
        self.attach_vcpus()

    # ------------------------------------------------------------------ running
    def start(self) -> None:
        if threading.current_thread() is threading.main_thread():
            install_kick_handler()
        elif signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
            raise RuntimeError("call kvmcore.vcpu_loop.install_kick_handler() from the main thread first")
        self.started_at = time.monotonic()
        if self._tx_pump is not None:
            self._tx_pump.start()
        for t in self.state.threads:
            t.start()

    def wait(self, timeout: float | None = None) -> StopReason | None:
        return self.state.wait(timeout)

    def stop(self, reason: StopReason | None = None) -> None:
        self.state.request_stop(reason or StopReason("host", "stopped by the host"))
        for t in self.state.threads:
            t.join(timeout=5)
        self._stop_tx_pump()

    def _stop_tx_pump(self) -> None:
        if self._tx_pump is not None:
            self._tx_pump.stop()
            self._tx_pump = None

    def pause(self) -> bool:
        return self.state.pause()

    def resume(self) -> None:
        self.state.resume()

    def serial_input(self, data: bytes) -> int:
        """Feed console input; returns how many bytes the UART took (the rest must be retried)."""
        if self.serial is None:
            return 0
        with self.device_lock:
            return self.serial.enqueue_input(data)

    def exit_counts(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for t in self.state.threads:
            total.update(t.exit_counts())
        return total

    def close(self) -> None:
        if any(t.is_alive() for t in self.state.threads):
            self.stop()
        stuck = [t.name for t in self.state.threads if t.is_alive()]
        if stuck:
            # Closing the vCPU fds under a running KVM_RUN would let the fd numbers be reused under it: keep the VM
            # (a leak in a process that is going away anyway) rather than risk running someone else's vCPU.
            log.error("vCPU threads %s did not stop within 5 s; leaving the VM open", ", ".join(stuck))
            return
        self._stop_tx_pump()
        for dev in self.virtio_devices:
            dev.close()
        self.vm.close()
        if self._owns_kvm:
            self.kvm.close()
        if self.firmware is not None:
            self.firmware.close()
        if self.mem is not None:
            self.mem.close()
        for fd in self._fds:
            os.close(fd)
        self._fds = []
