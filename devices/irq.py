"""How a device raises an interrupt, without knowing whether an irqfd, a test or a transport is behind it."""

from __future__ import annotations

import os
from typing import Protocol


class IrqTrigger(Protocol):
    def trigger(self) -> None:
        """Signal one edge (an irqfd write; MSI; an ISA edge-triggered line)."""


class EventFdTrigger:
    """Edge trigger backed by an eventfd registered with KVM as an irqfd for a GSI."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.count = 0

    def trigger(self) -> None:
        self.count += 1
        os.eventfd_write(self.fd, 1)


class CountingTrigger:
    """For tests and for devices whose line is not wired: counts edges."""

    def __init__(self) -> None:
        self.count = 0

    def trigger(self) -> None:
        self.count += 1
