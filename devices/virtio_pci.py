"""Modern (virtio 1.x, non-transitional) virtio over PCI: the transport that drives any pv VirtioDevice.

Virtio 1.2 §4.1. One 64-bit memory BAR (0) holds every structure the vendor capabilities point at:

    0x0000  common configuration (§4.1.4.3), 0x38 bytes
    0x1000  ISR status (§4.1.4.5), 1 byte, read-to-clear
    0x2000  device-specific configuration (§4.1.4.6), 4 KiB window onto VirtioDevice.read_config/write_config
    0x3000  notifications (§4.1.4.4): queue q at 0x3000 + 4*q (notify_off_multiplier 4, queue_notify_off q), so
            each queue has its own address and its kick eventfd is a datamatch-less, any-length ioeventfd
    then    MSI-X table and PBA (PCI 3.0 §6.8.2), each 4 KiB aligned

Every guest write is checked the way Firecracker's transport does it (devices/virtio/transport/mmio.rs): status
changes against VALID_TRANSITIONS, driver features ANDed with the offer, queue registers writable only between
FEATURES_OK and DRIVER_OK on a disabled queue. Wrong writes are ignored and counted; nothing raises.

Interrupts: each queue has a persistent call eventfd, and the transport has one for configuration changes. With
MSI-X enabled they are irqfds on their vectors' GSIs (devices.pci.msix); with MSI-X disabled nothing in KVM
consumes them, so ``service_interrupts`` (called from the INTx poller thread or the VMM's loop) drains them,
sets ISR bit 0 (queue) / bit 1 (config) and raises INTx until the driver reads the ISR.
"""

from __future__ import annotations

import logging
import os
import select
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from devices.pci.config import BarSpec, BarType, PciConfiguration
from devices.pci.device import PciDevice, PciPlatform
from devices.pci.msix import MsixConfig, msix_capability
from devices.ratelimit import RateLimitedLog
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
    VIRTIO_ID_BLOCK,
    VIRTIO_ID_CONSOLE,
    VIRTIO_ID_NET,
    QueueConfig,
    VirtioDevice,
)

log = logging.getLogger(__name__)

VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_PCI_DEVICE_ID_BASE = 0x1040  # §4.1.2: device ID = 0x1040 + virtio device ID
VIRTIO_PCI_REVISION = 1  # §4.1.2.1: non-transitional devices SHOULD have revision ID >= 1

# PCI class per device type (what QEMU reports; drivers bind by vendor/device ID, not class).
_PCI_CLASS = {
    VIRTIO_ID_NET: (0x02, 0x00),  # network controller, ethernet
    VIRTIO_ID_BLOCK: (0x01, 0x80),  # mass storage, other
    VIRTIO_ID_CONSOLE: (0x07, 0x80),  # communication, other
}
_PCI_CLASS_OTHER = (0xFF, 0x00)

# Vendor capability cfg_type values (§4.1.4).
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5
PCI_CAP_ID_VNDR = 0x09

VIRTIO_MSI_NO_VECTOR = 0xFFFF
MAX_QUEUE_SIZE = 32768  # §2.7: split queue size is a power of 2, at most 32768

# BAR0 layout.
COMMON_CFG_OFFSET = 0x0000
COMMON_CFG_LEN = 0x38
ISR_CFG_OFFSET = 0x1000
ISR_CFG_LEN = 1
DEVICE_CFG_OFFSET = 0x2000
DEVICE_CFG_LEN = 0x1000
NOTIFY_OFFSET = 0x3000
NOTIFY_OFF_MULTIPLIER = 4
NOTIFY_IOEVENTFD_LEN = 0  # any access size: a driver writes 16 bits, or 32 with NOTIFICATION_DATA (§4.1.5.2)
_PAGE = 0x1000

