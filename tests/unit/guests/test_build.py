"""guests.build: building, caching, errors, and the properties of the image the loaders rely on."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from guests import build
from guests.build import (
    GuestBuildError,
    build_demo,
    build_guest,
    default_out_dir,
    guest_names,
    resolve_source,
)

MB_HEADER_MAGIC = 0x1BADB002
MB_SEARCH_BYTES = 8192  # Multiboot spec 3.1.1: the header lies within the first 8 KiB
EM_386 = 3
ALL_GUESTS = ["acpi", "bare_iopl", "hammer", "hello", "loop", "pio_mmio", "reset", "triple", "uart_irq", "virtio_blk", "virtio_net",
              "virtio_net_blast"]

requires_binutils = pytest.mark.skipif(
    shutil.which("as") is None or shutil.which("ld") is None, reason="GNU binutils (as, ld) not installed"
)


def _minimal_guest(tmp_path: Path, name: str = "mini", body: str = "    xorl %eax, %eax\n    ret\n") -> Path:
    src = tmp_path / f"{name}.S"
    src.write_text('.include "rt.inc"\n.text\n.code64\n.globl guest_main\nguest_main:\n' + body)
    return src


def test_guest_names_lists_the_demo_and_every_test_guest() -> None:
    assert guest_names() == ALL_GUESTS


def test_resolve_source_finds_the_demo_and_test_guests_by_name() -> None:
    assert resolve_source("hello") == build.DEMO_SOURCE
    assert resolve_source("loop") == build.TEST_GUESTS_DIR / "loop.S"


@pytest.mark.parametrize("name", ["boot", "rt", "nonexistent"])
def test_resolve_source_rejects_names_that_are_not_guests(name: str) -> None:
    with pytest.raises(GuestBuildError, match=f"unknown guest '{name}'"):
        resolve_source(name)


def test_resolve_source_rejects_a_missing_path(tmp_path: Path) -> None:
    with pytest.raises(GuestBuildError, match="does not exist"):
        resolve_source(tmp_path / "missing.S")


def test_default_out_dir_honours_kvmdm_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVMDM_CACHE", str(tmp_path))
    assert default_out_dir() == tmp_path / "guests"
    monkeypatch.delenv("KVMDM_CACHE")
    assert default_out_dir() == Path("~/.cache/kvmdm/guests").expanduser()


@requires_binutils
@pytest.mark.parametrize("name", ALL_GUESTS)
def test_every_guest_is_a_multiboot_elf32_for_i386_at_1_mib(name: str, tmp_path: Path) -> None:
    data = build_guest(name, tmp_path).read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 1  # ELFCLASS32: QEMU loads only ELF32 multiboot kernels
    e_type, e_machine, _, e_entry, e_phoff = struct.unpack_from("<HHIII", data, 16)
    assert (e_type, e_machine) == (2, EM_386)
    assert 0x100000 <= e_entry < 0x200000
    # Program headers: every PT_LOAD at or above 1 MiB, physical == virtual (the loaders use p_paddr).
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 42)
    loads = []
    for i in range(e_phnum):
        p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz = struct.unpack_from(
            "<IIIIII", data, e_phoff + i * e_phentsize
        )
        if p_type == 1:
            loads.append((p_vaddr, p_paddr, p_filesz, p_memsz))
    assert loads and all(v == p and v >= 0x100000 and m >= f for v, p, f, m in loads)
    # Multiboot header: 4-byte aligned in the first 8 KiB; flags = page-align + memory info, no bit 16.
    for offset in range(0, MB_SEARCH_BYTES, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, offset)
        if magic == MB_HEADER_MAGIC:
            break
    else:
        pytest.fail("no multiboot header in the first 8 KiB")
    assert flags == 0x3
    assert (magic + flags + checksum) & 0xFFFFFFFF == 0


@requires_binutils
@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not installed")
@pytest.mark.parametrize("name", ALL_GUESTS)
def test_guests_avoid_instructions_kvm_pvm_cannot_run(name: str, tmp_path: Path) -> None:
    # ENVIRONMENT.md: KVM's emulator on the project hosts stops at cmpxchg16b, xsave and int3; SSE
    # state is not enabled (CR4.OSFXSR clear), and software interrupts at CPL3 become #UD.
    disassembly = subprocess.run(
        ["objdump", "-d", "-M", "x86-64", str(build_guest(name, tmp_path))],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    mnemonics = {line.split("\t")[2].split()[0] for line in disassembly.splitlines() if line.count("\t") >= 2}
    forbidden = {"int3", "xsave", "xsaveopt", "xrstor", "cmpxchg16b", "int", "syscall", "sysenter"}
    assert not (mnemonics & forbidden)
    assert not any("xmm" in line or "ymm" in line for line in disassembly.splitlines())


@requires_binutils
def test_build_is_cached_until_an_input_changes(tmp_path: Path) -> None:
    src = _minimal_guest(tmp_path)
    out = tmp_path / "out"
    first = build_guest(src, out)
    stamp = first.with_name(first.name + ".sha256").read_text()
    mtime = first.stat().st_mtime_ns
    assert build_guest(src, out) == first
    assert first.stat().st_mtime_ns == mtime  # not rebuilt

    src.write_text(src.read_text().replace("xorl %eax, %eax", "movl $1, %eax"))
    assert build_guest(src, out) == first
    assert first.with_name(first.name + ".sha256").read_text() != stamp


@requires_binutils
def test_a_damaged_cached_elf_is_rebuilt(tmp_path: Path) -> None:
    src = _minimal_guest(tmp_path)
    elf = build_guest(src, tmp_path / "out")
    good = elf.read_bytes()
    elf.with_name(elf.name + ".sha256").write_text("stale\n")
    elf.write_bytes(b"junk")
    assert build_guest(src, tmp_path / "out").read_bytes() == good


@requires_binutils
def test_build_uses_the_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVMDM_CACHE", str(tmp_path))
    assert build_demo() == tmp_path / "guests" / "hello.elf"


@requires_binutils
def test_assembler_error_is_a_one_line_guest_build_error_with_stderr(tmp_path: Path) -> None:
    src = _minimal_guest(tmp_path, "broken", "    movq %rax, %nosuchreg\n")
    with pytest.raises(GuestBuildError) as info:
        build_guest(src, tmp_path / "out")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("assembling broken.S failed (exit 1): ")
    assert "nosuchreg" in message and "nosuchreg" in info.value.stderr


@requires_binutils
def test_undefined_guest_main_is_a_link_error(tmp_path: Path) -> None:
    src = tmp_path / "nomain.S"
    src.write_text(".text\nnop\n")
    with pytest.raises(GuestBuildError, match=r"linking nomain.elf failed .*guest_main"):
        build_guest(src, tmp_path / "out")


def test_missing_toolchain_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no `as`, no `ld`
    with pytest.raises(GuestBuildError, match=r"toolchain missing: 'as' not found"):
        build_guest("hello", tmp_path / "out")


@requires_binutils
def test_cli_prints_the_elf_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert build.main(["loop", "--out-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'loop.elf'}\n"


def test_cli_reports_errors_on_stderr_with_status_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert build.main(["no_such_guest"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: unknown guest 'no_such_guest'")


@requires_binutils
def test_cli_runs_as_a_module(tmp_path: Path) -> None:
    env = {**os.environ, "KVMDM_CACHE": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "guests.build", "hello"],
        capture_output=True, text=True, env=env, cwd=Path(build.__file__).parent.parent, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{tmp_path / 'guests' / 'hello.elf'}\n"


@requires_binutils
def test_standalone_guest_is_linked_without_the_runtime(tmp_path: Path) -> None:
    # KVMDM_STANDALONE: its own _start and no guest_main; with the runtime linked in, _start would clash.
    src = tmp_path / "alone.S"
    src.write_text("/* KVMDM_STANDALONE */\n.section .multiboot, \"a\"\n.align 4\n"
                   ".long 0x1BADB002, 0, -0x1BADB002\n.text\n.code32\n.globl _start\n_start:\n    hlt\n")
    assert build.is_standalone(src)
    elf = build_guest(src, tmp_path / "out")
    symbols = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout
    assert " _start" in symbols and "rt_user_entry" not in symbols
