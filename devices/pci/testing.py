"""Test doubles for PCI devices, shipped with the package (like virtio-queue's MockSplitQueue).

``FakePlatform`` records every platform call and behaves like the parts of KVM a device relies on: BARs are
really placed on an MMIO/port Bus (so overlaps fail as they would in the VMM), and ``mmio_write`` matches
registered ioeventfds first, signalling their eventfd instead of reaching the device, as KVM does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from devices.bus import Bus, BusDevice, mmio_bus, pio_bus


@dataclass
class FakePlatform:
    mmio: Bus = field(default_factory=mmio_bus)
    pio: Bus = field(default_factory=pio_bus)
    calls: list[tuple] = field(default_factory=list)
    ioeventfds: set[tuple[int, int, int | None, int]] = field(default_factory=set)
    irqfds: set[tuple[int, int]] = field(default_factory=set)
    routes: dict[int, tuple[int, int, bool]] = field(default_factory=dict)
    intx_level: bool = False
    next_gsi: int = 24  # above the IOAPIC pins
    ioeventfd_hits: int = 0

    def map_mmio(self, device: BusDevice, addr: int, size: int) -> None:
        self.mmio.insert(device, addr, size)
        self.calls.append(("map_mmio", addr, size))

    def unmap_mmio(self, addr: int) -> None:
        self.mmio.remove(addr)
        self.calls.append(("unmap_mmio", addr))

    def map_pio(self, device: BusDevice, port: int, size: int) -> None:
        self.pio.insert(device, port, size)
        self.calls.append(("map_pio", port, size))

    def unmap_pio(self, port: int) -> None:
        self.pio.remove(port)
        self.calls.append(("unmap_pio", port))

    def register_ioeventfd(self, addr: int, length: int, datamatch: int | None, fd: int) -> None:
        key = (addr, length, datamatch, fd)
        if key in self.ioeventfds:
            raise OSError(17, "ioeventfd already registered")  # EEXIST, as KVM says
        self.ioeventfds.add(key)
        self.calls.append(("register_ioeventfd", *key))

    def unregister_ioeventfd(self, addr: int, length: int, datamatch: int | None, fd: int) -> None:
        key = (addr, length, datamatch, fd)
        if key not in self.ioeventfds:
            raise OSError(2, "no such ioeventfd")  # ENOENT
        self.ioeventfds.remove(key)
        self.calls.append(("unregister_ioeventfd", *key))

    def set_msi_route(self, gsi: int, address: int, data: int, masked: bool) -> None:
        self.routes[gsi] = (address, data, masked)
        self.calls.append(("set_msi_route", gsi, address, data, masked))

    def allocate_gsi(self) -> int:
        gsi = self.next_gsi
        self.next_gsi += 1
        self.calls.append(("allocate_gsi", gsi))
        return gsi

    def irqfd(self, gsi: int, fd: int, register: bool) -> None:
        key = (gsi, fd)
        if register:
            if key in self.irqfds:
                raise OSError(16, "irqfd busy")  # EBUSY
            self.irqfds.add(key)
        else:
            if key not in self.irqfds:
                raise OSError(2, "no such irqfd")
            self.irqfds.remove(key)
        self.calls.append(("irqfd", gsi, fd, register))

    def intx(self, level: bool) -> None:
        self.intx_level = level
        self.calls.append(("intx", level))

    # ------------------------------------------------------------------ guest-side helpers
    def mmio_write(self, addr: int, data: bytes) -> None:
        for a, length, datamatch, fd in self.ioeventfds:
            if a != addr or (length and length != len(data)):
                continue
            if datamatch is not None and int.from_bytes(data, "little") != datamatch:
                continue
            self.ioeventfd_hits += 1
            os.eventfd_write(fd, 1)
            return
        self.mmio.write(addr, data)

    def mmio_read(self, addr: int, size: int) -> int:
        buf = bytearray(size)
        self.mmio.read(addr, memoryview(buf))
        return int.from_bytes(buf, "little")

    def mmio_write_int(self, addr: int, size: int, value: int) -> None:
        self.mmio_write(addr, value.to_bytes(size, "little"))

    def calls_named(self, name: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == name]