# Common configuration field offsets (§4.1.4.3).
CC_DEVICE_FEATURE_SELECT = 0x00
CC_DEVICE_FEATURE = 0x04
CC_DRIVER_FEATURE_SELECT = 0x08
CC_DRIVER_FEATURE = 0x0C
CC_MSIX_CONFIG = 0x10
CC_NUM_QUEUES = 0x12
CC_DEVICE_STATUS = 0x14
CC_CONFIG_GENERATION = 0x15
CC_QUEUE_SELECT = 0x16
CC_QUEUE_SIZE = 0x18
CC_QUEUE_MSIX_VECTOR = 0x1A
CC_QUEUE_ENABLE = 0x1C
CC_QUEUE_NOTIFY_OFF = 0x1E
CC_QUEUE_DESC = 0x20
CC_QUEUE_DRIVER = 0x28
CC_QUEUE_DEVICE = 0x30
_COMMON = struct.Struct("<IIIIHHBBHHHHHQQQ")
assert _COMMON.size == COMMON_CFG_LEN

# ISR bits (§4.1.4.5).
ISR_QUEUE = 0x1
ISR_CONFIG = 0x2

# Device status transitions the driver may make (§2.1, §3.1.1). The NEEDS_RESET bit belongs to the device and is
# ignored in both columns; status 0 (reset) and adding FAILED are always allowed and handled separately.
_A = STATUS_ACKNOWLEDGE
_AD = _A | STATUS_DRIVER
_ADF = _AD | STATUS_FEATURES_OK
_ADFO = _ADF | STATUS_DRIVER_OK
# (0, _AD): §3.1.1 steps 2 and 3 in one write, as SeaBIOS's virtio drivers do (src/hw/virtio-pci.c
# vp_init_simple); QEMU accepts it, and refusing it left SeaBIOS without its boot disk.
VALID_TRANSITIONS: frozenset[tuple[int, int]] = frozenset({(0, _A), (0, _AD), (_A, _AD), (_AD, _ADF),
                                                           (_ADF, _ADFO)})


def _align(v: int, a: int) -> int:
    return (v + a - 1) & ~(a - 1)


def _pow2_at_least(v: int) -> int:
    n = 1
    while n < v:
        n <<= 1
    return n


