"""Config mechanism #1's C half (kvmcore.fastrun.PciConfigAccel, attached by PciRoot.attach_accel) against the
Python PciConfigIo, its reference. Two identical buses (host bridge, a function with 32/64-bit memory and I/O BARs
and a capability with writable and W1C bits, a virtio-pci function with MSI-X and the PCI_CFG window, a function
that overrides write_config without declaring traps) get the same port accesses, random and targeted, hostile
ones included (straddling the data port, odd sizes, the enable bit clear, other buses and functions, absent
slots, BAR sizing, 0xCF9). Each access goes to the C handler first, exactly as kvmdm_run offers it, and to the
Python device only when C declines. After every access both sides must agree byte for byte: every function's
config space, the latch, all statistics, BAR mappings and every platform call. No /dev/kvm."""

from __future__ import annotations

import os
import random
import struct
import threading
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.pci import config as c
from devices.pci.config import BarSpec, BarType, PciConfiguration
from devices.pci.device import PciDevice
from devices.pci.root import PciConfigIo, PciConfigMmio, PciRoot
from devices.pci.testing import FakePlatform
from devices.virtio_pci import VirtioPciDevice
from kvmcore import fastrun
from kvmcore.memory import GuestMemory
from pv.device import VIRTIO_F_VERSION_1, VIRTIO_ID_RNG, DeviceHealth, QueueConfig, VirtioDevice

pytestmark = pytest.mark.skipif(not fastrun.AVAILABLE, reason="the C fast path could not be built")


class Func(PciDevice):
    """BARs 0 (MEM32), 2 (MEM64), 4 (IO); a vendor capability with writable bytes; W1C status bits set."""

    def __init__(self, platform: FakePlatform) -> None:
        cfg = PciConfiguration(vendor_id=0xABCD, device_id=0x0001, class_code=0xFF, subclass=0, interrupt_pin=1)
        cfg.add_bar(BarSpec(0, 0x1000, BarType.MEM32))
        cfg.add_bar(BarSpec(2, 0x10000, BarType.MEM64, prefetchable=True))
        cfg.add_bar(BarSpec(4, 0x20, BarType.IO))
        cfg.add_capability(bytes([0x09, 0, 8, 0x11, 0x22, 0x33, 0x44, 0x55]), bytes([0, 0, 0, 0xFF, 0x0F, 0, 0xFF, 0]))
        cfg.set_status_error_bits(c.STATUS_W1C)
        super().__init__(cfg, platform)
        self.moves: list[tuple[int, int | None, int | None]] = []

    def on_bar_moved(self, bar: int, old: int | None, new: int | None) -> None:
        self.moves.append((bar, old, new))


class Noisy(PciDevice):
    """Overrides write_config (a side effect on every write) but declares no traps: must be trapped whole."""

    def __init__(self) -> None:
        cfg = PciConfiguration(vendor_id=0x1234, device_id=0x5678, class_code=0x02, subclass=0)
        cfg.set_writable_bits(0x40, 0xFFFF_FFFF)
        super().__init__(cfg, None)
        self.seen: list[tuple[int, bytes]] = []
        self.during_write: Callable[[], None] | None = None

    def write_config(self, offset: int, data: bytes | memoryview) -> None:
        self.seen.append((offset, bytes(data)))
        if self.during_write is not None:
            self.during_write()
        super().write_config(offset, data)


class Rng(VirtioDevice):
    device_type = VIRTIO_ID_RNG
    queue_max_sizes = (64,)

    def device_features(self) -> int:
        return 1 << VIRTIO_F_VERSION_1

    def ack_features(self, features: int) -> None:
        return None

    def read_config(self, offset: int, data: memoryview) -> None:
        return None

    def write_config(self, offset: int, data: bytes | memoryview) -> None:
        return None

    def activate(self, mem: GuestMemory, queues: list[QueueConfig], health: DeviceHealth) -> None:
        return None

    def reset(self) -> None:
        return None


class Side:
    def __init__(self, mem: GuestMemory, accel: bool) -> None:
        self.plats = [FakePlatform(), FakePlatform()]
        self.root = PciRoot()
        self.func = Func(self.plats[0])
        self.vdev = VirtioPciDevice(Rng(), mem, self.plats[1])
        self.noisy = Noisy()
        self.root.add_device(self.func, 1)
        self.root.add_device(self.vdev, 2)
        if accel:
            self.acc: fastrun.PciConfigAccel | None = fastrun.PciConfigAccel()
            self.root.attach_accel(self.acc)
            self.root.add_device(self.noisy, 4)  # after attaching: add_device registers it with the C half too
        else:
            self.acc = None
            self.root.add_device(self.noisy, 4)
        self.resets = 0
        self.io = PciConfigIo(self.root, on_reset=self._reset)
        self.ecam = PciConfigMmio(self.root)

    def _reset(self) -> None:
        self.resets += 1

    def state(self) -> dict[str, object]:
        out: dict[str, object] = {
            "address": self.io.address, "bad": self.io.bad_accesses, "resets": self.resets,
            "root": vars(self.root.stats), "noisy": list(self.noisy.seen), "moves": list(self.func.moves),
            "calls": [list(p.calls) for p in self.plats],
        }
        for slot, dev in self.root.devices():
            out[f"cfg{slot}"] = bytes(dev.config.register_file()[0])
            out[f"stats{slot}"] = vars(dev.config.stats)
            out[f"mapped{slot}"] = dict(dev._mapped)
        out["msix"] = (self.vdev.msix.enabled, self.vdev.msix.function_masked)
        return out


