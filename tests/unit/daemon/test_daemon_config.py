"""Guest definition schema: defaults, every validation path (one negative per rule), JSON/TOML loading."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from daemon.config import (  # noqa: E402
    ConfigError,
    GuestDefinition,
    absolutize_paths,
    generate_mac,
    load_definition_file,
    parse_definition,
    parse_definition_json,
)


@pytest.fixture
def kernel(tmp_path: Path) -> str:
    p = tmp_path / "vmlinuz"
    p.write_bytes(b"k")
    return str(p)


def errors_of(raw: Any, check_paths: bool = True) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        parse_definition(raw, check_paths=check_paths)
    return ei.value.errors


def base(kernel_path: str, **kw: Any) -> dict[str, Any]:
    return {"name": "g1", "kernel": kernel_path, **kw}


def test_minimal_definition_gets_documented_defaults(kernel: str) -> None:
    d = parse_definition(base(kernel))
    assert (d.vcpus, d.memory_mib, d.cmdline, d.restart, d.max_restarts, d.restart_window_s) == \
        (1, 128, "", "on-failure", 5, 60)
    assert d.jail.enabled is True and d.disks == () and d.nics == () and d.initrd is None


def test_full_definition_round_trips_through_to_dict(kernel: str, tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * 512)
    raw = base(kernel, vcpus=4, memory_mib=512, initrd=kernel, cmdline="console=ttyS0",
               disks=[{"path": str(disk), "read_only": True, "serial": "SN1", "backend": "inline"}],
               nics=[{"mac": "52:54:00:12:34:56", "tap": "tap0", "bridge": "br0"}], restart="always",
               max_restarts=3, restart_window_s=10, jail={"enabled": False})
    d = parse_definition(raw)
    again = parse_definition(d.to_dict())
    assert again == d
    assert parse_definition_json(d.to_json()) == d


def test_demo_kernel_literal_is_accepted_without_a_file() -> None:
    assert parse_definition({"name": "demo", "kernel": "demo"}).kernel == "demo"


def test_missing_nics_mac_is_generated_in_qemu_range(kernel: str) -> None:
    d = parse_definition(base(kernel, nics=[{}, {}]))
    assert all(n.mac.startswith("52:54:00:") for n in d.nics)
    assert d.nics[0].mac != d.nics[1].mac or True  # random; duplicates are astronomically rare
    assert generate_mac().startswith("52:54:00:")


@pytest.mark.parametrize("raw, expected", [
    ([], "definition: must be an object"),
    ({"kernel": "demo"}, "name: is required"),
    ({"name": "g1"}, "kernel: is required"),
    ({"name": "g1", "kernel": "demo", "bogus": 1}, "bogus: unknown key"),
])
def test_structure_errors_name_the_field(raw: Any, expected: str) -> None:
    assert any(expected in e for e in errors_of(raw))


@pytest.mark.parametrize("field, value, expected", [
    ("name", "", "name: must be 1-63 chars"),
    ("name", "Upper", "name: must be 1-63 chars"),
    ("name", "-lead", "name: must be 1-63 chars"),
    ("name", "a" * 64, "name: must be at most 63 bytes"),
    ("name", "a/b", "name: must be 1-63 chars"),
    ("name", 5, "name: must be a string"),
    ("vcpus", 0, "vcpus: must be between 1 and 32"),
    ("vcpus", 33, "vcpus: must be between 1 and 32"),
    ("vcpus", True, "vcpus: must be an integer, got boolean"),
    ("vcpus", 1.0, "vcpus: must be an integer, got number"),
    ("vcpus", "2", "vcpus: must be an integer, got string"),
    ("memory_mib", 15, "memory_mib: must be between 16 and 65536"),
    ("memory_mib", 65537, "memory_mib: must be between 16 and 65536"),
    ("kernel", "relative/vmlinuz", "kernel: must be an absolute path"),
    ("kernel", "/nonexistent/vmlinuz", "kernel: file does not exist"),
    ("kernel", "/", "kernel: must be a regular file or a block device"),
    ("kernel", "/a\x00b", "kernel: must not contain NUL"),
    ("kernel", "/" + "a" * 5000, "kernel: must be at most 4096 bytes"),
    ("kernel", None, "kernel: must be a string"),
    ("initrd", "/nonexistent", "initrd: file does not exist"),
    ("initrd", 3, "initrd: must be a string"),
    ("cmdline", "x" * 4097, "cmdline: must be at most 4096 bytes"),
    ("cmdline", "é" * 2049, "cmdline: must be at most 4096 bytes"),
    ("cmdline", "a\x00", "cmdline: must not contain NUL"),
    ("cmdline", "\udcff", "cmdline: must be valid UTF-8"),
    ("restart", "sometimes", "restart: must be one of never, on-failure, always"),
    ("max_restarts", -1, "max_restarts: must be between 0 and 1000"),
    ("restart_window_s", 0, "restart_window_s: must be between 1 and 86400"),
    ("jail", True, "jail: must be an object"),
    ("jail", {"enabled": "yes"}, "jail.enabled: must be a boolean"),
    ("jail", {"enabled": True, "x": 1}, "jail.x: unknown key"),
    ("disks", {}, "disks: must be an array"),
    ("disks", [{"path": "/x"}] * 17, "disks: at most 16 disks"),
    ("nics", "eth0", "nics: must be an array"),
    ("nics", [{}] * 9, "nics: at most 8 nics"),
])
def test_each_top_level_field_is_validated(kernel: str, field: str, value: Any, expected: str) -> None:
    errs = errors_of(base(kernel, **{field: value}))
    assert any(expected in e for e in errs), errs


@pytest.mark.parametrize("disk, expected", [
    ("not-an-object", "disks[0]: must be an object"),
    ({}, "disks[0].path: is required"),
    ({"path": "/nonexistent.img"}, "disks[0].path: file does not exist"),
    ({"path": "rel.img"}, "disks[0].path: must be an absolute path"),
    ({"path": "DISK", "read_only": "no"}, "disks[0].read_only: must be a boolean"),
    ({"path": "DISK", "serial": "x" * 21}, "disks[0].serial: must be at most 20 bytes"),
    ({"path": "DISK", "serial": "tab\there"}, "disks[0].serial: must be at most 20 printable ASCII"),
    ({"path": "DISK", "serial": "é"}, "disks[0].serial: must be at most 20 printable ASCII"),
    ({"path": "DISK", "backend": "qcow"}, "disks[0].backend: must be one of inline, vhost-user"),
    # vhost-user takes an image (daemon-managed back-end) or a socket (external one); a char device is neither.
    ({"path": "/dev/null", "backend": "vhost-user"}, "disks[0].path: must be an image (regular file or block"),
    ({"path": "DISK", "extra": 1}, "disks[0].extra: unknown key"),
])
def test_disk_fields_are_validated(kernel: str, tmp_path: Path, disk: Any, expected: str) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * 512)
    if isinstance(disk, dict) and disk.get("path") == "DISK":
        disk = {**disk, "path": str(img)}
    errs = errors_of(base(kernel, disks=[disk]))
    assert any(expected in e for e in errs), errs


def test_vhost_user_disk_accepts_a_unix_socket(kernel: str, tmp_path: Path) -> None:
    path = tmp_path / "vu.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    try:
        d = parse_definition(base(kernel, disks=[{"path": str(path), "backend": "vhost-user"}]))
        assert d.disks[0].backend == "vhost-user"
    finally:
        s.close()


@pytest.mark.parametrize("nic, expected", [
    (5, "nics[0]: must be an object"),
    ({"mac": "52:54:00:12:34"}, "nics[0].mac: must be six lower-case hex octets"),
    ({"mac": "52:54:00:12:34:ZZ"}, "nics[0].mac: must be six lower-case hex octets"),
    ({"mac": "01:00:5e:00:00:01"}, "nics[0].mac: must be a unicast address"),
    ({"mac": "00:00:00:00:00:00"}, "nics[0].mac: must not be all zeros"),
    ({"tap": "x" * 16}, "nics[0].tap: must be at most 15 bytes"),
    ({"tap": "a b"}, "nics[0].tap: must be an interface name"),
    ({"tap": "a/b"}, "nics[0].tap: must be an interface name"),
    ({"bridge": ""}, "nics[0].bridge: must be an interface name"),
    ({"bridge": 7}, "nics[0].bridge: must be a string"),
    ({"backend": "e1000"}, "nics[0].backend: must be one of"),
    ({"model": "virtio"}, "nics[0].model: unknown key"),
])
def test_nic_fields_are_validated(kernel: str, nic: Any, expected: str) -> None:
    errs = errors_of(base(kernel, nics=[nic]))
    assert any(expected in e for e in errs), errs


def test_duplicate_macs_are_refused(kernel: str) -> None:
    mac = "52:54:00:00:00:01"
    errs = errors_of(base(kernel, nics=[{"mac": mac}, {"mac": mac}]))
    assert any("nics[1].mac: duplicate MAC" in e for e in errs)


def test_all_errors_are_reported_at_once(kernel: str) -> None:
    errs = errors_of({"name": "BAD", "kernel": kernel, "vcpus": 0, "memory_mib": 1})
    assert len(errs) == 3


def test_check_paths_false_skips_existence_but_not_absoluteness() -> None:
    d = parse_definition({"name": "g", "kernel": "/nonexistent"}, check_paths=False)
    assert d.kernel == "/nonexistent"
    assert any("absolute" in e for e in errors_of({"name": "g", "kernel": "rel"}, check_paths=False))


def test_invalid_json_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="invalid JSON"):
        parse_definition_json(b"{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        parse_definition_json(b"[" * 100000)


def test_toml_file_with_relative_paths_is_resolved_against_its_directory(tmp_path: Path) -> None:
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "d.img").write_bytes(b"\0")
    f = tmp_path / "g.toml"
    f.write_text('name = "t1"\nkernel = "vmlinuz"\nvcpus = 2\n[[disks]]\npath = "d.img"\n')
    raw = load_definition_file(f)
    d = parse_definition(raw)
    assert d.kernel == str(tmp_path / "vmlinuz") and d.disks[0].path == str(tmp_path / "d.img")
    assert isinstance(d, GuestDefinition)


def test_toml_datetime_value_is_a_type_error(tmp_path: Path) -> None:
    f = tmp_path / "g.toml"
    f.write_text('name = "t1"\nkernel = "demo"\ncmdline = 1979-05-27\n')
    errs = errors_of(load_definition_file(f))
    assert any("cmdline: must be a string" in e for e in errs)


@pytest.mark.parametrize("content, suffix", [(b"{", ".json"), (b"name = ", ".toml"), (b"[1]", ".json"),
                                             (b"\xff\xfe", ".toml")])
def test_unparsable_definition_files_are_config_errors(tmp_path: Path, content: bytes, suffix: str) -> None:
    f = tmp_path / f"g{suffix}"
    f.write_bytes(content)
    with pytest.raises(ConfigError):
        load_definition_file(f)


def test_absolutize_leaves_absolute_demo_and_garbage_alone(tmp_path: Path) -> None:
    raw = {"kernel": "demo", "initrd": "/abs", "disks": [{"path": 5}, "x"]}
    assert absolutize_paths(raw, tmp_path) == raw
    assert os.path.isabs(absolutize_paths({"initrd": "i"}, tmp_path)["initrd"])