def _vendor_cap(cfg_type: int, bar: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    """struct virtio_pci_cap (§4.1.4): vndr, next, len, cfg_type, bar, id, padding[2], offset, length."""
    cap_len = 16 + len(extra)
    return struct.pack("<BBBBBBxxII", PCI_CAP_ID_VNDR, 0, cap_len, cfg_type, bar, 0, offset, length) + extra


@dataclass
class VirtioPciStats:
    invalid_status_writes: int = 0
    features_refused: int = 0  # FEATURES_OK without VERSION_1
    unoffered_feature_writes: int = 0  # driver feature words that named bits we did not offer
    gated_writes: int = 0  # register writes in a device status that forbids them
    bad_queue_values: int = 0  # sizes, vectors, addresses, enables the spec forbids
    bad_common_accesses: int = 0
    userspace_notifies: int = 0
    bad_notifies: int = 0
    activations: int = 0
    activation_failures: int = 0
    resets: int = 0
    config_interrupts: int = 0
    intx_raised: int = 0
    platform_errors: int = 0
    pci_cfg_window_errors: int = 0


@dataclass
class _Queue:
    max_size: int
    size: int = 0
    msix_vector: int = VIRTIO_MSI_NO_VECTOR
    enabled: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0

    def __post_init__(self) -> None:
        self.size = self.max_size  # §4.1.4.3: queue_size reads the maximum until the driver writes it


class _Health:
    """DeviceHealth handed to one activation; calls from a previous activation (stale worker) are ignored."""

    def __init__(self, owner: VirtioPciDevice, epoch: int) -> None:
        self._owner = owner
        self._epoch = epoch

    def needs_reset(self, reason: str) -> None:
        self._owner._health_event(self._epoch, needs_reset=True, reason=reason)

    def config_changed(self) -> None:
        self._owner._health_event(self._epoch, needs_reset=False, reason="config changed")


def _new_eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _drain(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


@dataclass
class _Layout:
    num_queues: int
    num_vectors: int
    msix_table_offset: int = 0
    msix_pba_offset: int = 0
    bar_size: int = 0
    notify_len: int = field(init=False)

    def __post_init__(self) -> None:
        self.notify_len = self.num_queues * NOTIFY_OFF_MULTIPLIER
        self.msix_table_offset = NOTIFY_OFFSET + _align(self.notify_len, _PAGE)
        self.msix_pba_offset = self.msix_table_offset + _align(self.num_vectors * 16, _PAGE)
        pba_len = ((self.num_vectors + 63) // 64) * 8
        self.bar_size = _pow2_at_least(self.msix_pba_offset + _align(pba_len, _PAGE))


class VirtioPciDevice(PciDevice):
    """A VirtioDevice behind the modern PCI transport. Thread-safe: vCPU threads, the INTx poller and backend
    health callbacks may call in concurrently."""

    def __init__(self, device: VirtioDevice, mem: GuestMemory, platform: PciPlatform,
                 *, pci_cfg_cap: bool = True) -> None:
        offered = device.device_features()
        if not offered >> VIRTIO_F_VERSION_1 & 1:
            raise ValueError(f"virtio device type {device.device_type} does not offer VIRTIO_F_VERSION_1")
        sizes = tuple(device.queue_max_sizes)
        if not sizes:
            raise ValueError("a virtio device needs at least one queue")
        for s in sizes:
            if s < 1 or s > MAX_QUEUE_SIZE or s & (s - 1):
                raise ValueError(f"queue max size {s} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        self.device = device
        self.mem = mem
        self.offered_features = offered
        self.layout = _Layout(num_queues=len(sizes), num_vectors=len(sizes) + 1)
        lay = self.layout

        cls, sub = _PCI_CLASS.get(device.device_type, _PCI_CLASS_OTHER)
        dev_id = VIRTIO_PCI_DEVICE_ID_BASE + device.device_type
        cfg = PciConfiguration(
            vendor_id=VIRTIO_PCI_VENDOR_ID,
            device_id=dev_id,
            class_code=cls,
            subclass=sub,
            revision=VIRTIO_PCI_REVISION,
            # §4.1.2.1: non-transitional devices SHOULD have a subsystem device ID of 0x40 or higher.
            subsystem_vendor_id=VIRTIO_PCI_VENDOR_ID,
            subsystem_id=dev_id,
            interrupt_pin=1,  # INTA#
        )
        cfg.add_bar(BarSpec(0, lay.bar_size, BarType.MEM64))
        cfg.add_capability(_vendor_cap(VIRTIO_PCI_CAP_COMMON_CFG, 0, COMMON_CFG_OFFSET, COMMON_CFG_LEN))
        cfg.add_capability(_vendor_cap(VIRTIO_PCI_CAP_ISR_CFG, 0, ISR_CFG_OFFSET, ISR_CFG_LEN))
        cfg.add_capability(_vendor_cap(VIRTIO_PCI_CAP_DEVICE_CFG, 0, DEVICE_CFG_OFFSET, DEVICE_CFG_LEN))
        cfg.add_capability(
            _vendor_cap(VIRTIO_PCI_CAP_NOTIFY_CFG, 0, NOTIFY_OFFSET, lay.notify_len,
                        struct.pack("<I", NOTIFY_OFF_MULTIPLIER))
        )
        body, writable = msix_capability(lay.num_vectors, 0, lay.msix_table_offset, 0, lay.msix_pba_offset)
        self.msix_cap_offset = cfg.add_capability(body, writable)
        self.pci_cfg_cap_offset: int | None = None
        if pci_cfg_cap:
            # §4.1.4.9: cap.bar, cap.offset, cap.length and pci_cfg_data are driver-writable.
            cap = _vendor_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0, bytes(4))
            mask = bytes([0, 0, 0, 0, 0xFF, 0, 0, 0]) + b"\xff" * 12
            self.pci_cfg_cap_offset = cfg.add_capability(cap, mask)
        super().__init__(cfg, platform)
        self.msix = MsixConfig(lay.num_vectors, platform)
        self.msix.on_mode_change = self._wake_poller

        self.stats = VirtioPciStats()
        # Why the device last went to DEVICE_NEEDS_RESET, and who wants to know (the DM tells the daemon).
        self.needs_reset_reason: str | None = None
        self.on_needs_reset: Callable[[str], None] | None = None
        self._log = RateLimitedLog(log, per_second=5)
        self._lock = threading.RLock()
        self._status_before_reset = 0  # what the status register reads while a device's reset is pending
        self._health_lock = threading.Lock()
        self.kick_fds = [_new_eventfd() for _ in sizes]
        self.call_fds = [_new_eventfd() for _ in sizes]
        self.config_fd = _new_eventfd()
        self._wake_fd = _new_eventfd()
        self._poller: threading.Thread | None = None
        self._stop_poller = False
        self._closed = False
        self._ioeventfds: set[tuple[int, int, int | None, int]] = set()
        self._epoch = 0
        self._init_state()

    # ------------------------------------------------------------------ state
    def _init_state(self) -> None:
        self.status = 0
        self._needs_reset = False
        self.config_generation = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.msix_config = VIRTIO_MSI_NO_VECTOR
        self.queue_select = 0
        self.queues = [_Queue(s) for s in self.device.queue_max_sizes]
        self.isr = 0
        self.activated = False

    @property
    def device_status(self) -> int:
        if self.status == 0 and self._status_before_reset and self.device.reset_pending():
            return self._status_before_reset  # the reset is not complete: the driver keeps waiting (§4.1.4.3.2)
        return self.status | (STATUS_DEVICE_NEEDS_RESET if self._needs_reset else 0)

    def _selected(self) -> _Queue | None:
        if self.queue_select < len(self.queues):
            return self.queues[self.queue_select]
        return None

    # ------------------------------------------------------------------ config space (MSI-X, PCI_CFG window)
    def read_config(self, offset: int, data: memoryview) -> None:
        with self._lock:
            c = self.pci_cfg_cap_offset
            if c is not None and offset < c + 20 and offset + len(data) > c + 16:
                self._pci_cfg_window(read=True)
            super().read_config(offset, data)

    def config_traps(self) -> tuple[int, int]:
        reads, writes = super().config_traps()
        writes |= 1 << ((self.msix_cap_offset + 2) // 4)  # MSI-X message control: enables and masks vectors
        c = self.pci_cfg_cap_offset
        if c is not None:  # pci_cfg_data: an access through the window to BAR 0 (§4.1.4.9)
            reads |= 1 << ((c + 16) // 4)
            writes |= 1 << ((c + 16) // 4)
        return reads, writes

    def write_config(self, offset: int, data: bytes | memoryview) -> None:
        with self._lock:
            super().write_config(offset, data)
            end = offset + len(data)
            m = self.msix_cap_offset + 2
            if offset < m + 2 and end > m:
                self.msix.write_message_control(self.config.read(m, 2))
            c = self.pci_cfg_cap_offset
            if c is not None and offset < c + 20 and end > c + 16:
                self._pci_cfg_window(read=False)

    def _pci_cfg_window(self, read: bool) -> None:
        """§4.1.4.9.1: a pci_cfg_data access performs cap.length bytes at cap.offset of BAR cap.bar."""
        c = self.pci_cfg_cap_offset
        assert c is not None
        bar = self.config.read(c + 4, 1)
        off = self.config.read(c + 8, 4)
        length = self.config.read(c + 12, 4)
        if bar != 0 or length not in (1, 2, 4) or off % length or off + length > self.layout.bar_size:
            self.stats.pci_cfg_window_errors += 1
            return
        if read:
            buf = bytearray(length)
            self.bar_read(0, off, memoryview(buf))
            self.config.set_host(c + 16, 4, int.from_bytes(buf, "little"))
        else:
            value = self.config.read(c + 16, 4)
            self.bar_write(0, off, value.to_bytes(4, "little")[:length])

    # ------------------------------------------------------------------ BAR0
    def bar_read(self, bar: int, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))
        if bar != 0:
            return
        with self._lock:
            lay = self.layout
            if COMMON_CFG_OFFSET <= offset < COMMON_CFG_OFFSET + _PAGE:
                self._common_read(offset - COMMON_CFG_OFFSET, data)
            elif ISR_CFG_OFFSET <= offset < ISR_CFG_OFFSET + _PAGE:
                if offset == ISR_CFG_OFFSET:
                    data[0] = self._read_isr()
            elif DEVICE_CFG_OFFSET <= offset < DEVICE_CFG_OFFSET + DEVICE_CFG_LEN:
                self.device.read_config(offset - DEVICE_CFG_OFFSET, data)
            elif lay.msix_table_offset <= offset < lay.msix_table_offset + _align(self.msix.table_size, _PAGE):
                self.msix.read_table(offset - lay.msix_table_offset, data)
            elif lay.msix_pba_offset <= offset < lay.bar_size:
                self.msix.read_pba(offset - lay.msix_pba_offset, data)
            # The notify region and the gaps read as zero.

    def bar_write(self, bar: int, offset: int, data: bytes | memoryview) -> None:
        if bar != 0:
            return
        with self._lock:
            lay = self.layout
            if COMMON_CFG_OFFSET <= offset < COMMON_CFG_OFFSET + _PAGE:
                self._common_write(offset - COMMON_CFG_OFFSET, bytes(data))
            elif DEVICE_CFG_OFFSET <= offset < DEVICE_CFG_OFFSET + DEVICE_CFG_LEN:
                self.device.write_config(offset - DEVICE_CFG_OFFSET, data)
            elif NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + _align(lay.notify_len, _PAGE):
                self._notify(offset - NOTIFY_OFFSET)
            elif lay.msix_table_offset <= offset < lay.msix_table_offset + _align(self.msix.table_size, _PAGE):
                self.msix.write_table(offset - lay.msix_table_offset, data)
            elif lay.msix_pba_offset <= offset < lay.bar_size:
                self.msix.write_pba(offset - lay.msix_pba_offset, data)
            # ISR is read-only (§4.1.4.5); gaps ignore writes.

    def _notify(self, off: int) -> None:
        """A notify write that reached userspace (no ioeventfd matched): kick the queue's eventfd ourselves."""
        q = off // NOTIFY_OFF_MULTIPLIER
        if off % NOTIFY_OFF_MULTIPLIER or q >= len(self.queues):
            self.stats.bad_notifies += 1
            return
        self.stats.userspace_notifies += 1
        os.eventfd_write(self.kick_fds[q], 1)

    def _read_isr(self) -> int:
        """§4.1.4.5.1: reading the ISR returns and clears it, which also de-asserts INTx."""
        value, self.isr = self.isr, 0
        if value:
            self.set_intx(False)
        return value

    # ------------------------------------------------------------------ common configuration
    def _common_snapshot(self) -> bytes:
        q = self._selected()
        sel = self.device_feature_select
        dev_feat = (self.offered_features >> (32 * sel)) & 0xFFFF_FFFF if sel < 2 else 0
        dsel = self.driver_feature_select
        drv_feat = (self.driver_features >> (32 * dsel)) & 0xFFFF_FFFF if dsel < 2 else 0
        return _COMMON.pack(
            self.device_feature_select,
            dev_feat,
            self.driver_feature_select,
            drv_feat,
            self.msix_config,
            len(self.queues),
            self.device_status,
            self.config_generation & 0xFF,
            self.queue_select,
            q.size if q else 0,  # §4.1.4.3: 0 for a queue that does not exist
            q.msix_vector if q else VIRTIO_MSI_NO_VECTOR,
            int(q.enabled) if q else 0,
            self.queue_select if q else 0,  # queue_notify_off = q, times the multiplier
            q.desc if q else 0,
            q.driver if q else 0,
            q.device if q else 0,
        )

    def _common_read(self, off: int, data: memoryview) -> None:
        n = len(data)
        if off + n > COMMON_CFG_LEN:
            self.stats.bad_common_accesses += 1
            return  # zeros beyond the structure
        data[:] = self._common_snapshot()[off : off + n]

    def _common_write(self, off: int, data: bytes) -> None:
        n = len(data)
        value = int.from_bytes(data, "little")
        if (off, n) == (CC_DEVICE_FEATURE_SELECT, 4):
            self.device_feature_select = value
        elif (off, n) == (CC_DRIVER_FEATURE_SELECT, 4):
            self.driver_feature_select = value
        elif (off, n) == (CC_DRIVER_FEATURE, 4):
            self._write_driver_features(value)
        elif (off, n) == (CC_MSIX_CONFIG, 2):
            self.msix_config = self._checked_vector(value)
            self._sync_interrupts()
        elif (off, n) == (CC_DEVICE_STATUS, 1):
            self._write_status(value)
        elif (off, n) == (CC_QUEUE_SELECT, 2):
            self.queue_select = value
        elif (off, n) in ((CC_QUEUE_SIZE, 2), (CC_QUEUE_MSIX_VECTOR, 2), (CC_QUEUE_ENABLE, 2)):
            self._write_queue_reg(off, value)
        elif CC_QUEUE_DESC <= off < COMMON_CFG_LEN and (n == 8 and off % 8 == 0 or n == 4 and off % 4 == 0):
            self._write_queue_addr(off, n, value)
        else:
            # Read-only fields (device_feature, num_queues, config_generation, queue_notify_off) and accesses
            # not of the field's natural width (§4.1.3.1) land here.
            self.stats.bad_common_accesses += 1
            self._log.debug("virtio-pci: ignored common cfg write at 0x%x size %d", off, n)

    def _write_driver_features(self, value: int) -> None:
        # §3.1.1 step 4: features are written after DRIVER and before FEATURES_OK.
        if self.status != _AD:
            self.stats.gated_writes += 1
            return
        sel = self.driver_feature_select
        if sel >= 2:
            self.stats.bad_common_accesses += 1
            return
        offered = (self.offered_features >> (32 * sel)) & 0xFFFF_FFFF
        if value & ~offered:
            # §2.2.1: the driver MUST NOT accept a feature the device did not offer; keep only offered bits.
            self.stats.unoffered_feature_writes += 1
        shift = 32 * sel
        self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) | ((value & offered) << shift)

    def _checked_vector(self, value: int) -> int:
        """§4.1.5.1.2: a vector the device cannot map reads back as NO_VECTOR."""
        if value == VIRTIO_MSI_NO_VECTOR:
            return value
        if value >= self.msix.num_vectors:
            self.stats.bad_queue_values += 1
            return VIRTIO_MSI_NO_VECTOR
        return value

    def _queue_writable(self) -> _Queue | None:
        # §4.1.4.3.2 / §3.1.1 step 7: virtqueues are set up after FEATURES_OK and before DRIVER_OK.
        if self.status & (STATUS_DRIVER_OK | STATUS_FAILED) or not self.status & STATUS_FEATURES_OK:
            self.stats.gated_writes += 1
            return None
        q = self._selected()
        if q is None or q.enabled:
            # A missing queue, or one already enabled (its fields must be set before enabling, §4.1.4.3.2).
            self.stats.gated_writes += 1
            return None
        return q

    def _write_queue_reg(self, off: int, value: int) -> None:
        q = self._queue_writable()
        if q is None:
            return
        if off == CC_QUEUE_SIZE:
            if value < 1 or value > q.max_size or value & (value - 1):
                # §2.7: split-queue size is a power of 2 no larger than the device's maximum.
                self.stats.bad_queue_values += 1
                return
            q.size = value
        elif off == CC_QUEUE_MSIX_VECTOR:
            q.msix_vector = self._checked_vector(value)
        elif off == CC_QUEUE_ENABLE:
            if value != 1:
                # §4.1.4.3.2: the driver MUST NOT write 0 to queue_enable.
                self.stats.bad_queue_values += 1
                return
            # §2.7 alignment: descriptor table 16, driver (avail) ring 2, device (used) ring 4.
            if q.desc % 16 or q.driver % 2 or q.device % 4:
                self.stats.bad_queue_values += 1
                return
            q.enabled = True

    def _write_queue_addr(self, off: int, n: int, value: int) -> None:
        q = self._queue_writable()
        if q is None:
            return
        base = CC_QUEUE_DESC + ((off - CC_QUEUE_DESC) // 8) * 8
        name = {CC_QUEUE_DESC: "desc", CC_QUEUE_DRIVER: "driver", CC_QUEUE_DEVICE: "device"}[base]
        cur = getattr(q, name)
        if n == 8:
            new = value
        elif off == base:
            new = (cur & ~0xFFFF_FFFF) | value
        else:
            new = (cur & 0xFFFF_FFFF) | (value << 32)
        setattr(q, name, new)

    # ------------------------------------------------------------------ device status
    def _write_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        new = value & ~STATUS_DEVICE_NEEDS_RESET  # that bit is the device's (§2.1.1); drivers echo it back
        old = self.status
        if new == old:
            return
        if new == old | STATUS_FAILED:
            self.status = new  # §2.1: the driver may give up at any point
            return
        if (old, new) not in VALID_TRANSITIONS:
            self.stats.invalid_status_writes += 1
            self._log.warning("virtio-pci: invalid status transition 0x%x -> 0x%x ignored", old, new)
            return
        if new == _ADF:
            # §2.2 / §6.1: a modern-only device refuses a driver that did not accept VERSION_1; FEATURES_OK
            # stays clear so the driver's read-back sees the refusal (§3.1.1 step 6).
            if not self.driver_features >> VIRTIO_F_VERSION_1 & 1:
                self.stats.features_refused += 1
                return
            self.status = new
            self.device.ack_features(self.driver_features)
            return
        self.status = new
        if new == _ADFO:
            self._activate()

    def _activate(self) -> None:
        queues = [
            QueueConfig(
                index=i,
                size=q.size,
                desc_table=q.desc,
                avail_ring=q.driver,
                used_ring=q.device,
                kick_fd=self.kick_fds[i],
                call_fd=self.call_fds[i],
                event_idx=bool(self.driver_features >> VIRTIO_F_EVENT_IDX & 1),
            )
            for i, q in enumerate(self.queues)
            if q.enabled
        ]
        self._sync_ioeventfds()
        self._sync_interrupts()
        self._wake_poller()
        with self._health_lock:
            epoch = self._epoch
        self.stats.activations += 1
        try:
            self.device.activate(self.mem, queues, _Health(self, epoch))
        except Exception as e:  # a backend failing to start is not the guest's fault, nor fatal to the VM
            self.stats.activation_failures += 1
            self._log.warning("virtio-pci: device activation failed: %s", e)
            self._health_event(epoch, needs_reset=True, reason=f"activation failed: {e}")
            return
        self.activated = True

    def _reset(self) -> None:
        """§2.4 / §4.1.4.3.1: status 0 resets the device; the register reads 0 once the reset is complete."""
        self.stats.resets += 1
        self._status_before_reset = self.device_status or STATUS_ACKNOWLEDGE
        with self._health_lock:
            self._epoch += 1
        try:
            self.device.reset()
        except Exception as e:
            self._log.warning("virtio-pci: device reset failed: %s", e)
        self._init_state()
        self._sync_ioeventfds()
        self._sync_interrupts()
        for fd in (*self.kick_fds, *self.call_fds, self.config_fd):
            _drain(fd)
        self.set_intx(False)
        self._wake_poller()

    # ------------------------------------------------------------------ health (backend threads)
    def _health_event(self, epoch: int, *, needs_reset: bool, reason: str) -> None:
        with self._health_lock:
            if epoch != self._epoch:
                return
            if needs_reset:
                self._needs_reset = True
                self.needs_reset_reason = reason
                self._log.warning("virtio-pci: device needs reset: %s", reason)
                if self.on_needs_reset is not None:
                    self.on_needs_reset(reason)
            else:
                self.config_generation = (self.config_generation + 1) & 0xFF
            # §2.1.2 / §4.1.4.5: with DRIVER_OK set, the device sends a configuration change notification.
            if self.status & STATUS_DRIVER_OK:
                self.stats.config_interrupts += 1
                os.eventfd_write(self.config_fd, 1)

    # ------------------------------------------------------------------ ioeventfds and interrupt routing
    def on_bar_moved(self, bar: int, old: int | None, new: int | None) -> None:
        if bar == 0:
            self._sync_ioeventfds()

    def notify_address(self, queue: int) -> int | None:
        base = self.bar_mapping(0)
        return None if base is None else base + NOTIFY_OFFSET + queue * NOTIFY_OFF_MULTIPLIER

    def _sync_ioeventfds(self) -> None:
        want: set[tuple[int, int, int | None, int]] = set()
        base = self.bar_mapping(0)
        if base is not None and self.status & STATUS_DRIVER_OK:
            for i, q in enumerate(self.queues):
                if q.enabled:
                    addr = base + NOTIFY_OFFSET + i * NOTIFY_OFF_MULTIPLIER
                    want.add((addr, NOTIFY_IOEVENTFD_LEN, None, self.kick_fds[i]))
        assert self.platform is not None
        for ev in sorted(self._ioeventfds - want, key=str):
            try:
                self.platform.unregister_ioeventfd(*ev)
            except OSError as e:
                self.stats.platform_errors += 1
                self._log.warning("virtio-pci: ioeventfd unregister failed: %s", e)
            self._ioeventfds.discard(ev)
        for ev in sorted(want - self._ioeventfds, key=str):
            try:
                self.platform.register_ioeventfd(*ev)
            except OSError as e:
                # The notify write then exits to userspace and _notify kicks the eventfd: slower, still correct.
                self.stats.platform_errors += 1
                self._log.warning("virtio-pci: ioeventfd register failed: %s", e)
                continue
            self._ioeventfds.add(ev)

    def registered_ioeventfds(self) -> set[tuple[int, int, int | None, int]]:
        return set(self._ioeventfds)

    def _sync_interrupts(self) -> None:
        sources: dict[int, int] = {}
        if self.msix_config != VIRTIO_MSI_NO_VECTOR:
            sources[self.config_fd] = self.msix_config
        if self.status & STATUS_DRIVER_OK:
            for i, q in enumerate(self.queues):
                if q.enabled and q.msix_vector != VIRTIO_MSI_NO_VECTOR:
                    sources[self.call_fds[i]] = q.msix_vector
        self.msix.set_sources(sources)

    # ------------------------------------------------------------------ INTx
    def intx_fds(self) -> list[int]:
        """The eventfds the INTx path must watch now (none while MSI-X is enabled: KVM consumes those)."""
        with self._lock:
            if self.msix.enabled or not self.status & STATUS_DRIVER_OK:
                return []
            return [self.call_fds[i] for i, q in enumerate(self.queues) if q.enabled] + [self.config_fd]

    def service_interrupts(self) -> bool:
        """INTx mode: fold signalled call/config eventfds into the ISR and raise INTx. True if it raised."""
        with self._lock:
            if self.msix.enabled or not self.status & STATUS_DRIVER_OK:
                return False
            isr = 0
            for i, q in enumerate(self.queues):
                if q.enabled and _drain(self.call_fds[i]):
                    isr |= ISR_QUEUE
            if _drain(self.config_fd):
                isr |= ISR_CONFIG
            if not isr:
                return False
            self.isr |= isr
            self.stats.intx_raised += 1
            self.set_intx(True)
            return True

    def start_intx_poller(self) -> None:
        """A daemon thread that services INTx while MSI-X is off. VMMs with their own epoll may instead watch
        intx_fds() and call service_interrupts()."""
        if self._poller is not None:
            return
        self._stop_poller = False
        self._poller = threading.Thread(target=self._poll_loop, name="virtio-pci-intx", daemon=True)
        self._poller.start()

    def stop_intx_poller(self) -> None:
        t = self._poller
        if t is None:
            return
        self._stop_poller = True
        self._wake_poller()
        t.join()
        self._poller = None

    def _wake_poller(self) -> None:
        if not self._closed:
            os.eventfd_write(self._wake_fd, 1)

    def _poll_loop(self) -> None:
        while not self._stop_poller:
            p = select.poll()
            p.register(self._wake_fd, select.POLLIN)
            for fd in self.intx_fds():
                p.register(fd, select.POLLIN)
            events = p.poll()
            if any(fd == self._wake_fd for fd, _ in events):
                _drain(self._wake_fd)
            self.service_interrupts()

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Host-side: reset the device, drop BAR mappings and irqfds, close every eventfd."""
        with self._lock:
            self._reset()
            self.msix.detach_all()
            self.unmap_all()
        self.stop_intx_poller()
        self._closed = True
        for fd in (*self.kick_fds, *self.call_fds, self.config_fd, self._wake_fd):
            os.close(fd)
