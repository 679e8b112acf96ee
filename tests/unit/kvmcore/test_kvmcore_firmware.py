"""kvmcore.firmware: BIOS image checks and the slot table of a firmware-booted PC, without /dev/kvm (a recorder
stands in for KVM_SET_USER_MEMORY_REGION)."""

from __future__ import annotations

import ctypes
import os

import pytest

from kvmcore import _abi as abi
from kvmcore import firmware as fw
from kvmcore.memory import GuestMemory

KIB = 1024


def fake_bios(size: int = 256 * KIB) -> bytes:
    """Distinct bytes everywhere (offset-derived) and a far jump at the reset vector, like SeaBIOS's."""
    img = bytearray((i * 7 + (i >> 12)) & 0xFF for i in range(size))
    img[size - 16 : size - 11] = b"\xea\x5b\xe0\x00\xf0"
    return bytes(img)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int, int, int]] = []

    def __call__(self, slot: int, gpa: int, size: int, host: int, flags: int) -> None:
        self.calls.append((slot, gpa, size, host, flags))


@pytest.fixture
def mem():
    m = GuestMemory.create([(0, 8 << 20)])
    yield m
    m.close()


def host_bytes(addr: int, n: int) -> bytes:
    return ctypes.string_at(addr, n)


def test_debian_seabios_passes_the_checks() -> None:
    if not os.path.exists(fw.SEABIOS_PATH):
        pytest.skip("Debian's seabios package is not installed")
    assert len(fw.load_bios(fw.SEABIOS_PATH)) == 256 * KIB


@pytest.mark.parametrize("size", [0, 1000, 64 * KIB - 1, 100_000, 16 << 20])
def test_sizes_that_are_not_whole_64k_blocks_in_range_are_truncated(size: int) -> None:
    with pytest.raises(fw.FirmwareTruncated, match="64 KiB"):
        fw.check_bios(bytes(size))


def test_image_without_a_reset_jump_is_not_a_bios() -> None:
    with pytest.raises(fw.FirmwareNotBios, match="reset vector"):
        fw.check_bios(bytes(128 * KIB))
    elf = bytearray(fake_bios(64 * KIB))
    elf[:4] = b"\x7fELF"
    elf[-16:] = bytes(16)
    with pytest.raises(fw.FirmwareNotBios):
        fw.check_bios(bytes(elf))
    fw.check_bios(fake_bios(64 * KIB))  # the same size with a jump is fine


def test_missing_file_is_firmware_not_found(tmp_path) -> None:
    with pytest.raises(fw.FirmwareNotFound):
        fw.load_bios(str(tmp_path / "nope.bin"))


def test_map_puts_the_bios_read_only_at_the_top_of_4g_and_leaves_the_shadow_hole(mem) -> None:
    rec = Recorder()
    bios = fake_bios()
    m = fw.FirmwareMemory(rec, mem, bios)
    m.map()
    live = m.slots()
    gpa_to = {gpa: (size, host, flags) for gpa, size, host, flags in live.values()}
    assert gpa_to[0][0] == 0xC0000 and gpa_to[0][2] == 0
    assert gpa_to[0x100000][0] == (8 << 20) - 0x100000
    size, host, flags = gpa_to[(1 << 32) - len(bios)]
    assert size == len(bios) and flags == abi.KVM_MEM_READONLY
    assert host_bytes(host + size - 16, 16) == bios[-16:]  # what the reset vector fetches
    # Nothing covers 0xC0000-0xFFFFF until the PAM regions are applied.
    assert not any(0xC0000 <= gpa < 0x100000 for gpa in gpa_to)
    m.close()


def test_pam_region_from_rom_shows_the_isa_alias_of_the_last_128k(mem) -> None:
    rec = Recorder()
    bios = fake_bios()
    m = fw.FirmwareMemory(rec, mem, bios)
    m.map()
    m.apply(0xF0000, 0x10000, from_rom=True, writable=False)
    slot, gpa, size, host, flags = rec.calls[-1]
    assert (gpa, size, flags) == (0xF0000, 0x10000, abi.KVM_MEM_READONLY)
    assert host_bytes(host, 0x10000) == bios[-0x10000:]
    assert m.rom_alias(0xE0000, 16) == bios[len(bios) - 0x20000 : len(bios) - 0x20000 + 16]
    with pytest.raises(fw.FirmwareLayoutError):
        m.apply(0xC0000, 0x4000, from_rom=True, writable=False)  # no ROM decoded below 0xE0000
    m.close()


