"""PCI bus 0: the root holding functions, the i440FX host bridge, and config mechanisms #1 (ports 0xCF8-0xCFF)
and ECAM (MMIO).

Only bus 0, function 0 of each of the 32 device slots exists. Anything else (other buses, other functions, empty
slots, the enable bit clear) reads as all-ones, which is how software detects an absent function (PCI Local Bus
3.0 §6.1: vendor ID 0xFFFF), and writes vanish.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from devices.bus import BusDevice
from devices.pci.config import (
    CMD_IO_SPACE,
    CMD_MEMORY_SPACE,
    COMMAND,
    CONFIG_SPACE_SIZE,
    BarType,
    PciConfigError,
    PciConfiguration,
)
from devices.pci.device import PciDevice
from devices.ratelimit import RateLimitedLog
from kvmcore import layout

log = logging.getLogger(__name__)

NUM_SLOTS = 32

# i440FX PMC (what QEMU's "pc" machine and SeaBIOS's pciinit expect at 00:00.0).
I440FX_VENDOR_ID = 0x8086
I440FX_DEVICE_ID = 0x1237
I440FX_REVISION = 0x02
CLASS_BRIDGE = 0x06
SUBCLASS_HOST_BRIDGE = 0x00
# PAM0..PAM6 (0x59..0x5F) and SMRAM (0x72): firmware programs them to shadow the BIOS; here they are scratch
# registers that read back what was written (guest RAM is always RAM under KVM).
I440FX_PAM0 = 0x59
I440FX_SMRAM = 0x72

CONFIG_IO_PORT = 0xCF8
CONFIG_IO_SIZE = 8
CONFIG_ADDRESS_ENABLE = 1 << 31
RESET_CONTROL_OFFSET = 1  # 0xCF9, PIIX reset control register
RESET_CONTROL_RST_CPU = 0x04

ECAM_BUS_SHIFT = 20
ECAM_SIZE_BUS0 = 1 << ECAM_BUS_SHIFT  # 32 devices x 8 functions x 4 KiB


class I440fxHostBridge(PciDevice):
    def __init__(self) -> None:
        cfg = PciConfiguration(
            vendor_id=I440FX_VENDOR_ID,
            device_id=I440FX_DEVICE_ID,
            class_code=CLASS_BRIDGE,
            subclass=SUBCLASS_HOST_BRIDGE,
            revision=I440FX_REVISION,
        )
        # PAM1..PAM6 share dwords 0x58/0x5C with PAM0; make exactly those bytes writable.
        cfg.set_writable_bits(0x58, 0xFFFF_FF00)
        cfg.set_writable_bits(0x5C, 0xFFFF_FFFF)
        cfg.set_writable_bits(0x70, 0x00FF_0000)
        super().__init__(cfg, None)


@dataclass
class PciRootStats:
    absent_reads: int = 0
    absent_writes: int = 0


class PciConfigAccelState(Protocol):
    """The C half of config mechanism #1 (kvmcore.fastrun.PciConfigAccel): ``with accel:`` excludes the C loop."""

    address: int

    def __enter__(self) -> None: ...

    def __exit__(self, *exc: object) -> None: ...

    def set_function(self, slot: int, regs: Any, writable: Any, w1c: Any, read_trap: int, write_trap: int) -> None:
        ...

    def clear_function(self, slot: int) -> None: ...

    def function_counts(self, slot: int) -> tuple[int, int]: ...

    def reset_function_counts(self, slot: int) -> None: ...

    def absent_counts(self) -> tuple[int, int]: ...


