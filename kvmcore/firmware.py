"""A PC BIOS image and the KVM memory slots of a firmware-booted guest.

Where QEMU puts a BIOS (hw/i386/x86.c x86_bios_rom_init): the whole image read-only at the top of 4 GiB, where
the reset vector (CS base 0xFFFF0000, IP 0xFFF0) fetches its 16 last bytes, and its last 128 KiB (less if the
image is smaller) aliased below 1 MiB, ending at 0xFFFFF: the "isa-bios". The i440FX PAM registers
(devices.pam) then decide, per 16/64 KiB piece of 0xC0000-0xFFFFF, whether that alias or RAM shows there.

With KVM, "what shows there" is a memory slot. :class:`FirmwareMemory` owns the slot table of such a guest:

    RAM below 0xC0000, RAM from 1 MiB, RAM above 4 GiB       read-write slots on the GuestMemory memfd
    the 13 PAM regions (0xC0000-0xFFFFF)                     each a slot on RAM or on the ROM image,
                                                             KVM_MEM_READONLY unless RAM read-write
    the BIOS at 4 GiB - size                                 a KVM_MEM_READONLY slot on the ROM image

A slot's flags and backing cannot be changed in place (KVM_SET_USER_MEMORY_REGION refuses a READONLY flip), so a
switch deletes the slot and creates it anew; that happens in the vCPU thread that wrote the PAM register, while it
is out of KVM_RUN. A write to a read-only slot exits as MMIO and reaches devices.pam.ShadowWriteSink.

Image checks (:func:`check_bios`) run before anything is created: a missing file, a size that is not a whole
number of 64 KiB (a truncated download) or out of 64 KiB..8 MiB, and an image whose reset vector is not a jump
(not a BIOS: an ELF kernel, a disk image, a UEFI volume without a reset vector) are each a clear error.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Callable

from kvmcore import _abi as abi
from kvmcore.memory import GuestMemory

KIB = 1024
BIOS_ALIGN = 64 * KIB
BIOS_MIN = 64 * KIB
BIOS_MAX = 8 * 1024 * KIB  # stays clear of the pc-testdev window at 0xFF000000
ISA_BIOS_MAX = 128 * KIB
BIOS_END = 1 << 32
SHADOW_START = 0xC0000
LOW_MEGABYTE = 0x100000
SEABIOS_PATH = "/usr/share/seabios/bios-256k.bin"  # Debian's "seabios" package
RESET_VECTOR_FROM_END = 16  # the reset vector is at 0xFFFFFFF0: 16 bytes before the image's end
# x86 jumps a BIOS reset vector starts with: far jmp ptr16:16 (SeaBIOS: "ljmpw $SEG_BIOS, $entry_post"), near
# jmp rel16, short jmp rel8 (coreboot/others), or a wbinvd before the jump.
RESET_JUMP_OPCODES = (0xEA, 0xE9, 0xEB)
WBINVD = b"\x0f\x09"


class FirmwareError(Exception):
    """Base of firmware-image errors: config errors, reported before the VM is built."""


class FirmwareNotFound(FirmwareError):
    """The firmware file does not exist or cannot be read."""


class FirmwareTruncated(FirmwareError):
    """The firmware image is not a whole number of 64 KiB, or smaller than 64 KiB or larger than 8 MiB."""


class FirmwareNotBios(FirmwareError):
    """The firmware image has no x86 reset vector (a jump in its last 16 bytes): not a legacy BIOS."""


class FirmwareLayoutError(FirmwareError):
    """Guest RAM cannot hold a firmware-booted PC (no RAM at 0, or not past 1 MiB)."""


def check_bios(image: bytes, name: str = "firmware image") -> None:
    size = len(image)
    if size < BIOS_MIN or size > BIOS_MAX or size % BIOS_ALIGN:
        raise FirmwareTruncated(f"{name}: {size} bytes; a BIOS image is a multiple of 64 KiB between 64 KiB and "
                                "8 MiB (truncated file?)")
    vector = image[size - RESET_VECTOR_FROM_END:]
    if vector.startswith(WBINVD):
        vector = vector[2:]
    if vector[0] not in RESET_JUMP_OPCODES:
        raise FirmwareNotBios(f"{name}: no jump at the reset vector (byte {vector[0]:#04x} at 0xFFFFFFF0); "
                              "not a legacy BIOS image")


def load_bios(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            image = f.read(BIOS_MAX + 1)
    except OSError as e:
        raise FirmwareNotFound(f"firmware {path}: {e.strerror or e}") from None
    check_bios(image, path)
    return image


def _addr(buf: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


SlotSetter = Callable[[int, int, int, int, int], None]  # (slot, gpa, size, host_addr, flags), size 0 deletes


class FirmwareMemory:
    """The slot table described in the module docstring. ``set_slot`` is kvmcore.kvm.Vm.set_user_memory_region
    (a recorder in unit tests). Call :meth:`map` once, then :meth:`apply` for every PAM region (devices.pam.Pam
    does at construction) and again when a region's backing changes."""

    def __init__(self, set_slot: SlotSetter, mem: GuestMemory, bios: bytes) -> None:
        check_bios(bios)
        regions = list(mem.regions())
        if not regions or regions[0][0] != 0 or regions[0][1] <= LOW_MEGABYTE:
            raise FirmwareLayoutError("a firmware-booted guest needs RAM from 0 to beyond 1 MiB")
        self._set_slot = set_slot
        self.mem = mem
        self.bios_size = len(bios)
        self.isa_size = min(self.bios_size, ISA_BIOS_MAX)
        self.rom_floor = LOW_MEGABYTE - self.isa_size
        self._rom = mmap.mmap(-1, self.bios_size)
        self._rom[:] = bios
        self._rom_host = _addr(self._rom)
        self._ram_slots = mem.slots()
        self._ram0_host = self._ram_slots[0].host_addr
        self._next_slot = 0
        self.bios_slot = -1
        self._pam_slots: dict[int, int] = {}  # PAM region index -> slot number
        self._live: dict[int, tuple[int, int, int, int]] = {}  # slot -> (gpa, size, host, flags) now in KVM

    def _slot(self) -> int:
        n = self._next_slot
        self._next_slot += 1
        return n

    def _install(self, slot: int, gpa: int, size: int, host: int, flags: int) -> None:
        if slot in self._live:
            if self._live[slot] == (gpa, size, host, flags):
                return
            self._set_slot(slot, gpa, 0, 0, 0)  # delete first: flags and backing cannot change in place
            del self._live[slot]
        self._set_slot(slot, gpa, size, host, flags)
        self._live[slot] = (gpa, size, host, flags)

    def map(self) -> None:
        ram0 = self._ram_slots[0]
        self._install(self._slot(), 0, SHADOW_START, ram0.host_addr, 0)
        self._install(self._slot(), LOW_MEGABYTE, ram0.size - LOW_MEGABYTE, ram0.host_addr + LOW_MEGABYTE, 0)
        for s in self._ram_slots[1:]:
            if s.gpa < BIOS_END and s.gpa + s.size > BIOS_END - self.bios_size:
                raise FirmwareLayoutError(f"RAM at {s.gpa:#x} overlaps the BIOS below 4 GiB")
            self._install(self._slot(), s.gpa, s.size, s.host_addr, 0)
        self.bios_slot = self._slot()
        self._install(self.bios_slot, BIOS_END - self.bios_size, self.bios_size, self._rom_host,
                      abi.KVM_MEM_READONLY)

    def apply(self, gpa: int, size: int, from_rom: bool, writable: bool) -> None:
        """Back [gpa, gpa+size), one PAM region, by the ROM's ISA alias or by RAM (read-only unless writable)."""
        if not SHADOW_START <= gpa < gpa + size <= LOW_MEGABYTE:
            raise FirmwareLayoutError(f"{gpa:#x}+{size:#x} is not a PAM region")
        slot = self._pam_slots.get(gpa)
        if slot is None:
            slot = self._pam_slots[gpa] = self._slot()
        if from_rom:
            if gpa < self.rom_floor:
                raise FirmwareLayoutError(f"no ROM behind {gpa:#x} (the ISA alias starts at {self.rom_floor:#x})")
            host = self._rom_host + self.bios_size - (LOW_MEGABYTE - gpa)
            self._install(slot, gpa, size, host, abi.KVM_MEM_READONLY)
        else:
            self._install(slot, gpa, size, self._ram0_host + gpa, 0 if writable else abi.KVM_MEM_READONLY)

    def rom_alias(self, gpa: int, length: int) -> bytes:
        """The ROM bytes the ISA alias shows at [gpa, gpa+length)."""
        if not self.rom_floor <= gpa <= gpa + length <= LOW_MEGABYTE:
            raise ValueError(f"{gpa:#x}+{length:#x} is outside the BIOS alias")
        off = self.bios_size - (LOW_MEGABYTE - gpa)
        return self._rom[off : off + length]

    def slots(self) -> dict[int, tuple[int, int, int, int]]:
        """slot -> (gpa, size, host_addr, flags) as KVM has them now."""
        return dict(self._live)

    def close(self) -> None:
        """After the VM is closed (its slots point into the ROM mapping)."""
        if not self._rom.closed:
            self._rom.close()