class Pair:
    def __init__(self, mem_ref: GuestMemory, mem_fast: GuestMemory) -> None:
        self.ref = Side(mem_ref, accel=False)
        self.fast = Side(mem_fast, accel=True)
        assert self.fast.acc is not None
        self.acc = self.fast.acc
        self.c_done = 0

    def close(self) -> None:
        self.ref.vdev.close()
        self.fast.vdev.close()

    def read(self, off: int, size: int) -> bytes:
        a = bytearray(size)
        self.ref.io.read(off, memoryview(a))
        b = bytearray(size)
        if self.acc.io(off, False, b):
            self.c_done += 1
        else:
            self.fast.io.read(off, memoryview(b))
        assert a == b, f"read +{off} size {size} at 0x{self.ref.io.address:08x}: {a.hex()} vs {b.hex()}"
        return bytes(a)

    def write(self, off: int, data: bytes) -> None:
        self.ref.io.write(off, data)
        if self.acc.io(off, True, bytearray(data)):
            self.c_done += 1
        else:
            self.fast.io.write(off, data)

    def ecam_write(self, offset: int, data: bytes) -> None:
        self.ref.ecam.write(offset, data)
        self.fast.ecam.write(offset, data)

    def ecam_read(self, offset: int, size: int) -> None:
        a, b = bytearray(size), bytearray(size)
        self.ref.ecam.read(offset, memoryview(a))
        self.fast.ecam.read(offset, memoryview(b))
        assert a == b

    def select(self, bus: int, slot: int, fn: int, reg: int, enable: bool = True) -> None:
        self.write(0, struct.pack("<I", (enable << 31) | bus << 16 | slot << 11 | fn << 8 | reg))

    def check(self) -> None:
        assert self.fast.state() == self.ref.state()


@pytest.fixture
def mems() -> Iterator[tuple[GuestMemory, GuestMemory]]:
    a, b = GuestMemory.create([(0, 1 << 20)]), GuestMemory.create([(0, 1 << 20)])
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def pair(mems: tuple[GuestMemory, GuestMemory]) -> Iterator[Pair]:
    p = Pair(*mems)
    yield p
    p.close()


# ---------------------------------------------------------------- targeted

def test_enumeration_reads_are_served_in_c_including_absent_functions(pair: Pair) -> None:
    # What Linux's pci_scan_bus does: the vendor/device dword of every device and function on bus 0.
    for slot in range(32):
        for fn in range(8):
            pair.select(0, slot, fn, 0)
            pair.read(4, 4)
            pair.check()
    # Every latch write and every read but one: slot 4's function overrides an accessor without declaring its
    # traps, so all of its config space goes to Python.
    assert pair.c_done == 2 * 32 * 8 - 1
    assert pair.fast.root.stats.absent_reads == 32 * 8 - 4


def test_latch_reads_back_without_reserved_bits_and_other_sizes_at_cf8_are_python(pair: Pair) -> None:
    pair.write(0, b"\xff\xff\xff\xff")
    assert pair.read(0, 4) == b"\xfc\xff\xff\xff"
    n = pair.c_done
    pair.write(0, b"\x12\x34")  # a word at 0xCF8 is not CONFIG_ADDRESS: Python counts it
    pair.read(0, 1)
    pair.read(2, 2)
    assert pair.c_done == n
    pair.check()
    assert pair.fast.io.bad_accesses == 3


def test_bar_sizing_and_placement_go_through_python_and_move_the_mapping(pair: Pair) -> None:
    pair.select(0, 1, 0, c.BAR0)
    n = pair.c_done
    pair.write(4, b"\xff\xff\xff\xff")  # a BAR write: trapped
    assert pair.c_done == n
    assert pair.read(4, 4) == struct.pack("<I", 0xFFFF_F000)  # the sized value, read in C from the register file
    assert pair.c_done == n + 1
    pair.write(4, struct.pack("<I", 0xE000_0000))
    pair.select(0, 1, 0, c.COMMAND)
    pair.write(4, struct.pack("<H", c.CMD_MEMORY_SPACE))
    pair.check()
    assert pair.fast.func.bar_mapping(0) == 0xE000_0000