ALL_DWORDS = (1 << (CONFIG_SPACE_SIZE // 4)) - 1


def _traps(dev: PciDevice) -> tuple[int, int]:
    """The device's config traps; all of config space when it overrides the accessors without saying which
    dwords its overrides care about (a side effect the C path must never skip)."""
    cls = type(dev)
    overrides = cls.read_config is not PciDevice.read_config or cls.write_config is not PciDevice.write_config
    if overrides and cls.config_traps is PciDevice.config_traps:
        return ALL_DWORDS, ALL_DWORDS
    return dev.config_traps()


class PciRoot:
    """Bus 0. Slot 0 is the host bridge; add_device fills the lowest free slot unless told which."""

    def __init__(self, host_bridge: PciDevice | None = None) -> None:
        self._slots: dict[int, PciDevice] = {0: host_bridge or I440fxHostBridge()}
        self._stats = PciRootStats()
        self.accel: PciConfigAccelState | None = None

    def attach_accel(self, accel: PciConfigAccelState) -> None:
        """Let a C path serve mechanism #1 from the functions' own register files (kvmcore.fastrun): reads and
        writes of the dwords no device traps (config_traps), the address latch, absent functions. Guest config
        accesses made here (mechanism #1, ECAM) then hold ``accel``; host-side changes to untrapped dwords must
        happen before the vCPUs run (e.g. the interrupt line the VMM writes) or hold it too."""
        with accel:
            self.accel = accel
            for slot, dev in self._slots.items():
                self._accel_add(slot, dev)

    def _accel_add(self, slot: int, dev: PciDevice) -> None:
        acc = self.accel
        if acc is None:
            return
        read_trap, write_trap = _traps(dev)
        acc.reset_function_counts(slot)
        acc.set_function(slot, *dev.config.register_file(), read_trap, write_trap)
        dev.config.count_elsewhere(lambda: acc.function_counts(slot))

    def _accel_remove(self, slot: int, dev: PciDevice) -> None:
        if self.accel is not None:
            dev.config.count_elsewhere(None)
            self.accel.clear_function(slot)

    @property
    def stats(self) -> PciRootStats:
        if self.accel is None:
            return self._stats
        r, w = self.accel.absent_counts()
        return PciRootStats(self._stats.absent_reads + r, self._stats.absent_writes + w)

    def add_device(self, dev: PciDevice, slot: int | None = None) -> int:
        if slot is None:
            free = [s for s in range(NUM_SLOTS) if s not in self._slots]
            if not free:
                raise PciConfigError("PCI bus 0 is full")
            slot = free[0]
        if not 0 <= slot < NUM_SLOTS:
            raise PciConfigError(f"PCI slot {slot} out of range")
        if slot in self._slots:
            raise PciConfigError(f"PCI slot {slot} is taken")
        with self._accel_held():
            self._slots[slot] = dev
            self._accel_add(slot, dev)
        return slot

    def remove_device(self, slot: int) -> PciDevice:
        if slot == 0 or slot not in self._slots:
            raise PciConfigError(f"no removable device in slot {slot}")
        with self._accel_held():
            dev = self._slots.pop(slot)
            self._accel_remove(slot, dev)
        dev.unmap_all()
        return dev

    def _accel_held(self) -> contextlib.AbstractContextManager[None]:
        return self.accel if self.accel is not None else contextlib.nullcontext()  # type: ignore[return-value]

    def device(self, slot: int) -> PciDevice | None:
        return self._slots.get(slot)

    def devices(self) -> list[tuple[int, PciDevice]]:
        return sorted(self._slots.items(), key=lambda kv: kv[0])

    def _lookup(self, bus: int, slot: int, function: int) -> PciDevice | None:
        if bus != 0 or function != 0:
            return None
        return self._slots.get(slot)

    def config_read(self, bus: int, slot: int, function: int, offset: int, data: memoryview) -> None:
        dev = self._lookup(bus, slot, function)
        if dev is None:
            self._stats.absent_reads += 1
            data[:] = b"\xff" * len(data)
            return
        dev.read_config(offset, data)

    def config_write(self, bus: int, slot: int, function: int, offset: int, data: bytes | memoryview) -> None:
        dev = self._lookup(bus, slot, function)
        if dev is None:
            self._stats.absent_writes += 1
            return
        dev.write_config(offset, data)


class PciConfigIo(BusDevice):
    """Configuration mechanism #1 (PCI Local Bus 3.0 §3.2.2.3.2), placed on the port bus at 0xCF8, length 8.

    0xCF8 (dword only): CONFIG_ADDRESS = enable(31) | bus(23:16) | device(15:11) | function(10:8) | reg(7:2).
    0xCFC..0xCFF: CONFIG_DATA; a byte/word at 0xCFC+k addresses register (reg + k), the lane it occupies.
    0xCF9 (byte): PIIX reset control; bit 2 requests a CPU reset, reported through ``on_reset``.
    """

    def __init__(self, root: PciRoot, on_reset: Callable[[], None] | None = None) -> None:
        self.root = root
        self.on_reset = on_reset
        self._address = 0
        self.bad_accesses = 0
        self._log = RateLimitedLog(log, per_second=5)

    @property
    def fast_accel(self) -> PciConfigAccelState | None:
        """The C half serving these ports (devices.bus.Bus.accelerated), when the root has one."""
        return self.root.accel

    @property
    def address(self) -> int:
        # With a C half the latch lives there: both paths see one CONFIG_ADDRESS.
        acc = self.root.accel
        return self._address if acc is None else acc.address

    @address.setter
    def address(self, value: int) -> None:
        acc = self.root.accel
        if acc is None:
            self._address = value
        else:
            acc.address = value

    def _target(self, offset: int) -> tuple[int, int, int, int] | None:
        address = self.address
        if not address & CONFIG_ADDRESS_ENABLE:
            return None
        bus = (address >> 16) & 0xFF
        slot = (address >> 11) & 0x1F
        function = (address >> 8) & 0x7
        reg = (address & 0xFC) + (offset - 4)
        return bus, slot, function, reg

    def read(self, offset: int, data: memoryview) -> None:
        acc = self.root.accel
        if acc is None:
            self._read(offset, data)
            return
        with acc:
            self._read(offset, data)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        acc = self.root.accel
        if acc is None:
            self._write(offset, data)
            return
        with acc:
            self._write(offset, data)

    def _read(self, offset: int, data: memoryview) -> None:
        size = len(data)
        if offset == 0 and size == 4:
            data[:] = self.address.to_bytes(4, "little")
            return
        if offset >= 4 and size in (1, 2, 4) and offset + size <= CONFIG_IO_SIZE:
            t = self._target(offset)
            if t is not None:
                self.root.config_read(*t, data)
                return
        elif offset == RESET_CONTROL_OFFSET and size == 1:
            data[0] = 0
            return
        else:
            self.bad_accesses += 1
        data[:] = b"\xff" * size

    def _write(self, offset: int, data: bytes | memoryview) -> None:
        size = len(data)
        if offset == 0 and size == 4:
            # Bits 1:0 are reserved and read back as 0; bits 30:24 are reserved too but harmless to keep.
            self.address = int.from_bytes(data, "little") & 0xFFFF_FFFC
            return
        if offset >= 4 and size in (1, 2, 4) and offset + size <= CONFIG_IO_SIZE:
            t = self._target(offset)
            if t is not None:
                self.root.config_write(*t, data)
            return
        if offset == RESET_CONTROL_OFFSET and size == 1:
            if data[0] & RESET_CONTROL_RST_CPU and self.on_reset is not None:
                self.on_reset()
            return
        self.bad_accesses += 1
        self._log.debug("pci cfg io: ignored write at +%d size %d", offset, size)


class PciConfigMmio(BusDevice):
    """PCIe ECAM window for bus 0 (1 MiB): offset = device(19:15) | function(14:12) | register(11:0).

    Our functions are conventional PCI: registers 0x100..0xFFF (extended config space) read as all-ones.
    """

    def __init__(self, root: PciRoot) -> None:
        self.root = root

    @staticmethod
    def _decode(offset: int) -> tuple[int, int, int, int]:
        return offset >> ECAM_BUS_SHIFT, (offset >> 15) & 0x1F, (offset >> 12) & 0x7, offset & 0xFFF

    def read(self, offset: int, data: memoryview) -> None:
        bus, slot, function, reg = self._decode(offset)
        with self.root._accel_held():
            self.root.config_read(bus, slot, function, reg, data)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        bus, slot, function, reg = self._decode(offset)
        with self.root._accel_held():
            self.root.config_write(bus, slot, function, reg, data)


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def assign_bars(
    root: PciRoot,
    mmio32: tuple[int, int] = (layout.PCI_MMIO32_START, layout.PCI_MMIO32_END),
    mmio64: tuple[int, int] | None = None,
    io: tuple[int, int] = (0xC000, 0x1_0000),
) -> dict[tuple[int, int], int]:
    """Place every BAR of every device and enable decoding, like firmware would (largest first, naturally
    aligned). 64-bit BARs go into ``mmio64`` when given, else below 4 GiB so 32-bit guests can reach them.
    Returns {(slot, bar_index): address}. Raises PciConfigError when a window is too small (a host config error).
    The guest may still move the BARs afterwards."""
    windows = {"mmio32": list(mmio32), "mmio64": list(mmio64) if mmio64 else None, "io": list(io)}
    todo = []
    for slot, dev in root.devices():
        for spec in dev.bars():
            if spec.type is BarType.IO:
                kind = "io"
            elif spec.type is BarType.MEM64 and windows["mmio64"] is not None:
                kind = "mmio64"
            else:
                kind = "mmio32"
            todo.append((spec.size, kind, slot, dev, spec))
    todo.sort(key=lambda t: (-t[0], t[2], t[4].index))
    placed: dict[tuple[int, int], int] = {}
    for size, kind, slot, dev, spec in todo:
        win = windows[kind]
        assert win is not None
        addr = _align_up(win[0], size)
        if addr + size > win[1]:
            raise PciConfigError(f"no room for BAR {spec.index} of slot {slot} (0x{size:x} bytes) in {kind}")
        win[0] = addr + size
        dev.config.set_bar_address(spec.index, addr)
        placed[(slot, spec.index)] = addr
    for _slot, dev in root.devices():
        bars = dev.bars()
        if not bars:
            continue
        cmd = dev.config.command
        if any(b.type is BarType.IO for b in bars):
            cmd |= CMD_IO_SPACE
        if any(b.type is not BarType.IO for b in bars):
            cmd |= CMD_MEMORY_SPACE
        dev.write_config(COMMAND, cmd.to_bytes(2, "little"))
        dev.update_bar_mappings()
    return placed