def firmware_path(choice: str) -> str:
    """"seabios" -> Debian's SeaBIOS; anything else is taken as a path."""
    return SEABIOS_PATH if choice == "seabios" else os.fspath(choice)


# ---------------------------------------------------------------------------------------------- option ROMs
IPXE_VIRTIO_ROM = "/usr/lib/ipxe/qemu/efi-virtio.rom"  # Debian's "ipxe-qemu": QEMU's default virtio-net ROM
ROM_SIGNATURE = b"\x55\xaa"
PCIR_SIGNATURE = b"PCIR"
PCIR_POINTER = 0x18  # le16: the PCI data structure (PCI Firmware spec 3.0 §5.1.1)
PCIR_IMAGE_LENGTH = 0x10  # le16, in 512-byte units
PCIR_CODE_TYPE = 0x14  # 0: x86 PC-AT compatible, 3: EFI
PCIR_INDICATOR = 0x15  # bit 7: last image
CODE_TYPE_PCAT = 0
MAX_OPTION_ROM = 16 * 1024 * KIB


class OptionRomError(FirmwareError):
    """An option ROM file is missing, malformed, or has no x86 (PC-AT) image."""


def legacy_rom_image(data: bytes, name: str = "option ROM") -> bytes:
    """The x86 PC-AT image of a PCI expansion ROM file (PCI Firmware spec 3.0 §5.1: images one after another,
    each 0x55AA + a PCIR structure with its length and code type). QEMU's efi-*.rom files hold a legacy iPXE image
    and an EFI one; a BIOS gets the first only (SeaBIOS copies a fw_cfg ROM file whole, and the whole file would not
    fit in the option-ROM area)."""
    off = 0
    while off + 0x1A <= len(data):
        if data[off : off + 2] != ROM_SIGNATURE:
            break
        pcir = off + int.from_bytes(data[off + PCIR_POINTER : off + PCIR_POINTER + 2], "little")
        if pcir + 0x18 > len(data) or data[pcir : pcir + 4] != PCIR_SIGNATURE:
            break
        length = int.from_bytes(data[pcir + PCIR_IMAGE_LENGTH : pcir + PCIR_IMAGE_LENGTH + 2], "little") * 512
        if length == 0 or off + length > len(data):
            break
        if data[pcir + PCIR_CODE_TYPE] == CODE_TYPE_PCAT:
            return data[off : off + length]
        if data[pcir + PCIR_INDICATOR] & 0x80:
            break
        off += length
    raise OptionRomError(f"{name}: no x86 (PC-AT) image in this PCI expansion ROM")


def load_option_rom(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_OPTION_ROM + 1)
    except OSError as e:
        raise OptionRomError(f"option ROM {path}: {e.strerror or e}") from None
    if len(data) > MAX_OPTION_ROM:
        raise OptionRomError(f"option ROM {path}: larger than 16 MiB")
    return legacy_rom_image(data, path)


def nic_rom_path(choice: str) -> str:
    """"ipxe" -> Debian's iPXE virtio-net ROM; anything else is taken as a path."""
    return IPXE_VIRTIO_ROM if choice == "ipxe" else os.fspath(choice)