def test_plain_scratch_registers_are_written_in_c_with_the_write_masks(pair: Pair) -> None:
    pair.select(0, 1, 0, c.CACHE_LINE_SIZE)
    n = pair.c_done
    pair.write(4, b"\xff\xff\xff\xff")  # only cache line size and latency timer are writable
    pair.write(7, b"\x80")  # BIST/header type byte: read-only
    assert pair.c_done == n + 2
    assert pair.read(4, 4)[:2] == b"\xff\xff"
    pair.select(0, 1, 0, c.INTERRUPT_LINE)
    pair.write(4, b"\x0b")
    pair.check()
    assert pair.fast.func.config.interrupt_line == 0x0B


def test_status_w1c_bits_clear_only_where_ones_are_written(pair: Pair) -> None:
    pair.select(0, 1, 0, c.COMMAND)
    pair.write(6, struct.pack("<H", 1 << 13))  # STATUS lives in the command dword: trapped, Python clears it
    pair.check()
    assert not pair.fast.func.config.status & (1 << 13)
    assert pair.fast.func.config.status & (1 << 14)


def test_capability_bytes_honour_their_writable_mask(pair: Pair) -> None:
    cap = c.FIRST_CAPABILITY
    pair.select(0, 1, 0, cap)
    pair.write(4, b"\xff\xff\xff\xff")  # ID and next pointer are read-only; byte 3 writable
    pair.select(0, 1, 0, cap + 4)
    pair.write(4, b"\xff\xff\xff\xff")  # byte 4 low nibble, byte 6
    pair.write(5, b"\x00\x00")
    pair.check()