def test_switching_a_region_deletes_the_slot_before_recreating_it(mem) -> None:
    rec = Recorder()
    m = fw.FirmwareMemory(rec, mem, fake_bios())
    m.map()
    m.apply(0xF0000, 0x10000, from_rom=True, writable=False)
    n = len(rec.calls)
    m.apply(0xF0000, 0x10000, from_rom=True, writable=False)  # unchanged: no ioctl
    assert len(rec.calls) == n
    m.apply(0xF0000, 0x10000, from_rom=False, writable=True)
    slot = rec.calls[n - 1][0]
    # KVM refuses to flip KVM_MEM_READONLY in place: size 0 (delete) first, then the RAM slot.
    assert rec.calls[n] == (slot, 0xF0000, 0, 0, 0)
    _s, gpa, size, host, flags = rec.calls[n + 1]
    assert (gpa, size, flags) == (0xF0000, 0x10000, 0)
    mem.write(0xF0000, b"shadow")
    assert host_bytes(host, 6) == b"shadow"  # the slot is the guest's own RAM at that address
    m.apply(0xF0000, 0x10000, from_rom=False, writable=False)
    assert rec.calls[-1][4] == abi.KVM_MEM_READONLY
    m.close()


def test_small_bios_alias_starts_higher(mem) -> None:
    m = fw.FirmwareMemory(Recorder(), mem, fake_bios(64 * KIB))
    assert m.rom_floor == 0xF0000
    m.close()


def test_ram_that_does_not_reach_past_1m_is_refused() -> None:
    small = GuestMemory.create([(0, 1 << 20)])
    try:
        with pytest.raises(fw.FirmwareLayoutError):
            fw.FirmwareMemory(Recorder(), small, fake_bios())
    finally:
        small.close()


# ---- option ROMs -------------------------------------------------------------------------------------------
def _rom_image(code_type: int, sectors: int, last: bool) -> bytes:
    img = bytearray(sectors * 512)
    img[0:2] = b"\x55\xaa"
    img[2] = sectors
    img[0x18:0x1A] = (0x40).to_bytes(2, "little")
    img[0x40:0x44] = b"PCIR"
    img[0x40 + 0x10 : 0x40 + 0x12] = sectors.to_bytes(2, "little")
    img[0x40 + 0x14] = code_type
    img[0x40 + 0x15] = 0x80 if last else 0
    img[0x100] = code_type + 0x10  # a marker to tell the images apart
    return bytes(img)


def test_legacy_image_is_found_after_an_efi_one() -> None:
    efi = _rom_image(3, 4, last=False)
    pcat = _rom_image(0, 2, last=True)
    assert fw.legacy_rom_image(efi + pcat) == pcat
    assert fw.legacy_rom_image(pcat + efi) == pcat


@pytest.mark.parametrize("data", [b"", bytes(4096), _rom_image(3, 4, last=True), _rom_image(3, 4, last=False),
                                  _rom_image(0, 8, last=True)[:2048]])
def test_rom_without_a_usable_x86_image_is_refused(data: bytes) -> None:
    with pytest.raises(fw.OptionRomError):
        fw.legacy_rom_image(data)


def test_debian_ipxe_virtio_rom_yields_its_legacy_image() -> None:
    if not os.path.exists(fw.IPXE_VIRTIO_ROM):
        pytest.skip("Debian's ipxe-qemu is not installed")
    whole = open(fw.IPXE_VIRTIO_ROM, "rb").read()
    img = fw.load_option_rom(fw.IPXE_VIRTIO_ROM)
    assert img[:2] == b"\x55\xaa" and len(img) == img[2] * 512 < len(whole)
    pcir = int.from_bytes(img[0x18:0x1A], "little")
    assert img[pcir : pcir + 4] == b"PCIR" and img[pcir + 0x14] == 0
