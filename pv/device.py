"""The contract between a virtio transport (devices/virtio_pci) and a virtio device backend (pv/*).

Narrow on purpose, so a backend can move into another process (vhost-user) unchanged in spirit: it sees guest
memory, its queues' ring addresses, one kick eventfd and one call eventfd per queue, and nothing of vCPUs or buses.
The transport owns feature negotiation bookkeeping, device status, and turning call eventfds into interrupts
(MSI-X irqfd, or INTx + ISR bit). Virtio 1.2 section numbers are cited where a rule comes from the spec.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Protocol

from kvmcore.memory import GuestMemory

# Virtio device IDs (virtio 1.2 §5).
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4

# Reserved feature bits (virtio 1.2 §6).
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35

# Device status bits (virtio 1.2 §2.1).
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128


@dataclass
class QueueConfig:
    """One virtqueue as the driver configured it through the transport (virtio 1.2 §4.1.4.3)."""

    index: int
    size: int
    desc_table: int
    avail_ring: int
    used_ring: int
    kick_fd: int  # eventfd the guest's notify write signals (ioeventfd)
    call_fd: int  # eventfd the backend writes to interrupt the guest (irqfd or transport-polled)
    event_idx: bool = False
    # Where the rings resume (vhost-user SET_VRING_BASE, snapshot restore); 0/0 for a fresh start (§2.7).
    next_avail: int = 0
    next_used: int = 0


class DeviceHealth(Protocol):
    def needs_reset(self, reason: str) -> None:
        """The device saw a driver/spec violation it cannot recover from: set DEVICE_NEEDS_RESET (§2.1.1)."""

    def config_changed(self) -> None:
        """Device configuration changed (e.g. net link status): config-change interrupt (§4.1.4.5)."""


class VirtioDevice(ABC):
    device_type: int
    # Maximum size of each queue the device has; the driver may pick a smaller power of two.
    queue_max_sizes: tuple[int, ...]

    @abstractmethod
    def device_features(self) -> int:
        """Feature bits offered; must include VIRTIO_F_VERSION_1 (we are a modern-only device)."""

    def ack_features(self, features: int) -> None:
        """Called once at FEATURES_OK with what the driver accepted (already ANDed with the offer)."""
        self.acked_features = features

    @abstractmethod
    def read_config(self, offset: int, data: memoryview) -> None:
        """Device-specific config space read; out-of-range offsets read as zero, never raise."""

    def write_config(self, offset: int, data: bytes | memoryview) -> None:
        """Device-specific config space write; ignored unless the device defines writable fields."""
        return None

    @abstractmethod
    def activate(self, mem: GuestMemory, queues: list[QueueConfig], health: DeviceHealth) -> None:
        """DRIVER_OK: start serving the queues (typically a worker thread polling the kick fds)."""

    def active_queues(self) -> list[Any]:
        """The pv.queue.SplitQueue objects serving right now (to read ring positions back when stopping)."""
        return []

    @abstractmethod
    def reset(self) -> None:
        """Driver wrote status 0, or the VM is stopping: stop serving, forget queue state (§2.4)."""

    def reset_pending(self) -> bool:
        """True while a reset is still being carried out off the vCPU thread (vhost-user: the back-end has not
        confirmed that its rings stopped). The transport's status register does not read 0 until then, so the
        driver, which waits for 0 (§4.1.4.3.2), does not reuse the ring memory early."""
        return False