def test_virtio_msix_control_and_pci_cfg_window_are_trapped(pair: Pair) -> None:
    v = pair.fast.vdev
    reads, writes = v.config_traps()
    assert writes >> ((v.msix_cap_offset + 2) // 4) & 1
    assert v.pci_cfg_cap_offset is not None and reads >> ((v.pci_cfg_cap_offset + 16) // 4) & 1
    pair.select(0, 2, 0, v.msix_cap_offset)
    n = pair.c_done
    pair.write(6, struct.pack("<H", 0x8000))  # MSI-X enable: Python, which updates the MSI-X state
    assert pair.c_done == n
    pair.read(6, 2)  # reading message control has no side effect: C
    assert pair.c_done == n + 1
    pair.select(0, 2, 0, v.pci_cfg_cap_offset + 16)
    n = pair.c_done
    pair.read(4, 4)  # a PCI_CFG window read reaches BAR 0: Python
    assert pair.c_done == n
    pair.check()
    assert v.msix.enabled


def test_a_device_overriding_write_config_without_traps_sees_every_write(pair: Pair) -> None:
    pair.select(0, 4, 0, 0x40)
    for k in range(4):
        pair.write(4 + k, bytes((k,)))
    pair.check()
    assert pair.fast.noisy.seen == [(0x40 + k, bytes((k,))) for k in range(4)]


@pytest.mark.parametrize(("off", "size"), [(5, 4), (6, 4), (7, 2), (7, 4), (4, 3), (4, 8), (4, 0), (3, 1), (1, 4)])
def test_straddling_and_odd_accesses_are_declined_by_c(pair: Pair, off: int, size: int) -> None:
    pair.select(0, 1, 0, 0)
    n = pair.c_done
    pair.read(off, size)
    pair.write(off, bytes(range(size)))
    assert pair.c_done == n
    pair.check()


def test_data_port_with_the_enable_bit_clear_reads_all_ones_and_drops_writes(pair: Pair) -> None:
    pair.select(0, 1, 0, c.CACHE_LINE_SIZE, enable=False)
    pair.write(4, b"\x20")
    assert pair.read(4, 4) == b"\xff" * 4
    pair.check()
    assert pair.fast.root.stats.absent_reads == 0


def test_reset_control_at_cf9_is_python(pair: Pair) -> None:
    n = pair.c_done
    assert pair.read(1, 1) == b"\x00"
    pair.write(1, bytes((0x06,)))
    assert pair.c_done == n
    pair.check()
    assert pair.fast.resets == 1


def test_removing_a_function_makes_c_read_it_as_absent_and_keeps_its_counts(pair: Pair) -> None:
    pair.select(0, 4, 0, 0)
    pair.read(4, 4)
    for side in (pair.ref, pair.fast):
        side.root.remove_device(4)
    assert pair.read(4, 4) == b"\xff" * 4
    assert pair.fast.noisy.config.stats.reads == 1
    pair.check()


# ---------------------------------------------------------------- random

_SLOTS = [0, 1, 2, 3, 4, 31]
_VALUES = [0, 0xFFFF_FFFF, 0xE000_0000, 0xC001, 0x0000_0007, 0x0000_0406, 0x8000_0000, 0xFFFF_0000]


def _random_op(rng: random.Random, pair: Pair) -> None:
    r = rng.random()
    if r < 0.25:  # a new CONFIG_ADDRESS, usually a sensible one
        bus = 0 if rng.random() < 0.9 else rng.randrange(256)
        fn = 0 if rng.random() < 0.85 else rng.randrange(8)
        reg = rng.randrange(0, 256, 4) if rng.random() < 0.9 else rng.randrange(256)
        pair.select(bus, rng.choice(_SLOTS), fn, reg, enable=rng.random() < 0.95)
        return
    if r < 0.3:
        pair.read(0, 4)
        return
    if r < 0.33:  # ECAM, which shares the functions (and the lock) with mechanism #1
        off = rng.choice(_SLOTS) << 15 | rng.randrange(256) & ~3
        if rng.random() < 0.5:
            pair.ecam_write(off, struct.pack("<I", rng.choice(_VALUES)))
        else:
            pair.ecam_read(off, 4)
        return
    if rng.random() < 0.92:
        size = rng.choice([1, 2, 4])
        off = 4 + rng.randrange(0, 4, size)
    else:  # hostile: any offset of the 8 ports, any size
        size = rng.choice([0, 1, 2, 3, 4, 8])
        off = rng.randrange(8)
    if r < 0.65:
        pair.read(off, size)
        return
    value = rng.choice(_VALUES) if rng.random() < 0.6 else rng.getrandbits(32)
    data = (value.to_bytes(8, "little") * 2)[:size]
    if off == 1 and size == 1:
        data = bytes((data[0] & ~0x04,))  # no resets in the random run (counted above, but noisy)
    pair.write(off, data)


@pytest.mark.parametrize("seed", range(5))
def test_random_sequences_match_the_reference_after_every_access(mems: tuple[GuestMemory, GuestMemory],
                                                                seed: int) -> None:
    rng = random.Random(seed)
    p = Pair(*mems)
    try:
        for _ in range(2500):
            _random_op(rng, p)
            p.check()
        assert p.c_done > 1000  # C really answered most of them
    finally:
        p.close()


_hop = st.one_of(
    st.tuples(st.just("sel"), st.sampled_from(_SLOTS), st.integers(0, 255)),
    st.tuples(st.just("r"), st.integers(0, 7), st.sampled_from([1, 2, 4, 0, 3])),
    st.tuples(st.just("w"), st.integers(0, 7), st.sampled_from([1, 2, 4, 3]), st.sampled_from(_VALUES)),
)


# KVMDM_FUZZ_EXAMPLES=20000 for a deep run; CI runs the default.
@settings(max_examples=int(os.environ.get("KVMDM_FUZZ_EXAMPLES", "150")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(_hop, max_size=60))
def test_generated_sequences_match_the_reference(mems: tuple[GuestMemory, GuestMemory], ops: list[tuple]) -> None:
    p = Pair(*mems)
    try:
        for op in ops:
            if op[0] == "sel":
                p.select(0, op[1], 0, op[2])
            elif op[0] == "r":
                p.read(op[1], op[2])
            else:
                _k, off, size, value = op
                if off == 1:
                    value &= ~0x04
                p.write(off, value.to_bytes(4, "little")[:size])
            p.check()
    finally:
        p.close()


@pytest.mark.parametrize("path", ["mechanism1", "ecam"])
def test_a_python_config_access_excludes_the_c_half_until_it_is_done(pair: Pair, path: str) -> None:
    # Python's config accesses (the ones C declined, and every ECAM access) hold the C half's mutex, so a vCPU in
    # the C loop can never see, or write into, a register file in the middle of a Python write. Probe: from
    # inside a device's write_config, a C access on another thread must wait until the Python access returns.
    acc, side = pair.acc, pair.fast
    blocked: list[bool] = []
    probe: list[threading.Thread] = []

    def during() -> None:
        t = threading.Thread(target=lambda: acc.io(0, False, bytearray(4)))
        t.start()
        t.join(0.2)
        blocked.append(t.is_alive())
        probe.append(t)

    side.noisy.during_write = during
    if path == "ecam":
        side.ecam.write(4 << 15 | 0x40, b"\x01")
    else:
        assert acc.io(0, True, bytearray(struct.pack("<I", 0x8000_0000 | 4 << 11 | 0x40)))
        assert not acc.io(4, True, bytearray(b"\x01"))  # the device traps it: Python's
        side.io.write(4, b"\x01")
    probe[0].join(5)
    assert blocked == [True] and not probe[0].is_alive()
