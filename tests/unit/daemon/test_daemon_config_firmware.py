"""Guest definitions with ``firmware`` and ``boot_order`` (issue 10): validation, round trip, the boot order
the builder hands the VMM, and the machine config the builder makes of it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon.builder import GuestResources, machine_config
from daemon.config import ConfigError, parse_definition
from kvmcore.firmware import SEABIOS_PATH


def _disk(tmp_path: Path, n: int) -> list[dict[str, str]]:
    out = []
    for i in range(n):
        p = tmp_path / f"d{i}.img"
        p.write_bytes(bytes(512))
        out.append({"path": str(p)})
    return out


def test_firmware_path_definition_round_trips_and_orders_boot_devices(tmp_path: Path) -> None:
    bios = tmp_path / "bios.bin"
    img = bytearray(64 * 1024)
    img[-16] = 0xEA
    bios.write_bytes(bytes(img))
    raw = {"name": "fw", "firmware": str(bios), "disks": _disk(tmp_path, 2),
           "nics": [{"mac": "52:54:00:00:00:01"}], "boot_order": ["nic0", "disk1"]}
    d = parse_definition(raw)
    assert d.firmware == str(bios) and d.kernel == ""
    assert parse_definition(d.to_dict()) == d
    assert "kernel" not in d.to_dict()
    # nic0 is the third virtio device (disks first, then nics): index 2.
    assert d.boot_devices() == (("net", 2), ("disk", 1))
    cfg = machine_config(d, GuestResources(kernel=bytes(img)))
    assert cfg.firmware == bytes(img) and cfg.boot_order == (("net", 2), ("disk", 1)) and cfg.kernel == b""


def test_default_boot_order_is_every_disk(tmp_path: Path) -> None:
    d = parse_definition({"name": "fw", "firmware": "seabios", "disks": _disk(tmp_path, 2)}, check_paths=False)
    assert d.boot_devices() == (("disk", 0), ("disk", 1))


def test_kernel_guest_dict_is_unchanged_by_the_firmware_fields() -> None:
    d = parse_definition({"name": "k", "kernel": "demo"})
    assert "firmware" not in d.to_dict() and "boot_order" not in d.to_dict()


@pytest.mark.parametrize("extra, message", [
    ({"kernel": "demo"}, "kernel: cannot be combined with firmware"),
    ({"cmdline": "x"}, "cmdline: cannot be combined with firmware"),
    ({"boot_order": ["disk0"]}, "boot_order[0]: disk0 does not exist"),
    ({"boot_order": ["cdrom0"]}, 'boot_order[0]: must be "diskN" or "nicN"'),
    ({"boot_order": "disk0"}, "boot_order: must be an array"),
    ({"firmware": "relative.bin"}, "firmware: must be an absolute path"),
    ({"firmware": "/nonexistent/bios.bin"}, "firmware: file does not exist"),
])
def test_bad_firmware_definitions_name_the_field(extra: dict, message: str) -> None:
    raw = {"name": "fw", "firmware": "seabios", **extra}
    with pytest.raises(ConfigError) as e:
        parse_definition(raw, check_paths=True)
    assert any(message in err for err in e.value.errors), e.value.errors


def test_boot_order_needs_firmware_and_kernel_or_firmware_is_required() -> None:
    with pytest.raises(ConfigError, match="boot_order: only applies with firmware"):
        parse_definition({"name": "k", "kernel": "demo", "boot_order": []})
    with pytest.raises(ConfigError, match=r"kernel: is required \(or firmware\)"):
        parse_definition({"name": "k"})


def test_a_truncated_or_non_bios_firmware_file_is_refused_when_paths_are_checked(tmp_path: Path) -> None:
    short = tmp_path / "short.bin"
    short.write_bytes(bytes(70_000))
    with pytest.raises(ConfigError, match="multiple of 64 KiB"):
        parse_definition({"name": "fw", "firmware": str(short)})
    zeros = tmp_path / "zeros.bin"
    zeros.write_bytes(bytes(128 * 1024))
    with pytest.raises(ConfigError, match="not a legacy BIOS"):
        parse_definition({"name": "fw", "firmware": str(zeros)})
    # The jailed DM does not check paths: the same definition parses there (the daemon checked it).
    assert parse_definition({"name": "fw", "firmware": str(zeros)}, check_paths=False).firmware == str(zeros)


@pytest.mark.skipif(not os.path.exists(SEABIOS_PATH), reason="Debian's seabios package is not installed")
def test_seabios_keyword_is_checked_against_debians_image() -> None:
    assert parse_definition({"name": "fw", "firmware": "seabios"}).firmware == "seabios"


def test_nic_rom_goes_to_the_virtio_net_pci_id_only_when_there_are_nics() -> None:
    d = parse_definition({"name": "fw", "firmware": "seabios", "nic_rom": "ipxe", "nics": [{}],
                          "boot_order": ["nic0"]}, check_paths=False)
    assert d.nic_rom == "ipxe" and parse_definition(d.to_dict(), check_paths=False) == d
    cfg = machine_config(d, GuestResources(kernel=b"bios", nic_rom=b"\x55\xaarom"))
    assert cfg.pci_roms == {(0x1AF4, 0x1041): b"\x55\xaarom"}  # virtio 1.2 §4.1.2: 0x1040 + 1
    bare = parse_definition({"name": "fw", "firmware": "seabios", "nic_rom": "ipxe"}, check_paths=False)
    assert machine_config(bare, GuestResources(kernel=b"bios", nic_rom=b"x")).pci_roms == {}


def test_nic_rom_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nic_rom: only applies with firmware"):
        parse_definition({"name": "k", "kernel": "demo", "nic_rom": "ipxe"})
    junk = tmp_path / "junk.rom"
    junk.write_bytes(bytes(4096))
    with pytest.raises(ConfigError, match=r"nic_rom: .*no x86 \(PC-AT\) image"):
        parse_definition({"name": "fw", "firmware": "seabios", "nic_rom": str(junk)})
