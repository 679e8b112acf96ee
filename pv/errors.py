"""Guest-caused virtqueue errors: one flat family, one class per failure site.

Every class here means *the driver broke a rule of the virtio spec*; the device's answer is always the same
(log rate-limited, count, set DEVICE_NEEDS_RESET per virtio 1.2 §2.1.1, stop serving the queue), never a crash.
Host-side failures (the image file's disk failing, a bad config) are not in this family on purpose.

Each class's docstring is its message; ``rule`` quotes the spec text the driver violated, so a log line (and a
test name) can point at the exact requirement. Modelled on rust-vmm virtio-queue's flat ``Error`` enum.
"""

from __future__ import annotations


class VirtqueueError(Exception):
    """The driver put something on a virtqueue that the device must not act on."""

    rule: str = ""

    def __init__(self, detail: str = "") -> None:
        msg = (self.__doc__ or type(self).__name__).strip()
        if detail:
            msg = f"{msg}: {detail}"
        super().__init__(msg)
        self.detail = detail


class InvalidQueueConfig(VirtqueueError):
    """Queue size or ring addresses are invalid (not a power of two, misaligned, or not in guest RAM)."""

    rule = (
        "§2.7: Queue Size value is always a power of 2. The maximum Queue Size value is 32768. "
        "The driver MUST ensure that the physical address of the first byte of each virtqueue part is a "
        "multiple of the specified alignment value"
    )


class AvailRingOverflow(VirtqueueError):
    """The available index moved more than the queue size ahead of the device (driver made the ring overflow)."""

    rule = "§2.7.13: the ring buffer is the same size as the descriptor table; avail idx cannot run ahead by more"


class DescriptorIndexOutOfRange(VirtqueueError):
    """A chain head or `next` field refers to a descriptor outside the (direct or indirect) table."""

    rule = "§2.7.5: The number of descriptors in the table is defined by the queue size for this virtqueue"


class InvalidDescriptorRange(VirtqueueError):
    """A descriptor's buffer (addr, len) is not entirely inside one guest RAM region."""

    rule = "§2.7.5: addr is a physical address (of guest memory the device may access)"


class ChainTooLong(VirtqueueError):
    """The chain visits more descriptors than its table holds: it is too long or it loops."""

    rule = "§2.7.5.3.1: A driver MUST NOT create a descriptor chain longer than the Queue Size of the device"


class ChainLengthOverflow(VirtqueueError):
    """The chain's buffers add up to more than 2**32 bytes."""

    rule = "§2.7.5.2: Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in total"


class IndirectNotNegotiated(VirtqueueError):
    """A descriptor has VIRTQ_DESC_F_INDIRECT but VIRTIO_F_INDIRECT_DESC was not negotiated."""

    rule = (
        "§2.7.5.3.1: The driver MUST NOT set the VIRTQ_DESC_F_INDIRECT flag unless the "
        "VIRTIO_F_INDIRECT_DESC feature was negotiated"
    )


class NestedIndirect(VirtqueueError):
    """A descriptor inside an indirect table has VIRTQ_DESC_F_INDIRECT set."""

    rule = (
        "§2.7.5.3.1: The driver MUST NOT set the VIRTQ_DESC_F_INDIRECT flag within an indirect descriptor "
        "(ie. only one table per descriptor)"
    )


class IndirectWithNext(VirtqueueError):
    """A descriptor has both VIRTQ_DESC_F_INDIRECT and VIRTQ_DESC_F_NEXT set."""

    rule = "§2.7.5.3.1: A driver MUST NOT set both VIRTQ_DESC_F_INDIRECT and VIRTQ_DESC_F_NEXT in flags"


class InvalidIndirectLength(VirtqueueError):
    """An indirect table's length is zero, not a multiple of 16, or holds more entries than the queue size."""

    rule = (
        "§2.7.5.3: struct indirect_descriptor_table { struct virtq_desc desc[len / 16]; }; "
        "§2.7.5.3.1: A driver MUST NOT create a descriptor chain longer than the Queue Size of the device"
    )


class ReadableAfterWritable(VirtqueueError):
    """A device-readable descriptor follows a device-writable one in the same chain."""

    rule = (
        "§2.7.4.2: The driver MUST place any device-writable descriptor elements after any "
        "device-readable descriptor elements"
    )
