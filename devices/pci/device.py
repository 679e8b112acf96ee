"""The PCI function base class and the platform services a VMM provides to it.

A ``PciDevice`` owns a ``PciConfiguration``. After every config write it recomputes where each BAR is decoded
(address programmed AND the command register's memory/I/O enable set, §6.2.2) and, when that changed, unmaps the
old range, maps the new one through the injected ``PciPlatform`` and calls ``on_bar_moved`` so subclasses can
move what hangs off the BAR (ioeventfds). Guests may place BARs anywhere, including on top of each other or of
RAM; a placement the platform refuses (``devices.bus.BusError``) leaves the BAR undecoded and is counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from devices.bus import BusDevice, BusError
from devices.pci.config import (
    BAR0,
    COMMAND,
    NUM_BARS,
    BarSpec,
    BarType,
    PciConfiguration,
)
from devices.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)


class PciPlatform(Protocol):
    """What the VMM does for a PCI device. One instance per device: ``intx`` drives *this* device's INTx line.

    map_mmio/map_pio may raise devices.bus.BusError when the range cannot be placed; the other methods may raise
    OSError (a failed ioctl). Neither is a guest error the device could prevent, so devices count and log them.
    """

    def map_mmio(self, device: BusDevice, addr: int, size: int) -> None:
        """Route guest MMIO [addr, addr+size) to device (offsets relative to addr)."""

    def unmap_mmio(self, addr: int) -> None:
        """Remove the MMIO range previously mapped at addr."""

    def map_pio(self, device: BusDevice, port: int, size: int) -> None:
        """Route guest port I/O [port, port+size) to device (I/O BARs)."""

    def unmap_pio(self, port: int) -> None:
        """Remove the port range previously mapped at port."""

    def register_ioeventfd(self, addr: int, length: int, datamatch: int | None, fd: int) -> None:
        """KVM_IOEVENTFD on MMIO addr; length 0 = any access size (KVM_CAP_IOEVENTFD_ANY_LENGTH)."""

    def unregister_ioeventfd(self, addr: int, length: int, datamatch: int | None, fd: int) -> None:
        """KVM_IOEVENTFD with KVM_IOEVENTFD_FLAG_DEASSIGN, same arguments as the registration."""

    def set_msi_route(self, gsi: int, address: int, data: int, masked: bool) -> None:
        """Program GSI routing entry gsi as an MSI (address, data). ``masked`` is informational: the MSI-X code
        detaches irqfds of masked vectors itself, so the route may be programmed regardless."""

    def allocate_gsi(self) -> int:
        """A fresh GSI number for an MSI route (never one of the IOAPIC pins)."""
        ...

    def irqfd(self, gsi: int, fd: int, register: bool) -> None:
        """KVM_IRQFD: attach (register=True) or detach eventfd fd to/from gsi."""

    def intx(self, level: bool) -> None:
        """Drive this device's INTx line (level-triggered, active while True)."""


class _BarRegion(BusDevice):
    """The bus-side face of one BAR: forwards (offset, data) to the device with the BAR index."""

    def __init__(self, dev: PciDevice, bar: int) -> None:
        self.dev = dev
        self.bar = bar

    def read(self, offset: int, data: memoryview) -> None:
        self.dev.bar_read(self.bar, offset, data)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.dev.bar_write(self.bar, offset, data)


@dataclass
class PciDeviceStats:
    bar_moves: int = 0
    bar_map_failures: int = 0


