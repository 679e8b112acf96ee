"""QEMU's firmware configuration device (fw_cfg), as SeaBIOS and iPXE expect it on a PC.

The interface is QEMU's (docs/specs/fw_cfg.rst, hw/nvram/fw_cfg.c); the consumer we check against is SeaBIOS
(src/fw/paravirt.c). Two port ranges, two bus faces of one :class:`FwCfg`:

    0x510 (2 bytes)  ``io``   offset 0: selector, 16-bit little-endian write: picks an item, resets its offset
                               offset 1: data, 1-byte reads stream the selected item, 0 past its end
    0x514 (8 bytes)  ``dma``  the DMA address register, big-endian: a 4-byte write at offset 0 sets bits 63:32,
                               one at offset 4 ORs in bits 31:0 and starts the transfer (an 8-byte write at 0
                               does both); reads return the signature "QEMU CFG"

A DMA transfer reads an ``FWCfgDmaAccess`` descriptor {be32 control, be32 length, be64 address} at the address
written, optionally selects ``control >> 16`` (SELECT), then READs, SKIPs or WRITEs ``length`` bytes of the item
at ``address``, and stores the control word back: 0 when done, the ERROR bit when not. Guest memory is reached
only through :class:`kvmcore.memory.GuestMemory`, and every range is checked before anything is copied: a
descriptor or buffer outside guest RAM, a length beyond the address space, a write to a read-only item all end
in the ERROR bit (or, for a descriptor that cannot even be read back, nothing: QEMU's behaviour too), counted in
:class:`FwCfgMetrics`, never a host exception and never a host allocation the guest sizes.

Items: the legacy keys below 0x20 (signature, ID, CPU counts, boot menu, ...), the arch-local keys from 0x8000,
and named files from 0x20, listed by FW_CFG_FILE_DIR (be32 count, then {be32 size, be16 select, be16 reserved,
char name[56]} per file, sorted by name as QEMU's non-legacy machines do). What kvmdm puts in them for
SeaBIOS is :func:`pc_fw_cfg` at the end of this module.

Deviations from QEMU, chosen on purpose: data-port writes are ignored (QEMU ignores them too since 2.4) and
counted; a data-port read wider than a byte is invalid (QEMU's x86 port accepts only byte reads) and reads 0.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

from devices.bus import BusDevice
from devices.ratelimit import RateLimitedLog
from kvmcore.memory import GuestMemory, GuestMemoryError

log = logging.getLogger(__name__)

IO_PORT = 0x510
IO_LENGTH = 2
DMA_PORT = 0x514
DMA_LENGTH = 8
SELECTOR_OFFSET = 0
DATA_OFFSET = 1

# Keys (QEMU include/standard-headers/linux/qemu_fw_cfg.h).
FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_MACHINE_ID = 0x06
FW_CFG_NUMA = 0x0D
FW_CFG_BOOT_MENU = 0x0E
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_FILE_DIR = 0x19
FW_CFG_FILE_FIRST = 0x20
FW_CFG_WRITE_CHANNEL = 0x4000
FW_CFG_ARCH_LOCAL = 0x8000
FW_CFG_ENTRY_MASK = 0x3FFF
FW_CFG_ACPI_TABLES = FW_CFG_ARCH_LOCAL + 0
FW_CFG_SMBIOS_ENTRIES = FW_CFG_ARCH_LOCAL + 1
FW_CFG_IRQ0_OVERRIDE = FW_CFG_ARCH_LOCAL + 2
FW_CFG_E820_TABLE = FW_CFG_ARCH_LOCAL + 3

SIGNATURE = b"QEMU"
ID_TRADITIONAL = 1 << 0
ID_DMA = 1 << 1
DMA_SIGNATURE = 0x51454D5520434647  # "QEMU CFG", read big-endian from the DMA register

DMA_CTL_ERROR = 0x01
DMA_CTL_READ = 0x02
DMA_CTL_SKIP = 0x04
DMA_CTL_SELECT = 0x08
DMA_CTL_WRITE = 0x10
DMA_ACCESS = struct.Struct(">IIQ")  # FWCfgDmaAccess: control, length, address
DMA_CONTROL_OFFSET = 0

FILE_NAME_SIZE = 56  # FW_CFG_MAX_FILE_PATH, NUL included
FILE_ENTRY = struct.Struct(f">IHH{FILE_NAME_SIZE}s")
MAX_FILES = FW_CFG_ENTRY_MASK + 1 - FW_CFG_FILE_FIRST
MAX_ITEM_SIZE = (1 << 32) - 1  # sizes travel as be32
ZERO_CHUNK = 64 * 1024  # zero-filling a guest buffer goes in bounded pieces, whatever length the guest asks


class FwCfgConfigError(ValueError):
    """An item cannot be added: key out of range or taken, file name too long or duplicate, data too large.
    A host-side error (the VM is being built wrong), raised before the guest runs."""


@dataclass
class FwCfgMetrics:
    selects: int = 0
    data_reads: int = 0
    dma_transfers: int = 0
    dma_errors: int = 0  # transfers that ended with the ERROR bit (bad buffer, bad write, ...)
    dma_lost: int = 0  # descriptors that could not even be read, or their control word written back
    invalid_access: int = 0  # wrong width/offset, data-port writes


@dataclass
class _Item:
    data: bytearray
    writable: bool = False
    on_write: Callable[[int, bytes], None] | None = None


class FwCfg:
    """The item store and the two register sets. ``mem`` may be None (no DMA: the ID then says so)."""

    def __init__(self, mem: GuestMemory | None, *, dma: bool = True) -> None:
        self._mem = mem
        self.dma_enabled = dma and mem is not None
        self._items: dict[int, _Item] = {}
        self._files: dict[str, _Item] = {}
        self._file_keys: dict[str, int] = {}
        self._file_order: list[_Item] = []  # by selector - FW_CFG_FILE_FIRST
        self.selected: int | None = FW_CFG_SIGNATURE
        self.offset = 0
        self.dma_address = 0
        self.metrics = FwCfgMetrics()
        self._log = RateLimitedLog(log, per_second=5)
        self.io = _IoFace(self)
        self.dma = _DmaFace(self)
        self.add_bytes(FW_CFG_SIGNATURE, SIGNATURE)
        self.add_i32(FW_CFG_ID, ID_TRADITIONAL | (ID_DMA if self.dma_enabled else 0))
        self._rebuild_dir()

    # ------------------------------------------------------------------------------------------- host side
    def add_bytes(self, key: int, data: bytes) -> None:
        legacy = 0 <= key < FW_CFG_FILE_FIRST
        arch = FW_CFG_ARCH_LOCAL <= key <= FW_CFG_ARCH_LOCAL | FW_CFG_ENTRY_MASK
        if not (legacy or arch):
            raise FwCfgConfigError(f"fw_cfg key {key:#x} is not a legacy or arch-local key (files use add_file)")
        if key in self._items:
            raise FwCfgConfigError(f"fw_cfg key {key:#x} is already set")
        if len(data) > MAX_ITEM_SIZE:
            raise FwCfgConfigError(f"fw_cfg item {key:#x} is larger than 4 GiB")
        self._items[key] = _Item(bytearray(data))

    def add_i16(self, key: int, value: int) -> None:
        self.add_bytes(key, struct.pack("<H", value))

    def add_i32(self, key: int, value: int) -> None:
        self.add_bytes(key, struct.pack("<I", value))

    def add_i64(self, key: int, value: int) -> None:
        self.add_bytes(key, struct.pack("<Q", value))

    def add_file(self, name: str, data: bytes, *, writable: bool = False,
                 on_write: Callable[[int, bytes], None] | None = None) -> None:
        """A named file. ``writable`` lets DMA WRITE change it in place (its size never changes); ``on_write``
        then hears (offset, bytes written)."""
        raw = name.encode("ascii", "replace")
        if not raw or len(raw) >= FILE_NAME_SIZE or b"\0" in raw:
            raise FwCfgConfigError(f"fw_cfg file name {name!r} must be 1..{FILE_NAME_SIZE - 1} ASCII bytes")
        if name in self._files:
            raise FwCfgConfigError(f"fw_cfg file {name!r} is already present")
        if len(self._files) >= MAX_FILES:
            raise FwCfgConfigError(f"fw_cfg holds at most {MAX_FILES} files")
        if len(data) > MAX_ITEM_SIZE:
            raise FwCfgConfigError(f"fw_cfg file {name!r} is larger than 4 GiB")
        self._files[name] = _Item(bytearray(data), writable, on_write)
        self._rebuild_dir()

    def file_key(self, name: str) -> int:
        return self._file_keys[name]

    def file_names(self) -> list[str]:
        return sorted(self._files)

    def file_data(self, name: str) -> bytes:
        return bytes(self._files[name].data)

    def _rebuild_dir(self) -> None:
        # Sorted by name, selectors from FW_CFG_FILE_FIRST in that order (QEMU fw_cfg_add_file_callback for
        # machines without the legacy order).
        names = sorted(self._files)
        self._file_keys = {n: FW_CFG_FILE_FIRST + i for i, n in enumerate(names)}
        self._file_order = [self._files[n] for n in names]
        out = bytearray(struct.pack(">I", len(names)))
        for n in names:
            out += FILE_ENTRY.pack(len(self._files[n].data), self._file_keys[n], 0, n.encode("ascii"))
        self._items[FW_CFG_FILE_DIR] = _Item(out)

    def _item(self, key: int | None) -> _Item | None:
        if key is None:
            return None
        entry = key & (FW_CFG_ARCH_LOCAL | FW_CFG_ENTRY_MASK)
        if FW_CFG_FILE_FIRST <= entry < FW_CFG_FILE_FIRST + len(self._file_order):
            return self._file_order[entry - FW_CFG_FILE_FIRST]
        return self._items.get(entry)

    # ------------------------------------------------------------------------------------------ guest side
    def select(self, key: int) -> None:
        """QEMU fw_cfg_select: the offset restarts; an unknown key selects nothing (reads then see 0)."""
        self.metrics.selects += 1
        self.offset = 0
        self.selected = key if self._item(key) is not None else None

    def read_data_byte(self) -> int:
        self.metrics.data_reads += 1
        item = self._item(self.selected)
        if item is None or self.offset >= len(item.data):
            return 0
        value = item.data[self.offset]
        self.offset += 1
        return value

    def _invalid(self, what: str, offset: int, size: int) -> None:
        self.metrics.invalid_access += 1
        self._log.warning("fw_cfg: ignored %d-byte %s at offset %d", size, what, offset)

    def write_dma_register(self, offset: int, data: bytes | memoryview) -> None:
        size = len(data)
        value = int.from_bytes(data, "big")
        if size == 4 and offset == 0:
            self.dma_address = value << 32
        elif size == 4 and offset == 4:
            self.dma_address |= value
            self.dma_transfer()
        elif size == 8 and offset == 0:
            self.dma_address = value
            self.dma_transfer()
        else:
            self._invalid("DMA register write", offset, size)

    def dma_transfer(self) -> None:
        """One FWCfgDmaAccess at ``dma_address`` (QEMU fw_cfg_dma_transfer); the address register resets."""
        desc, self.dma_address = self.dma_address, 0
        self.metrics.dma_transfers += 1
        mem = self._mem
        if mem is None or not self.dma_enabled:
            self._invalid("DMA transfer without DMA", 0, 8)
            return
        try:
            control, length, address = mem.unpack_from(DMA_ACCESS, desc)
        except GuestMemoryError:
            self.metrics.dma_errors += 1
            self._store_control(mem, desc, DMA_CTL_ERROR)
            return
        if control & DMA_CTL_SELECT:
            self.select(control >> 16)
        if control & DMA_CTL_READ:
            op = DMA_CTL_READ
        elif control & DMA_CTL_WRITE:
            op = DMA_CTL_WRITE
        elif control & DMA_CTL_SKIP:
            op = DMA_CTL_SKIP
        else:
            op = 0  # nothing to move (a bare SELECT): done
        error = False
        if op and length:
            error = not self._move(mem, op, length, address)
        if error:
            self.metrics.dma_errors += 1
        self._store_control(mem, desc, DMA_CTL_ERROR if error else 0)

    def _store_control(self, mem: GuestMemory, desc: int, value: int) -> None:
        try:
            mem.write(desc + DMA_CONTROL_OFFSET, struct.pack(">I", value))
        except GuestMemoryError:
            self.metrics.dma_lost += 1
            self._log.warning("fw_cfg: DMA descriptor at %#x is not in guest RAM", desc)

    def _move(self, mem: GuestMemory, op: int, length: int, address: int) -> bool:
        """Read/skip/write ``length`` bytes of the selected item at guest ``address``; False = ERROR bit.
        Past the item's end a read zero-fills and a skip just advances, as in QEMU; every guest range is checked
        before it is touched."""
        item = self._item(self.selected)
        avail = 0 if item is None else max(0, len(item.data) - self.offset)
        n = min(length, avail)
        if op == DMA_CTL_SKIP:
            self.offset += n
            return True
        if not mem.check_range(address, length):
            return False
        if op == DMA_CTL_WRITE:
            if item is None or not item.writable or n != length:
                return False
            chunk = mem.read(address, n)
            item.data[self.offset : self.offset + n] = chunk
            if item.on_write is not None:
                item.on_write(self.offset, chunk)
            self.offset += n
            return True
        if n:
            assert item is not None
            mem.write(address, item.data[self.offset : self.offset + n])
            self.offset += n
        rest = length - n
        pos = address + n
        while rest:
            step = min(rest, ZERO_CHUNK)
            mem.fill(pos, step, 0)
            pos += step
            rest -= step
        return True


class _IoFace(BusDevice):
    """Ports 0x510-0x511: selector (16-bit writes) and data (byte reads)."""

    def __init__(self, fw: FwCfg) -> None:
        self.fw = fw

    def read(self, offset: int, data: memoryview) -> None:
        if offset == DATA_OFFSET and len(data) == 1:
            data[0] = self.fw.read_data_byte()
            return
        self.fw._invalid("read", offset, len(data))

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if offset == SELECTOR_OFFSET and len(data) == 2:
            self.fw.select(int.from_bytes(data, "little"))
            return
        self.fw._invalid("write", offset, len(data))


class _DmaFace(BusDevice):
    """Ports 0x514-0x51B: the big-endian DMA address register."""

    def __init__(self, fw: FwCfg) -> None:
        self.fw = fw

    def read(self, offset: int, data: memoryview) -> None:
        # QEMU fw_cfg_dma_mem_read: extract64(FW_CFG_DMA_SIGNATURE, (8 - addr - size) * 8, size * 8), big-endian.
        size = len(data)
        if offset + size > DMA_LENGTH:
            self.fw._invalid("DMA register read", offset, size)
            return
        data[:] = DMA_SIGNATURE.to_bytes(8, "big")[offset : offset + size]

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.fw.write_dma_register(offset, data)


# ------------------------------------------------------------------------------------------------ PC contents
E820_ENTRY = struct.Struct("<QQI")  # struct e820_reservation {le64 address, le64 length, le32 type}, packed
SERCON_FILE = "etc/sercon-port"
BOOTORDER_FILE = "bootorder"
BOOT_FAIL_WAIT_FILE = "etc/boot-fail-wait"
BOOT_MENU_WAIT_FILE = "etc/boot-menu-wait"
E820_FILE = "etc/e820"
GENROMS_PREFIX = "genroms/"


def pci_rom_name(vendor: int, device: int) -> str:
    """SeaBIOS's fw_cfg name for the option ROM of PCI functions vendor:device."""
    return f"pci{vendor:04x},{device:04x}.rom"


