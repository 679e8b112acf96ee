"""Debian's real bzImage against our Linux boot-protocol loader (Documentation/arch/x86/boot.rst).

Fast tests load the image into GuestMemory and check the zero page against the kernel's own setup header.
The slow test boots it under kvmdm: on this project's machines (nested kvm_pvm, CPL0 code runs in KVM's
instruction emulator) the kernel's decompressor alone takes ~100 s, about as long as under QEMU-KVM, before
"Linux version" appears; stock Linux then stops with a KVM emulation failure (lock cmpxchg16b, in mm_init,
~50 s later), so the test stops as soon as the kernel has shown it read our boot_params (banner, command line,
e820 map, RAMDISK). The same kernel and initrd under QEMU-TCG must reach GUEST-READY (validates the fixture).
"""

from __future__ import annotations

import os
import re
import struct
import time

import pytest

from daemon.vmm import MachineConfig, Vmm
from kvmcore import layout
from kvmcore.loader import linux
from kvmcore.loader.errors import ImageTooLarge
from kvmcore.memory import GuestMemory
from tests.fixtures.linux_guest import require_linux_guest
from tests.interop.linux_harness import guest_exit_rc, guest_ready, run_linux_tcg

MIB = 1 << 20
CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0,115200 nokaslr panic=-1"  # nokaslr: skip ~15 s of relocs
# Cap for the kvmdm boot, not a speed target: the banner shows after ~100 s on an idle machine here and the test
# ends as soon as RAMDISK is printed; a busy CI host took > 150 s (ec18e24), so the cap is generous.
BOOT_TIMEOUT = float(os.environ.get("KVMDM_LINUX_BOOT_TIMEOUT", "900"))


