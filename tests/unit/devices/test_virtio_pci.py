"""The modern virtio-pci transport driven like a guest driver would (virtio 1.2 §4.1), against a FakePlatform."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.bus import pio_bus
from devices.pci import config as c
from devices.pci.msix import MSG_CTL_ENABLE, MSG_CTL_FUNCTION_MASK
from devices.pci.root import CONFIG_IO_PORT, CONFIG_IO_SIZE, PciConfigIo, PciRoot, assign_bars
from devices.pci.testing import FakePlatform
from devices.virtio_pci import (
    CC_CONFIG_GENERATION,
    CC_DEVICE_FEATURE,
    CC_DEVICE_FEATURE_SELECT,
    CC_DEVICE_STATUS,
    CC_DRIVER_FEATURE,
    CC_DRIVER_FEATURE_SELECT,
    CC_MSIX_CONFIG,
    CC_NUM_QUEUES,
    CC_QUEUE_DESC,
    CC_QUEUE_DEVICE,
    CC_QUEUE_DRIVER,
    CC_QUEUE_ENABLE,
    CC_QUEUE_MSIX_VECTOR,
    CC_QUEUE_NOTIFY_OFF,
    CC_QUEUE_SELECT,
    CC_QUEUE_SIZE,
    ISR_CONFIG,
    ISR_QUEUE,
    VIRTIO_MSI_NO_VECTOR,
    VirtioPciDevice,
)
from kvmcore.memory import GuestMemory
from pv.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_RNG,
    DeviceHealth,
    QueueConfig,
    VirtioDevice,
)

A, AD = STATUS_ACKNOWLEDGE, STATUS_ACKNOWLEDGE | STATUS_DRIVER
ADF = AD | STATUS_FEATURES_OK
ADFO = ADF | STATUS_DRIVER_OK
OFFERED = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_EVENT_IDX) | 0b101


class FakeVirtio(VirtioDevice):
    device_type = VIRTIO_ID_RNG
    queue_max_sizes = (256, 64)

    def __init__(self, fail_activate: bool = False) -> None:
        self.config = bytes(range(0x10, 0x18))
        self.config_writes: list[tuple[int, bytes]] = []
        self.acked: list[int] = []
        self.activations: list[list[QueueConfig]] = []
        self.health: DeviceHealth | None = None
        self.resets = 0
        self.fail_activate = fail_activate

    def device_features(self) -> int:
        return OFFERED

    def ack_features(self, features: int) -> None:
        self.acked.append(features)

    def read_config(self, offset: int, data: memoryview) -> None:
        chunk = self.config[offset : offset + len(data)]
        data[: len(chunk)] = chunk

    def write_config(self, offset: int, data: bytes | memoryview) -> None:
        self.config_writes.append((offset, bytes(data)))

    def activate(self, mem: GuestMemory, queues: list[QueueConfig], health: DeviceHealth) -> None:
        if self.fail_activate:
            raise RuntimeError("backend could not start")
        self.activations.append(queues)
        self.health = health

    def reset(self) -> None:
        self.resets += 1

    pending = False

    def reset_pending(self) -> bool:
        return self.pending


@dataclass
class Caps:
    common: int
    isr: int
    device: int
    notify: int
    notify_mult: int
    msix: int
    pci_cfg: int | None


class Driver:
    """What a guest driver does: config cycles through 0xCF8/0xCFC, MMIO to BAR0 through the platform."""

    def __init__(self, vdev: VirtioPciDevice, plat: FakePlatform) -> None:
        self.vdev, self.plat = vdev, plat
        self.root = PciRoot()
        self.slot = self.root.add_device(vdev)
        self.ports = pio_bus()
        self.ports.insert(PciConfigIo(self.root), CONFIG_IO_PORT, CONFIG_IO_SIZE)
        self.bar0 = 0

    # config space
    def cfg_read(self, reg: int, size: int = 4) -> int:
        self.ports.write(0xCF8, ((1 << 31) | (self.slot << 11) | (reg & 0xFC)).to_bytes(4, "little"))
        buf = bytearray(size)
        self.ports.read(0xCFC + (reg & 3), memoryview(buf))
        return int.from_bytes(buf, "little")

    def cfg_write(self, reg: int, value: int, size: int = 4) -> None:
        self.ports.write(0xCF8, ((1 << 31) | (self.slot << 11) | (reg & 0xFC)).to_bytes(4, "little"))
        self.ports.write(0xCFC + (reg & 3), value.to_bytes(size, "little"))

    def size_and_place_bar0(self, addr: int = 0xE000_0000) -> int:
        self.cfg_write(c.BAR0, 0xFFFF_FFFF)
        self.cfg_write(c.BAR0 + 4, 0xFFFF_FFFF)
        lo, hi = self.cfg_read(c.BAR0), self.cfg_read(c.BAR0 + 4)
        assert lo & 0x7 == c.BAR_MEM_TYPE_64
        size = (~(((hi << 32) | lo) & ~0xF) + 1) & ((1 << 64) - 1)
        self.cfg_write(c.BAR0, addr & 0xFFFF_FFFF)
        self.cfg_write(c.BAR0 + 4, addr >> 32)
        self.cfg_write(c.COMMAND, c.CMD_MEMORY_SPACE | c.CMD_BUS_MASTER, 2)
        self.bar0 = addr
        return size

    def walk_caps(self) -> Caps:
        assert self.cfg_read(c.STATUS, 2) & c.STATUS_CAP_LIST
        found: dict[int, tuple[int, int]] = {}
        msix = -1
        mult = 0
        pci_cfg = None
        ptr = self.cfg_read(c.CAPABILITIES_POINTER, 1)
        seen = 0
        while ptr:
            seen += 1
            assert seen < 48, "capability list loops"
            cap_id = self.cfg_read(ptr, 1)
            if cap_id == 0x09:
                cfg_type = self.cfg_read(ptr + 3, 1)
                bar = self.cfg_read(ptr + 4, 1)
                off, length = self.cfg_read(ptr + 8), self.cfg_read(ptr + 12)
                if cfg_type == 5:
                    pci_cfg = ptr
                else:
                    assert bar == 0
                    found[cfg_type] = (off, length)
                if cfg_type == 2:
                    mult = self.cfg_read(ptr + 16)
            elif cap_id == 0x11:
                msix = ptr
            ptr = self.cfg_read(ptr + 1, 1)
        return Caps(found[1][0], found[3][0], found[4][0], found[2][0], mult, msix, pci_cfg)

    # BAR0
    def r(self, off: int, size: int) -> int:
        return self.plat.mmio_read(self.bar0 + off, size)

    def w(self, off: int, size: int, value: int) -> None:
        self.plat.mmio_write_int(self.bar0 + off, size, value)

    def status(self) -> int:
        return self.r(CC_DEVICE_STATUS, 1)

    def set_status(self, v: int) -> None:
        self.w(CC_DEVICE_STATUS, 1, v)

    def features(self) -> int:
        self.w(CC_DEVICE_FEATURE_SELECT, 4, 0)
        lo = self.r(CC_DEVICE_FEATURE, 4)
        self.w(CC_DEVICE_FEATURE_SELECT, 4, 1)
        return (self.r(CC_DEVICE_FEATURE, 4) << 32) | lo

    def write_features(self, f: int) -> None:
        for sel in (0, 1):
            self.w(CC_DRIVER_FEATURE_SELECT, 4, sel)
            self.w(CC_DRIVER_FEATURE, 4, (f >> (32 * sel)) & 0xFFFF_FFFF)

    def driver_features(self) -> int:
        out = 0
        for sel in (0, 1):
            self.w(CC_DRIVER_FEATURE_SELECT, 4, sel)
            out |= self.r(CC_DRIVER_FEATURE, 4) << (32 * sel)
        return out

    def negotiate(self, features: int = OFFERED) -> bool:
        self.set_status(A)
        self.set_status(AD)
        self.write_features(features & self.features())
        self.set_status(ADF)
        return bool(self.status() & STATUS_FEATURES_OK)

    def setup_queue(self, q: int, size: int, base: int, vector: int = VIRTIO_MSI_NO_VECTOR) -> None:
        self.w(CC_QUEUE_SELECT, 2, q)
        self.w(CC_QUEUE_SIZE, 2, size)
        self.w(CC_QUEUE_DESC, 4, base & 0xFFFF_FFFF)
        self.w(CC_QUEUE_DESC + 4, 4, base >> 32)
        self.w(CC_QUEUE_DRIVER, 8, base + 0x1000)
        self.w(CC_QUEUE_DEVICE, 8, base + 0x2000)
        self.w(CC_QUEUE_MSIX_VECTOR, 2, vector)

    def enable_queue(self, q: int) -> None:
        self.w(CC_QUEUE_SELECT, 2, q)
        self.w(CC_QUEUE_ENABLE, 2, 1)

    def queue_reg(self, q: int, off: int, size: int = 2) -> int:
        self.w(CC_QUEUE_SELECT, 2, q)
        return self.r(off, size)

    def enable_msix(self, caps: Caps, vectors: int) -> None:
        ctl = self.cfg_read(caps.msix + 2, 2)
        self.cfg_write(caps.msix + 2, ctl | MSG_CTL_ENABLE, 2)
        table = self.cfg_read(caps.msix + 4)
        assert table & 7 == 0
        for v in range(vectors):
            e = (table & ~7) + 16 * v
            self.w(e, 4, 0xFEE0_0000)
            self.w(e + 4, 4, 0)
            self.w(e + 8, 4, 0x40 + v)
            self.w(e + 12, 4, 0)  # unmask

    def bring_up(self, msix: bool = True) -> Caps:
        self.size_and_place_bar0()
        caps = self.walk_caps()
        assert self.negotiate()
        if msix:
            self.enable_msix(caps, 3)
            self.w(CC_MSIX_CONFIG, 2, 0)
        self.setup_queue(0, 128, 0x10_0000, 1 if msix else VIRTIO_MSI_NO_VECTOR)
        self.setup_queue(1, 64, 0x20_0000, 2 if msix else VIRTIO_MSI_NO_VECTOR)
        self.enable_queue(0)
        self.enable_queue(1)
        self.set_status(ADFO)
        return caps


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.create([(0, 4 << 20)])
    yield m
    m.close()


@pytest.fixture
def rig(mem: GuestMemory) -> Iterator[tuple[VirtioPciDevice, FakeVirtio, FakePlatform, Driver]]:
    plat = FakePlatform()
    fake = FakeVirtio()
    vdev = VirtioPciDevice(fake, mem, plat)
    drv = Driver(vdev, plat)
    yield vdev, fake, plat, drv
    vdev.close()


def readable(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


# ---------------------------------------------------------------------------------------------- identity, layout
def test_pci_identity_is_a_modern_virtio_device(rig) -> None:  # type: ignore[no-untyped-def]
    _vdev, _fake, _plat, drv = rig
    assert drv.cfg_read(c.VENDOR_ID, 2) == 0x1AF4
    assert drv.cfg_read(c.DEVICE_ID, 2) == 0x1040 + VIRTIO_ID_RNG
    assert drv.cfg_read(c.REVISION_ID, 1) >= 1  # §4.1.2.1
    assert drv.cfg_read(c.SUBSYSTEM_ID, 2) >= 0x40
    assert drv.cfg_read(c.INTERRUPT_PIN, 1) == 1


def test_bar0_sizes_as_a_64bit_power_of_two_and_decodes_where_programmed(rig) -> None:  # type: ignore[no-untyped-def]
    vdev, _fake, plat, drv = rig
    size = drv.size_and_place_bar0(0x1_0000_0000_0000)
    assert size == vdev.layout.bar_size and size & (size - 1) == 0
    assert vdev.bar_mapping(0) == 0x1_0000_0000_0000
    assert ("map_mmio", 0x1_0000_0000_0000, size) in plat.calls
    assert drv.r(CC_NUM_QUEUES, 2) == 2


def test_capability_walk_finds_every_structure_inside_bar0(rig) -> None:  # type: ignore[no-untyped-def]
    vdev, _fake, _plat, drv = rig
    size = drv.size_and_place_bar0()
    caps = drv.walk_caps()
    assert caps.notify_mult == 4
    assert caps.pci_cfg is not None and caps.msix > 0
    table = drv.cfg_read(caps.msix + 4)
    pba = drv.cfg_read(caps.msix + 8)
    assert drv.cfg_read(caps.msix + 2, 2) & 0x7FF == 2  # 3 vectors: 2 queues + config
    offsets = sorted([caps.common, caps.isr, caps.device, caps.notify, table & ~7, pba & ~7])
    assert len(set(offsets)) == 6 and offsets[-1] < size
    for q in range(2):
        assert drv.queue_reg(q, CC_QUEUE_NOTIFY_OFF) == q  # distinct 4-byte notify addresses


# ---------------------------------------------------------------------------------------------- full bring-up
def test_msix_bring_up_registers_ioeventfds_irqfds_and_routes(rig) -> None:  # type: ignore[no-untyped-def]
    vdev, fake, plat, drv = rig
    drv.bring_up(msix=True)
    assert drv.status() == ADFO
    assert fake.acked == [OFFERED]
    [queues] = fake.activations
    assert [(q.index, q.size, q.desc_table, q.avail_ring, q.used_ring, q.event_idx) for q in queues] == [
        (0, 128, 0x10_0000, 0x10_1000, 0x10_2000, True),
        (1, 64, 0x20_0000, 0x20_1000, 0x20_2000, True),
    ]
    assert [q.kick_fd for q in queues] == vdev.kick_fds
    assert plat.ioeventfds == {
        (vdev.notify_address(0), 0, None, vdev.kick_fds[0]),
        (vdev.notify_address(1), 0, None, vdev.kick_fds[1]),
    }
    assert vdev.notify_address(1) - vdev.notify_address(0) == 4
    g0, g1, g2 = vdev.msix.gsis[0], vdev.msix.gsis[1], vdev.msix.gsis[2]
    assert plat.irqfds == {(g0, vdev.config_fd), (g1, vdev.call_fds[0]), (g2, vdev.call_fds[1])}
    assert plat.routes[g1] == (0xFEE0_0000, 0x41, False)
    assert plat.routes[g2] == (0xFEE0_0000, 0x42, False)


def test_kicks_go_through_the_ioeventfd_after_driver_ok(rig) -> None:  # type: ignore[no-untyped-def]
    vdev, _fake, plat, drv = rig
    drv.bring_up()
    plat.mmio_write(vdev.notify_address(1), struct.pack("<H", 1))
    assert plat.ioeventfd_hits == 1
    assert vdev.stats.userspace_notifies == 0
    assert readable(vdev.kick_fds[1]) == 1 and readable(vdev.kick_fds[0]) == 0


def test_notify_writes_reaching_userspace_kick_the_queue_eventfd(rig) -> None:  # type: ignore[no-untyped-def]
    vdev, _fake, plat, drv = rig
    drv.size_and_place_bar0()
    plat.mmio_write(vdev.notify_address(0), struct.pack("<H", 0))  # no ioeventfd before DRIVER_OK
    assert vdev.stats.userspace_notifies == 1
    assert readable(vdev.kick_fds[0]) == 1
    plat.mmio_write(vdev.notify_address(0) + 2, b"\x00\x00")  # not a queue's address
    plat.mmio_write(vdev.notify_address(0) + 0x100, b"\x00\x00")  # queue 64 does not exist
    assert vdev.stats.bad_notifies == 2


def test_intx_mode_call_sets_isr_raises_line_and_isr_read_clears_both(rig) -> None:  # type: ignore[no-untyped-def]
    vdev, _fake, plat, drv = rig
    caps = drv.bring_up(msix=False)
    assert plat.irqfds == set()
    assert sorted(vdev.intx_fds()) == sorted([*vdev.call_fds, vdev.config_fd])
    assert vdev.service_interrupts() is False
    os.eventfd_write(vdev.call_fds[1], 1)
    assert vdev.service_interrupts() is True
    assert plat.intx_level is True
    assert drv.cfg_read(c.STATUS, 2) & c.STATUS_INTERRUPT
    assert drv.r(caps.isr, 1) == ISR_QUEUE
    assert plat.intx_level is False
    assert drv.r(caps.isr, 1) == 0  # read-to-clear (§4.1.4.5)


def test_intx_poller_thread_raises_the_line_without_help(rig) -> None:  # type: ignore[no-untyped-def]
    vdev, _fake, plat, drv = rig
    drv.bring_up(msix=False)
    vdev.start_intx_poller()
    try:
        os.eventfd_write(vdev.call_fds[0], 1)
        deadline = time.monotonic() + 5
        while not plat.intx_level and time.monotonic() < deadline:
            time.sleep(0.005)
        assert plat.intx_level is True
    finally:
        vdev.stop_intx_poller()


def test_no_intx_sources_while_msix_is_enabled(rig) -> None:  # type: ignore[no-untyped-def]
    vdev, _fake, plat, drv = rig
    drv.bring_up(msix=True)
    os.eventfd_write(vdev.call_fds[0], 1)
    assert vdev.intx_fds() == []
    assert vdev.service_interrupts() is False
    assert plat.intx_level is False


def test_masked_queue_vector_shows_pending_and_delivers_on_unmask(rig) -> None:  # type: ignore[no-untyped-def]
    vdev, _fake, plat, drv = rig
    caps = drv.bring_up(msix=True)
    table = drv.cfg_read(caps.msix + 4) & ~7
    pba = drv.cfg_read(caps.msix + 8) & ~7
    drv.w(table + 16 + 12, 4, 1)  # mask vector 1 (queue 0)
    g1 = vdev.msix.gsis[1]
    assert (g1, vdev.call_fds[0]) not in plat.irqfds
    os.eventfd_write(vdev.call_fds[0], 1)
    assert drv.r(pba, 8) == 0b010
    drv.w(table + 16 + 12, 4, 0)
    assert (g1, vdev.call_fds[0]) in plat.irqfds
    assert drv.r(pba, 8) == 0


def test_function_mask_detaches_every_irqfd(rig) -> None:  # type: ignore[no-untyped-def]
    _vdev, _fake, plat, drv = rig
    caps = drv.bring_up(msix=True)
    drv.cfg_write(caps.msix + 2, MSG_CTL_ENABLE | MSG_CTL_FUNCTION_MASK, 2)
    assert plat.irqfds == set()
    drv.cfg_write(caps.msix + 2, MSG_CTL_ENABLE, 2)
    assert len(plat.irqfds) == 3


def test_msix_table_bad_access_sizes_through_bar0_are_ignored(rig) -> None:  # type: ignore[no-untyped-def]
    vdev, _fake, _plat, drv = rig
    caps = drv.bring_up(msix=True)
    table = drv.cfg_read(caps.msix + 4) & ~7
    before = bytes(vdev.msix.table)
    drv.w(table, 1, 0x55)
    drv.w(table + 2, 2, 0x55)
    assert bytes(vdev.msix.table) == before
    assert drv.r(table, 2) == 0xFFFF
    assert vdev.msix.stats.bad_accesses == 3


# ---------------------------------------------------------------------------------------------- negotiation rules
def test_feature_bits_not_offered_are_dropped(rig) -> None:  # type: ignore[no-untyped-def]
    vdev, fake, _plat, drv = rig
    drv.size_and_place_bar0()
    drv.set_status(A)
    drv.set_status(AD)
    drv.write_features(OFFERED | (1 << 1) | (1 << 40))
    assert drv.driver_features() == OFFERED
    assert vdev.stats.unoffered_feature_writes == 2
    drv.set_status(ADF)
    assert fake.acked == [OFFERED]


def test_features_ok_without_version_1_is_refused(rig) -> None:  # type: ignore[no-untyped-def]
    vdev, fake, _plat, drv = rig
    drv.size_and_place_bar0()
    assert drv.negotiate(OFFERED & ~(1 << VIRTIO_F_VERSION_1)) is False
    assert drv.status() == AD
    assert fake.acked == []
    assert vdev.stats.features_refused == 1
    drv.set_status(AD | STATUS_FAILED)  # what Linux does next
    assert drv.status() == AD | STATUS_FAILED


def test_feature_writes_outside_the_driver_phase_are_ignored(rig) -> None:  # type: ignore[no-untyped-def]
    vdev, _fake, _plat, drv = rig
    drv.size_and_place_bar0()
    drv.write_features(OFFERED)  # status 0
    assert drv.driver_features() == 0
    assert drv.negotiate(1 << VIRTIO_F_VERSION_1)
    drv.write_features(OFFERED)  # after FEATURES_OK
    assert drv.driver_features() == 1 << VIRTIO_F_VERSION_1
    assert vdev.stats.gated_writes == 4


@pytest.mark.parametrize(
    "path",
    [
        [ADF],  # FEATURES_OK straight from reset: no features can have been written
        [A, ADF],  # skipping DRIVER
        [A, AD, AD | STATUS_DRIVER_OK],  # DRIVER_OK without FEATURES_OK
        [A, AD, ADF, A],  # clearing bits
        [A, AD, ADF, ADF & ~STATUS_DRIVER],  # clearing DRIVER
        [A, STATUS_DEVICE_NEEDS_RESET | A, A | STATUS_FEATURES_OK],  # echoed NEEDS_RESET is no transition
        [A, A | STATUS_FAILED, AD | STATUS_FAILED],  # nothing after FAILED but reset
    ],
)
def test_invalid_status_transitions_are_ignored_and_counted(rig, path: list[int]) -> None:  # type: ignore[no-untyped-def]
    vdev, fake, _plat, drv = rig
    drv.size_and_place_bar0()
    for s in path[:-1]:
        drv.set_status(s)
        if drv.status() == AD:
            drv.write_features(1 << VIRTIO_F_VERSION_1)  # so only the transition itself can fail
    before = drv.status()
    assert before == (path[-2] & ~STATUS_DEVICE_NEEDS_RESET if len(path) > 1 else 0)
    bad = vdev.stats.invalid_status_writes
    drv.set_status(path[-1])
    assert drv.status() == before
    assert vdev.stats.invalid_status_writes == bad + 1
    assert fake.activations == []


def test_acknowledge_and_driver_in_one_write_like_seabios(rig) -> None:  # type: ignore[no-untyped-def]
    vdev, fake, _plat, drv = rig
    drv.size_and_place_bar0()
    drv.set_status(AD)  # SeaBIOS vp_init_simple: ACKNOWLEDGE | DRIVER at once
    assert drv.status() == AD
    drv.write_features(1 << VIRTIO_F_VERSION_1)
    drv.set_status(ADF)
    assert drv.status() == ADF
    assert vdev.stats.invalid_status_writes == 0


def test_failed_may_be_set_at_any_point(rig) -> None:  # type: ignore[no-untyped-def]
    _vdev, _fake, _plat, drv = rig
    drv.bring_up()
    drv.set_status(ADFO | STATUS_FAILED)
    assert drv.status() == ADFO | STATUS_FAILED


# ---------------------------------------------------------------------------------------------- queue gating
def test_queue_writes_before_features_ok_are_ignored(rig) -> None:  # type: ignore[no-untyped-def]
    vdev, _fake, _plat, drv = rig
    drv.size_and_place_bar0()
    drv.set_status(A)
    drv.set_status(AD)
    drv.setup_queue(0, 16, 0x10_0000, 0)
    assert drv.queue_reg(0, CC_QUEUE_SIZE) == 256
    assert drv.queue_reg(0, CC_QUEUE_DESC, 8) == 0
    assert vdev.stats.gated_writes == 6  # size, desc lo+hi, driver, device, vector


def test_queue_writes_after_driver_ok_are_ignored(rig) -> None:  # type: ignore[no-untyped-def]
    vdev, fake, _plat, drv = rig
    drv.bring_up()
    gated = vdev.stats.gated_writes
    drv.setup_queue(0, 16, 0x30_0000, 2)
    drv.w(CC_QUEUE_SELECT, 2, 0)
    assert drv.r(CC_QUEUE_SIZE, 2) == 128
    assert drv.r(CC_QUEUE_DESC, 8) == 0x10_0000
    assert drv.r(CC_QUEUE_MSIX_VECTOR, 2) == 1
    assert vdev.stats.gated_writes == gated + 6
    assert len(fake.activations) == 1


def test_disabled_queue_cannot_be_configured_after_driver_ok(rig) -> None:  # type: ignore[no-untyped-def]
    vdev, fake, plat, drv = rig
    drv.size_and_place_bar0()
    assert drv.negotiate()
    drv.setup_queue(0, 128, 0x10_0000)
    drv.enable_queue(0)
    drv.set_status(ADFO)  # queue 1 left disabled: the backend only gets queue 0
    assert [q.index for q in fake.activations[0]] == [0]
    assert len(plat.ioeventfds) == 1
    drv.setup_queue(1, 32, 0x20_0000)
    drv.enable_queue(1)
    assert drv.queue_reg(1, CC_QUEUE_SIZE) == 64 and drv.queue_reg(1, CC_QUEUE_ENABLE) == 0
    assert vdev.stats.gated_writes == 7


def test_queue_fields_freeze_once_the_queue_is_enabled(rig) -> None:  # type: ignore[no-untyped-def]
    vdev, _fake, _plat, drv = rig
    drv.size_and_place_bar0()
    assert drv.negotiate()
    drv.setup_queue(0, 128, 0x10_0000)
    drv.enable_queue(0)
    drv.w(CC_QUEUE_SIZE, 2, 64)
    assert drv.queue_reg(0, CC_QUEUE_SIZE) == 128
    assert vdev.stats.gated_writes == 1


@pytest.mark.parametrize("size", [0, 3, 100, 512, 0xFFFF])
def test_bad_queue_sizes_are_rejected(rig, size: int) -> None:  # type: ignore[no-untyped-def]
    vdev, _fake, _plat, drv = rig
    drv.size_and_place_bar0()
    assert drv.negotiate()
    drv.w(CC_QUEUE_SELECT, 2, 0)
    drv.w(CC_QUEUE_SIZE, 2, size)
    assert drv.r(CC_QUEUE_SIZE, 2) == 256
    assert vdev.stats.bad_queue_values == 1


def test_queue_enable_refuses_zero_and_misaligned_rings(rig) -> None:  # type: ignore[no-untyped-def]
    vdev, _fake, _plat, drv = rig
    drv.size_and_place_bar0()
    assert drv.negotiate()
    drv.setup_queue(0, 128, 0x10_0008)  # descriptor table must be 16-byte aligned (§2.7)
    drv.w(CC_QUEUE_ENABLE, 2, 1)
    drv.w(CC_QUEUE_ENABLE, 2, 0)
    assert drv.r(CC_QUEUE_ENABLE, 2) == 0
    assert vdev.stats.bad_queue_values == 2


def test_out_of_range_vectors_read_back_as_no_vector(rig) -> None:  # type: ignore[no-untyped-def]
    _vdev, _fake, _plat, drv = rig
    drv.size_and_place_bar0()
    assert drv.negotiate()
    drv.w(CC_QUEUE_SELECT, 2, 0)
    drv.w(CC_QUEUE_MSIX_VECTOR, 2, 3)
    assert drv.r(CC_QUEUE_MSIX_VECTOR, 2) == VIRTIO_MSI_NO_VECTOR
    drv.w(CC_MSIX_CONFIG, 2, 7)
    assert drv.r(CC_MSIX_CONFIG, 2) == VIRTIO_MSI_NO_VECTOR
    drv.w(CC_MSIX_CONFIG, 2, 2)
    assert drv.r(CC_MSIX_CONFIG, 2) == 2


def test_nonexistent_queue_reads_size_zero_and_ignores_writes(rig) -> None:  # type: ignore[no-untyped-def]
    vdev, _fake, _plat, drv = rig
    drv.size_and_place_bar0()
    assert drv.negotiate()
    drv.w(CC_QUEUE_SELECT, 2, 2)
    assert drv.r(CC_QUEUE_SIZE, 2) == 0
    assert drv.r(CC_QUEUE_MSIX_VECTOR, 2) == VIRTIO_MSI_NO_VECTOR
    drv.w(CC_QUEUE_ENABLE, 2, 1)
    assert vdev.stats.gated_writes == 1


def test_read_only_and_wrong_width_common_writes_are_ignored(rig) -> None:  # type: ignore[no-untyped-def]
    vdev, _fake, _plat, drv = rig
    drv.size_and_place_bar0()
    drv.w(CC_NUM_QUEUES, 2, 9)
    drv.w(CC_DEVICE_FEATURE, 4, 0)
    drv.w(CC_CONFIG_GENERATION, 1, 9)
    drv.w(CC_DEVICE_STATUS, 4, A)  # status is a byte register
    drv.w(CC_QUEUE_SELECT, 4, 1)
    assert drv.r(CC_NUM_QUEUES, 2) == 2 and drv.status() == 0
    assert drv.r(CC_QUEUE_SELECT, 2) == 0
    assert vdev.stats.bad_common_accesses == 5


# ---------------------------------------------------------------------------------------------- moves, reset, health
def test_moving_bar0_after_driver_ok_moves_the_ioeventfds(rig) -> None:  # type: ignore[no-untyped-def]
    vdev, _fake, plat, drv = rig
    drv.bring_up()
    old = vdev.notify_address(0)
    drv.cfg_write(c.BAR0, 0xD000_0000)
    drv.cfg_write(c.BAR0 + 4, 0)
    drv.bar0 = 0xD000_0000
    new = vdev.notify_address(0)
    assert new != old
    assert {a for a, *_ in plat.ioeventfds} == {new, new + 4}
    drv.cfg_write(c.COMMAND, 0, 2)  # decoding off: no MMIO, no ioeventfds
    assert plat.ioeventfds == set() and plat.mmio.devices() == []


def test_reset_unregisters_everything_and_returns_to_the_initial_state(rig) -> None:  # type: ignore[no-untyped-def]
    vdev, fake, plat, drv = rig
    drv.bring_up()
    os.eventfd_write(vdev.kick_fds[0], 1)
    drv.set_status(0)
    assert drv.status() == 0
    assert fake.resets == 1
    assert plat.ioeventfds == set() and plat.irqfds == set()
    assert drv.r(CC_MSIX_CONFIG, 2) == VIRTIO_MSI_NO_VECTOR
    assert drv.queue_reg(0, CC_QUEUE_SIZE) == 256 and drv.queue_reg(0, CC_QUEUE_ENABLE) == 0
    assert drv.driver_features() == 0
    assert readable(vdev.kick_fds[0]) == 0
    drv.bring_up()  # and the driver can start over
    assert len(fake.activations) == 2


def test_status_does_not_read_0_until_a_reset_carried_out_off_the_vcpu_thread_is_done(rig) -> None:  # type: ignore[no-untyped-def]
    # A vhost-user device stops its rings on its control thread; until the back-end confirms, the driver must
    # not see the reset complete (it would reuse the ring memory), so status keeps its old value (§4.1.4.3.2).
    vdev, fake, _plat, drv = rig
    drv.bring_up()
    fake.pending = True
    drv.set_status(0)
    assert fake.resets == 1
    assert drv.status() == ADFO  # still resetting: Linux's vp_reset() polls until it reads 0
    fake.pending = False
    assert drv.status() == 0
    fake.pending = True  # a reset of a device that never got past status 0 reads non-zero while pending, too
    drv.set_status(0)
    assert drv.status() != 0
    fake.pending = False
    assert drv.status() == 0
    drv.bring_up()
    assert len(fake.activations) == 2


def test_needs_reset_sets_the_status_bit_and_sends_a_config_interrupt(rig) -> None:  # type: ignore[no-untyped-def]
    vdev, fake, _plat, drv = rig
    drv.bring_up()
    assert fake.health is not None
    fake.health.needs_reset("descriptor loop")
    assert drv.status() == ADFO | STATUS_DEVICE_NEEDS_RESET
    assert readable(vdev.config_fd) == 1  # irqfd-attached to msix_config's vector
    drv.set_status(ADFO | STATUS_DEVICE_NEEDS_RESET | STATUS_FAILED)  # the driver echoes the bit back
    assert drv.status() == ADFO | STATUS_FAILED | STATUS_DEVICE_NEEDS_RESET
    drv.set_status(0)
    assert drv.status() == 0


def test_health_calls_from_a_previous_activation_are_ignored(rig) -> None:  # type: ignore[no-untyped-def]
    vdev, fake, _plat, drv = rig
    drv.bring_up()
    stale = fake.health
    drv.set_status(0)
    drv.bring_up()
    assert stale is not None
    stale.needs_reset("late worker")
    stale.config_changed()
    assert drv.status() == ADFO
    assert readable(vdev.config_fd) == 0


def test_config_change_bumps_generation_and_interrupts_in_intx_mode(rig) -> None:  # type: ignore[no-untyped-def]
    vdev, fake, plat, drv = rig
    caps = drv.bring_up(msix=False)
    gen = drv.r(CC_CONFIG_GENERATION, 1)
    fake.health.config_changed()  # type: ignore[union-attr]
    assert drv.r(CC_CONFIG_GENERATION, 1) == (gen + 1) & 0xFF
    assert vdev.service_interrupts()
    assert drv.r(caps.isr, 1) == ISR_CONFIG


def test_activation_failure_sets_needs_reset(mem: GuestMemory) -> None:
    plat = FakePlatform()
    vdev = VirtioPciDevice(FakeVirtio(fail_activate=True), mem, plat)
    try:
        drv = Driver(vdev, plat)
        drv.bring_up()
        assert drv.status() & STATUS_DEVICE_NEEDS_RESET
        assert vdev.stats.activation_failures == 1
    finally:
        vdev.close()


def test_device_config_window_reaches_the_backend(rig) -> None:  # type: ignore[no-untyped-def]
    _vdev, fake, _plat, drv = rig
    drv.size_and_place_bar0()
    caps = drv.walk_caps()
    assert drv.r(caps.device + 2, 2) == 0x1312
    assert drv.r(caps.device + 0x100, 4) == 0  # beyond the backend's config: zeros
    drv.w(caps.device + 4, 1, 0x99)
    assert fake.config_writes == [(4, b"\x99")]


def test_pci_cfg_capability_window_accesses_bar0(rig) -> None:  # type: ignore[no-untyped-def]
    _vdev, _fake, _plat, drv = rig
    drv.size_and_place_bar0()
    caps = drv.walk_caps()
    assert caps.pci_cfg is not None
    p = caps.pci_cfg
    drv.cfg_write(p + 4, 0, 1)  # bar 0
    drv.cfg_write(p + 8, CC_NUM_QUEUES)
    drv.cfg_write(p + 12, 2)
    assert drv.cfg_read(p + 16) & 0xFFFF == 2
    drv.cfg_write(p + 8, CC_DEVICE_STATUS)
    drv.cfg_write(p + 12, 1)
    drv.cfg_write(p + 16, A)
    assert drv.status() == A


def test_pci_cfg_window_with_bad_length_does_nothing(rig) -> None:  # type: ignore[no-untyped-def]
    vdev, _fake, _plat, drv = rig
    drv.size_and_place_bar0()
    p = drv.walk_caps().pci_cfg
    assert p is not None
    drv.cfg_write(p + 8, CC_DEVICE_STATUS)
    drv.cfg_write(p + 12, 3)
    drv.cfg_write(p + 16, A)
    assert drv.status() == 0
    assert vdev.stats.pci_cfg_window_errors == 1


def test_device_without_version_1_is_a_host_config_error(mem: GuestMemory) -> None:
    class Legacy(FakeVirtio):
        def device_features(self) -> int:
            return 0b101

    with pytest.raises(ValueError):
        VirtioPciDevice(Legacy(), mem, FakePlatform())


def test_firmware_less_guest_finds_bar0_placed_by_assign_bars(rig) -> None:  # type: ignore[no-untyped-def]
    vdev, _fake, plat, drv = rig
    placed = assign_bars(drv.root)
    addr = placed[(drv.slot, 0)]
    assert vdev.bar_mapping(0) == addr
    assert plat.mmio_read(addr + CC_NUM_QUEUES, 2) == 2


# ---------------------------------------------------------------------------------------------- fuzz
_access = st.tuples(
    st.booleans(),
    st.integers(min_value=-8, max_value=300),
    st.sampled_from([0, 1, 2, 3, 4, 8]),
    st.integers(min_value=0, max_value=(1 << 64) - 1),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_access, max_size=60))
def test_random_config_space_accesses_never_raise(mem: GuestMemory, ops: list) -> None:  # type: ignore[type-arg]
    plat = FakePlatform()
    vdev = VirtioPciDevice(FakeVirtio(), mem, plat)
    try:
        for is_write, off, size, value in ops:
            if is_write:
                vdev.write_config(off, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
            else:
                vdev.read_config(off, memoryview(bytearray(size)))
        assert vdev.config.read(0, 4) == 0x1044_1AF4
    finally:
        vdev.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    setup=st.integers(min_value=0, max_value=3),
    ops=st.lists(
        st.tuples(
            st.booleans(),
            st.one_of(st.integers(min_value=0, max_value=0x60), st.integers(min_value=0, max_value=0x8000)),
            st.sampled_from([1, 2, 4, 8]),
            st.one_of(st.integers(min_value=0, max_value=0xFF), st.integers(min_value=0, max_value=(1 << 64) - 1)),
        ),
        max_size=80,
    ),
)
def test_random_bar0_accesses_never_raise(mem: GuestMemory, setup: int, ops: list) -> None:  # type: ignore[type-arg]
    plat = FakePlatform()
    vdev = VirtioPciDevice(FakeVirtio(), mem, plat)
    try:
        drv = Driver(vdev, plat)
        if setup == 0:
            drv.size_and_place_bar0()
        elif setup == 1:
            drv.size_and_place_bar0()
            assert drv.negotiate()
        else:
            drv.bring_up(msix=setup == 2)
        for is_write, off, size, value in ops:
            if is_write:
                vdev.bar_write(0, off, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
            else:
                vdev.bar_read(0, off, memoryview(bytearray(size)))
            vdev.service_interrupts()
    finally:
        vdev.close()