def virtio_blk_boot_path(slot: int) -> str:
    """The OpenFirmware path QEMU puts in ``bootorder`` for a virtio-blk-pci disk in bus-0 slot ``slot`` (SeaBIOS
    src/boot.c bootprio_find_pci_device matches ``/pci@i0cf8/*@<slot>`` as a prefix of it)."""
    return f"/pci@i0cf8/scsi@{slot:x}/disk@0,0"


def virtio_net_boot_path(slot: int) -> str:
    """QEMU's ``bootorder`` path for a virtio-net-pci nic: its option ROM is found through the same PCI prefix."""
    return f"/pci@i0cf8/ethernet@{slot:x}/ethernet-phy@0"


def pc_fw_cfg(mem: GuestMemory, *, vcpus: int, e820: list[tuple[int, int, int]],
              acpi_files: dict[str, bytes] | None, bootorder: list[str] | None = None,
              sercon_port: int | None = 0x3F8, boot_menu: bool = False, boot_menu_wait_ms: int | None = None,
              boot_fail_wait_ms: int | None = None, option_roms: dict[str, bytes] | None = None,
              pci_roms: dict[tuple[int, int], bytes] | None = None) -> FwCfg:
    """The items QEMU's i440FX "pc" machine offers SeaBIOS (hw/i386/fw_cfg.c fw_cfg_arch_create, hw/i386/pc.c),
    minus what kvmdm has no use for (SMBIOS tables: SeaBIOS builds its own; kernel/initrd keys: firmware boots a
    disk). Why each is here:

    * NB_CPUS / MAX_CPUS: SeaBIOS's SMP bring-up waits for exactly this many APs (smp_setup);
    * RAM_SIZE, ``etc/e820``: the memory map (qemu_early_e820), without which SeaBIOS falls back to CMOS;
    * NUMA: a zero node count followed by a zero per-CPU map, as QEMU gives without -numa;
    * IRQ0_OVERRIDE: the in-kernel IOAPIC has the PIT on pin 2 (SeaBIOS's MADT/MP table says so);
    * ``etc/table-loader`` + ``etc/acpi/tables`` + ``etc/acpi/rsdp``: kvmdm's ACPI tables (kvmcore.acpi), which
      SeaBIOS then uses instead of its own, and whose FADT moves its PM timer to our PM block at 0x600;
    * ``bootorder``: one OpenFirmware path per line (virtio_blk_boot_path), ``etc/boot-fail-wait`` (le32 ms before
      SeaBIOS reboots when nothing boots), BOOT_MENU + ``etc/boot-menu-wait`` (le16 ms);
    * ``etc/sercon-port``: SeaBIOS's screen on a serial port (there is no VGA), so its banner and the boot
      loader's BIOS text output reach the console log;
    * ``genroms/*``: option ROMs SeaBIOS copies below 1 MiB and runs, tied to no device;
    * ``pciVVVV,DDDD.rom``: the option ROM of every PCI function with that vendor/device id, which SeaBIOS runs in
      place of the function's ROM BAR (src/optionroms.c init_pcirom), so its boot entry carries the function's
      PCI path and ``bootorder`` finds it: iPXE for virtio-net (QEMU gives virtio-net-pci efi-virtio.rom).
    """
    fw = FwCfg(mem)
    fw.add_bytes(FW_CFG_UUID, bytes(16))
    fw.add_i64(FW_CFG_RAM_SIZE, sum(size for _gpa, size in mem.regions()))
    fw.add_i16(FW_CFG_NOGRAPHIC, 1)
    fw.add_i16(FW_CFG_NB_CPUS, vcpus)
    fw.add_i16(FW_CFG_MAX_CPUS, vcpus)
    fw.add_bytes(FW_CFG_NUMA, bytes(8 + 8 * vcpus))
    fw.add_i16(FW_CFG_BOOT_MENU, 1 if boot_menu else 0)
    fw.add_i32(FW_CFG_IRQ0_OVERRIDE, 1)
    fw.add_file(E820_FILE, b"".join(E820_ENTRY.pack(base, size, kind) for base, size, kind in e820))
    for name, data in (acpi_files or {}).items():
        fw.add_file(name, data)
    if bootorder:
        for line in bootorder:
            if "\n" in line or not line:
                raise FwCfgConfigError(f"bootorder entry {line!r} must be one non-empty line")
        fw.add_file(BOOTORDER_FILE, ("\n".join(bootorder) + "\n").encode("ascii") + b"\0")
    if boot_fail_wait_ms is not None:
        fw.add_file(BOOT_FAIL_WAIT_FILE, struct.pack("<I", boot_fail_wait_ms & 0xFFFF_FFFF))
    if boot_menu_wait_ms is not None:
        fw.add_file(BOOT_MENU_WAIT_FILE, struct.pack("<H", boot_menu_wait_ms))
    if sercon_port is not None:
        fw.add_file(SERCON_FILE, struct.pack("<H", sercon_port))
    for name, rom in (option_roms or {}).items():
        fw.add_file(GENROMS_PREFIX + name, rom)
    for (vendor, device), rom in (pci_roms or {}).items():
        fw.add_file(pci_rom_name(vendor, device), rom)
    return fw