@pytest.fixture(scope="module")
def real_guest(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    vmlinuz, initrd = require_linux_guest(tmp_path_factory.mktemp("linux-guest"))
    return vmlinuz.read_bytes(), initrd.read_bytes()


def kernel_version_string(image: bytes) -> str:
    """The kernel_version string the setup header points at (boot.rst: offset 0x20E, + 0x200)."""
    ptr = struct.unpack_from("<H", image, 0x20E)[0] + 0x200
    return image[ptr : image.index(b"\0", ptr)].decode()


def assert_banner_matches(console: str, image: bytes) -> None:
    """The "Linux version" line is the banner of the image we loaded: same release and build stamp as its
    setup header's kernel_version string (which leaves out the compiler part the banner has)."""
    version = kernel_version_string(image)
    release, build = version.split()[0], version[version.index("#"):]
    m = re.search(r"Linux version (\S+) .*", console)
    assert m is not None, f"no 'Linux version' banner; output ends:\n{console[-1500:]}"
    assert m.group(1) == release and m.group(0).rstrip().endswith(build), (m.group(0), version)


def e820_from_boot_params(bp: bytes) -> list[tuple[int, int, int]]:
    n = bp[linux.OFF_E820_ENTRIES]
    return [struct.unpack_from("<QQI", bp, linux.OFF_E820_TABLE + 20 * i) for i in range(n)]


# ---------------------------------------------------------------------------------------------- fast: the loader
def test_real_bzimage_boot_params_copy_the_kernels_setup_header(real_guest: tuple[bytes, bytes]) -> None:
    image, initrd = real_guest
    hdr = linux.parse_setup_header(image)
    assert hdr.version >= 0x020C and hdr.xloadflags & linux.XLF_KERNEL_64
    with GuestMemory.create(layout.ram_layout(512 * MIB)) as mem:
        lk = linux.load_linux(mem, image, CMDLINE, initrd)
        bp = mem.read(linux.BOOT_PARAMS_ADDR, 4096)
        owned = ({linux.OFF_TYPE_OF_LOADER, linux.OFF_LOADFLAGS}
                 | set(range(linux.OFF_RAMDISK_IMAGE, linux.OFF_RAMDISK_IMAGE + 8))
                 | set(range(linux.OFF_HEAP_END_PTR, linux.OFF_CMD_LINE_PTR + 4)))
        for off in range(linux.OFF_SETUP_SECTS, hdr.header_end):
            if off not in owned:
                assert bp[off] == image[off], f"setup header byte 0x{off:x} differs from the kernel's"
        assert bp[linux.OFF_TYPE_OF_LOADER] == 0xFF
        assert bp[linux.OFF_LOADFLAGS] == image[linux.OFF_LOADFLAGS] | linux.CAN_USE_HEAP
        # The protected-mode kernel: everything after the setup sectors, at 1 MiB; 64-bit entry at +0x200.
        pm = image[(hdr.setup_sects + 1) * 512 :]
        assert mem.read(linux.KERNEL_ADDR, len(pm)) == pm
        assert lk.entry64 == linux.KERNEL_ADDR + 0x200 and lk.boot_params == linux.BOOT_PARAMS_ADDR
        cmd_ptr = struct.unpack_from("<I", bp, linux.OFF_CMD_LINE_PTR)[0]
        assert mem.read(cmd_ptr, len(CMDLINE) + 1) == CMDLINE.encode() + b"\0"
        addr, size = struct.unpack_from("<II", bp, linux.OFF_RAMDISK_IMAGE)
        assert (addr, size) == lk.initrd and size == len(initrd) and addr % 4096 == 0
        assert addr + size <= hdr.initrd_addr_max + 1
        # Above the memory the decompressor uses: pref_address + init_size (boot.rst protocol 2.10).
        pref, init_size = struct.unpack_from("<Q", image, 0x258)[0], struct.unpack_from("<I", image, 0x260)[0]
        assert addr >= max(linux.KERNEL_ADDR, pref) + init_size
        assert mem.read(addr, size) == initrd


def test_real_bzimage_e820_map_is_sorted_and_covers_kernel_and_initrd(real_guest: tuple[bytes, bytes]) -> None:
    image, initrd = real_guest
    with GuestMemory.create(layout.ram_layout(512 * MIB)) as mem:
        lk = linux.load_linux(mem, image, "", initrd)
        table = e820_from_boot_params(mem.read(linux.BOOT_PARAMS_ADDR, 4096))
    assert table == [(0, 0x9FC00, linux.E820_RAM), (0x9FC00, 0x400, linux.E820_RESERVED),
                     (0xE0000, 0x20000, linux.E820_RESERVED), (linux.KERNEL_ADDR, 511 * MIB, linux.E820_RAM)]
    assert all(a + s <= b for (a, s, _), (b, _, _) in zip(table, table[1:], strict=False)), table
    ram = [(a, a + s) for a, s, t in table if t == linux.E820_RAM]
    assert lk.initrd is not None
    for start, end in [(linux.KERNEL_ADDR, lk.kernel_end), (lk.initrd[0], lk.initrd[0] + lk.initrd[1]),
                       (linux.BOOT_PARAMS_ADDR, linux.BOOT_PARAMS_ADDR + 4096)]:
        assert any(a <= start and end <= b for a, b in ram), f"[{start:#x}, {end:#x}) is not in e820 RAM"


def test_real_bzimage_initrd_inside_the_decompression_area_is_rejected(real_guest: tuple[bytes, bytes]) -> None:
    # 64 MiB of RAM: the initrd would sit at ~63 MiB, inside [16 MiB, 16 MiB + init_size (~51 MiB)), where the
    # decompressor writes the kernel before it reads the ramdisk fields.
    image, initrd = real_guest
    with GuestMemory.create(layout.ram_layout(64 * MIB)) as mem, pytest.raises(ImageTooLarge, match="init_size"):
        linux.load_linux(mem, image, "", initrd)
    with GuestMemory.create(layout.ram_layout(96 * MIB)) as mem:  # enough room: loads
        assert linux.load_linux(mem, image, "", initrd).initrd is not None


# ------------------------------------------------------------------------------------------- QEMU-TCG reference
@pytest.mark.qemu
def test_same_kernel_and_initrd_reach_guest_ready_under_qemu_tcg(tmp_path_factory: pytest.TempPathFactory) -> None:
    vmlinuz, initrd = require_linux_guest(tmp_path_factory.mktemp("linux-guest-tcg"), "uname -r\n")
    # loglevel=7 after the harness's "quiet" and before earlyprintk (whose console replays the log at the
    # loglevel in force when it registers): the banner is a KERN_NOTICE message.
    status, console = run_linux_tcg(vmlinuz, initrd, append="loglevel=7 earlyprintk=serial,ttyS0,115200",
                                    timeout=60)
    assert_banner_matches(console, vmlinuz.read_bytes())
    assert guest_ready(console) is not None, console[-1500:]
    release = kernel_version_string(vmlinuz.read_bytes()).split()[0]
    assert release in console.split("GUEST-READY", 1)[1]  # uname -r from the test script
    assert guest_exit_rc(console) == 0 and status == 0, console[-1500:]


# -------------------------------------------------------------------------------------------- slow: kvmdm boots it
class _Console:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def text(self) -> str:
        return bytes(self.data).decode("utf-8", errors="backslashreplace").replace("\r\n", "\n")


@pytest.mark.kvm
@pytest.mark.slow
def test_debian_kernel_under_kvmdm_prints_banner_and_reads_our_boot_params(
        real_guest: tuple[bytes, bytes]) -> None:
    image, initrd = real_guest
    out = _Console()
    vmm = Vmm(MachineConfig(mem_size=512 * MIB, kernel=image, initrd=initrd, cmdline=CMDLINE),
              serial_sink=out).build()
    reason = None
    t0 = time.monotonic()
    banner_at: float | None = None
    try:
        vmm.finish()
        vmm.start()
        # "RAMDISK:" comes ~1 s of guest time after the banner (setup_arch -> reserve_initrd): by then the
        # kernel has printed everything it took from boot_params.
        while reason is None and b"RAMDISK: [mem" not in out.data and time.monotonic() - t0 < BOOT_TIMEOUT:
            reason = vmm.wait(0.25)
            if banner_at is None and b"Linux version" in out.data:
                banner_at = time.monotonic() - t0
        elapsed = time.monotonic() - t0
        vmm.stop(reason)
        assert vmm.mem is not None
        lk_initrd = struct.unpack_from("<II", vmm.mem.read(linux.BOOT_PARAMS_ADDR + linux.OFF_RAMDISK_IMAGE, 8))
        table = linux.e820_map(vmm.mem)
    finally:
        vmm.close()
    text = out.text()
    tail = "\n".join(text.splitlines()[-15:])
    print(f"\nkvmdm Linux boot: banner after {banner_at} s, stopped after {elapsed:.1f} s ({reason}); last lines:\n"
          f"{tail}")
    assert banner_at is not None, f"no 'Linux version' banner within {elapsed:.0f} s ({reason}); output:\n{tail}"
    assert_banner_matches(text, image)
    assert f"Command line: {CMDLINE}" in text, tail
    # The kernel echoes our e820 table (arch/x86/kernel/e820.c e820__print_table: end is inclusive).
    for base, size, typ in table:
        kind = "usable" if typ == linux.E820_RAM else "reserved"
        assert re.search(rf"BIOS-e820: \[mem {base:#018x}-{base + size - 1:#018x}\] {kind}", text), (base, text)
    addr, size = lk_initrd
    end = (addr + size + 4095) & ~4095  # reserve_initrd prints the page-aligned end
    assert f"RAMDISK: [mem {addr:#010x}-{end - 1:#010x}]" in text, tail
    assert reason is None, f"guest stopped early: {reason}"