class PciDevice:
    """Base of every PCI function. Subclasses implement bar_read/bar_write and may override on_bar_moved,
    read_config/write_config (calling super) for capability side effects."""

    def __init__(self, config: PciConfiguration, platform: PciPlatform | None = None) -> None:
        self.config = config
        self.platform = platform
        self.pci_stats = PciDeviceStats()
        self._mapped: dict[int, int] = {}  # bar index -> decoded base address
        self._regions: dict[int, _BarRegion] = {}
        self._intx_level = False
        self._intx_out = False
        self._pci_log = RateLimitedLog(log, per_second=5)

    # ------------------------------------------------------------------ config space
    def read_config(self, offset: int, data: memoryview) -> None:
        self.config.read_into(offset, data)

    def write_config(self, offset: int, data: bytes | memoryview) -> None:
        if not self.config.write(offset, data):
            return
        dword = offset // 4
        if dword == COMMAND // 4 or BAR0 // 4 <= dword < BAR0 // 4 + 6:
            self.update_bar_mappings()
            if dword == COMMAND // 4:
                self._apply_intx()

    def config_traps(self) -> tuple[int, int]:
        """(reads, writes): bit d set = an access to config dword d has a side effect beyond the register file and
        must reach read_config/write_config; the other dwords may be served straight from ``config``'s register
        file (the C path of config mechanism #1, PciRoot.attach_accel). Here: writes of the command register
        and the BARs (they move mappings). A subclass that adds side effects extends these masks; one that
        overrides read_config/write_config without overriding this is trapped whole (PciRoot)."""
        writes = 1 << (COMMAND // 4)
        for i in range(NUM_BARS):
            writes |= 1 << (BAR0 // 4 + i)
        return 0, writes

    # ------------------------------------------------------------------ BARs
    def bars(self) -> list[BarSpec]:
        return self.config.bars()

    def bar_mapping(self, index: int) -> int | None:
        """Where BAR index is decoded right now, or None."""
        return self._mapped.get(index)

    def bar_read(self, bar: int, offset: int, data: memoryview) -> None:
        data[:] = b"\xff" * len(data)

    def bar_write(self, bar: int, offset: int, data: bytes | memoryview) -> None:
        return None

    def on_bar_moved(self, bar: int, old: int | None, new: int | None) -> None:
        """Hook after the platform mapping of a BAR changed (None = not decoded)."""
        return None

    def _decoded_address(self, spec: BarSpec) -> int | None:
        enabled = self.config.io_enabled() if spec.type is BarType.IO else self.config.memory_enabled()
        addr = self.config.bar_address(spec.index)
        # Address 0 is "not assigned": nothing sane lives there and firmware treats it as unprogrammed.
        if not enabled or addr == 0:
            return None
        return addr

    def update_bar_mappings(self) -> None:
        for spec in self.config.bars():
            old = self._mapped.get(spec.index)
            new = self._decoded_address(spec)
            if new == old:
                continue
            if old is not None:
                self._unmap(spec, old)
                del self._mapped[spec.index]
            if new is not None:
                if self._map(spec, new):
                    self._mapped[spec.index] = new
                else:
                    new = None
            if new != old:
                self.pci_stats.bar_moves += 1
                self.on_bar_moved(spec.index, old, new)

    def _map(self, spec: BarSpec, addr: int) -> bool:
        if self.platform is None:
            return True
        region = self._regions.setdefault(spec.index, _BarRegion(self, spec.index))
        try:
            if spec.is_io:
                self.platform.map_pio(region, addr, spec.size)
            else:
                self.platform.map_mmio(region, addr, spec.size)
        except (BusError, OSError) as e:
            self.pci_stats.bar_map_failures += 1
            self._pci_log.warning("pci: BAR %d at 0x%x+0x%x not decoded: %s", spec.index, addr, spec.size, e)
            return False
        return True

    def _unmap(self, spec: BarSpec, addr: int) -> None:
        if self.platform is None:
            return
        try:
            if spec.is_io:
                self.platform.unmap_pio(addr)
            else:
                self.platform.unmap_mmio(addr)
        except (BusError, OSError) as e:
            self._pci_log.warning("pci: unmapping BAR %d at 0x%x failed: %s", spec.index, addr, e)

    def unmap_all(self) -> None:
        """Host-side teardown: drop every decoded BAR (the device is being removed)."""
        for spec in self.config.bars():
            old = self._mapped.pop(spec.index, None)
            if old is not None:
                self._unmap(spec, old)
                self.on_bar_moved(spec.index, old, None)

    # ------------------------------------------------------------------ INTx
    def set_intx(self, level: bool) -> None:
        """Device-side INTx request; the line follows it unless the command register disables INTx."""
        self._intx_level = level
        self._apply_intx()

    def _apply_intx(self) -> None:
        self.config.set_interrupt_status(self._intx_level)
        effective = self._intx_level and not self.config.intx_disabled() and self.config.interrupt_pin != 0
        if self._intx_out != effective:
            self._intx_out = effective
            if self.platform is not None:
                try:
                    self.platform.intx(effective)
                except OSError as e:
                    self._pci_log.warning("pci: INTx %s failed: %s", effective, e)
