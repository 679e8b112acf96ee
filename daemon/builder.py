"""The one recipe that turns a validated :class:`~daemon.config.GuestDefinition` plus its privileged resources
into a VM ready to start (Firecracker's ``builder.rs`` on top of ``resources.rs``).

Both callers go through :func:`build_vm`; they differ only in where the resources come from:

* the jailed device model (daemon.dm) gets every fd from the daemon (``--disk-fd``, ``--tap-fd``: pass fds, not
  paths — the jail can open nothing);
* the foreground runner (``kvmdm run``, daemon.runner) prepares them itself as root: opens images, creates taps,
  starts vhost-user back-ends, and cleans all of that up when the guest stops.

The recipe, in order: the machine (``daemon.vmm.Vmm.build``: RAM, irqchip, platform devices, PCI root, ACPI, the
kernel), then one independent ``attach_*`` step per device class in the definition's order — disks, nics, rng,
the second console — then ``finish`` (BARs, vCPUs). The DM numbers its vhost-user devices in that same order
(disks, then nics), which is the ``device`` of the daemon's ``attach_backend`` command (daemon.backends).

Resource ownership: :func:`build_vm` takes over every fd in :class:`GuestResources`, on failure as on success;
:meth:`BuiltVm.close` (or the failed build itself) closes them. The caller keeps what is not an fd (tap names,
back-end processes) and cleans that up after :meth:`BuiltVm.close`.

Nothing here may be imported lazily inside the DM's jail: :func:`preload_for` imports, before the jail, the device
modules a definition needs; the ``attach_*`` steps then find them in ``sys.modules``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from daemon.config import GuestDefinition

if TYPE_CHECKING:
    from daemon.vmm import MachineConfig, Vmm
    from devices.serial import SerialSink
    from kvmcore.kvm import Kvm
    from kvmcore.memory import GuestMemory
    from pv.device import VirtioDevice

VIRTIO_BLK_CONFIG_SIZE = 60  # struct virtio_blk_config up to write_zeroes_may_unmap (virtio 1.2 §5.2.4)
VIRTIO_NET_S_LINK_UP = 1  # virtio 1.2 §5.1.4
BIOS_LOG_PREFIX = b"[bios] "


class ResourceMismatchError(ValueError):
    """The resources handed to the builder do not match the definition (one fd per disk and per nic)."""


class VirtioAttachable(Protocol):
    """What the attach steps need of a VM under construction (daemon.vmm.Vmm; a fake in the unit tests)."""

    def attach_virtio(self, device: VirtioDevice) -> Any: ...


@dataclass
class GuestResources:
    """The privileged inputs of one guest, in definition order.

    ``disks[i]``: for an inline disk the image opened O_RDWR (O_RDONLY when ``read_only``); for a vhost-user disk
    a unix stream socket connected to its back-end (daemon-managed or external). ``nics[i]``: for an inline nic
    the tap (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, 12-byte header, daemon.net.create_tap); for a vhost-user nic a socket
    connected to the net back-end that holds the tap.
    """

    kernel: bytes
    initrd: bytes | None = None
    disks: list[int] = field(default_factory=list)
    nic_rom: bytes | None = None  # a firmware guest's virtio-net option ROM (x86 image), when the definition has one
    nics: list[int] = field(default_factory=list)

    def fds(self) -> list[int]:
        return [*self.disks, *self.nics]


@dataclass
class BuiltVm:
    """A VM built from a definition: attached, BARs placed, vCPUs created, not started."""

    vmm: Vmm
    # Every vhost-user front-end in attach order (disks, then nics): the ``device`` of attach_backend.
    vhost_devices: list[Any] = field(default_factory=list)
    devices: list[VirtioDevice] = field(default_factory=list)  # every virtio backend in attach (PCI slot) order
    owned_fds: list[int] = field(default_factory=list)  # image and tap fds (vhost-user sockets: their devices)
    console_log: Any = None  # the pv.console.SharedConsoleLog of COM1 and hvc0, when there is a second console
    firmware_log: Any = None  # the SharedConsoleLog of COM1 and the BIOS debug port, for a firmware guest
    closed: bool = False

    def close(self) -> None:
        """Close the VM, then the vhost-user connections and every fd the build took over. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.vmm.close()
        self.flush_logs()
        _close_all(self.vhost_devices, self.owned_fds)

    def flush_logs(self) -> None:
        """Write out the lines the shared console logs still hold (the second console's, the BIOS debug port's
        last line): call once the guest has stopped. Idempotent."""
        if self.console_log is not None:
            self.console_log.close()  # what the second console wrote last reaches the log
        if self.firmware_log is not None:
            self.firmware_log.close()  # the BIOS's last debug line, e.g. a boot loader's words before a reset


def _close_all(vhost_devices: Sequence[Any], fds: Sequence[int]) -> None:
    for dev in vhost_devices:
        with contextlib.suppress(Exception):  # a back-end that already hung up: its socket closes all the same
            dev.close()
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def preload_for(d: GuestDefinition) -> None:
    """Import, before the jail, what this guest's devices need. The virtio PCI transport and the block backend
    cost ~25 ms of DM startup (bench/daemon.py), so a guest without virtio devices does not pay for them."""
    if d.disks or d.nics or d.rng or d.console2:
        import devices.virtio_pci  # noqa: F401
        import pv.blk  # noqa: F401
    if d.rng:
        import pv.rng  # noqa: F401
    if d.console2 or d.firmware is not None:
        import pv.console  # noqa: F401 - a firmware guest's BIOS debug port shares the console log through it
    if d.nics:
        import pv.net  # noqa: F401
    if needs_shared_memory(d):
        import pv.vhost_user.frontend  # noqa: F401


def needs_shared_memory(d: GuestDefinition) -> bool:
    """Guest RAM must be a (sealed) memfd that back-ends can map when any device is vhost-user; otherwise it is
    anonymous memory, which gets transparent huge pages (kvmcore.memory)."""
    return any(disk.backend == "vhost-user" for disk in d.disks) or any(nic.backend == "vhost-user" for nic in d.nics)


def guest_memory(d: GuestDefinition, mem_size: int) -> GuestMemory:
    from kvmcore import layout
    from kvmcore.memory import GuestMemory

    return GuestMemory.create(layout.ram_layout(mem_size), shared=needs_shared_memory(d))


def machine_config(d: GuestDefinition, res: GuestResources, *, mem_size: int | None = None) -> MachineConfig:
    """The machine half of the definition. ``mem_size`` (bytes) replaces ``memory_mib`` for a caller whose size
    is not a whole number of MiB (``kvmdm run --kernel K --mem 4100K``)."""
    from daemon.vmm import MachineConfig

    size = mem_size if mem_size is not None else d.memory_mib << 20
    if d.firmware is not None:
        # The image in the kernel's place is the BIOS (read from the firmware file, or the DM's --kernel-fd).
        pci_roms = {}
        if res.nic_rom is not None and d.nics:
            from devices.virtio_pci import VIRTIO_PCI_DEVICE_ID_BASE, VIRTIO_PCI_VENDOR_ID
            from pv.device import VIRTIO_ID_NET

            pci_roms[(VIRTIO_PCI_VENDOR_ID, VIRTIO_PCI_DEVICE_ID_BASE + VIRTIO_ID_NET)] = res.nic_rom
        return MachineConfig(mem_size=size, vcpus=d.vcpus, firmware=res.kernel, boot_order=d.boot_devices(),
                             testdev=False, pci_roms=pci_roms)
    return MachineConfig(mem_size=size, vcpus=d.vcpus, kernel=res.kernel, cmdline=d.cmdline, initrd=res.initrd)


def check_resources(d: GuestDefinition, res: GuestResources) -> None:
    """One fd per disk and one per nic, before anything is created."""
    problems = []
    if len(res.disks) != len(d.disks):
        problems.append(f"{len(d.disks)} disks but {len(res.disks)} disk fds")
    if len(res.nics) != len(d.nics):
        problems.append(f"{len(d.nics)} nics but {len(res.nics)} nic fds")
    if problems:
        raise ResourceMismatchError("; ".join(problems))


class _Discard:
    def write(self, data: bytes) -> None:
        pass


def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _vhost_user(fd: int, device_type: int, owned: list[int], **kw: Any) -> Any:
    """A vhost-user front-end on connected socket ``fd``; ``fd`` leaves ``owned`` once a socket object holds it
    (from then on closing the socket, or the device, closes it)."""
    from pv.vhost_user.frontend import VhostUserDevice

    sock = socket.socket(fileno=fd)
    owned.remove(fd)
    try:
        return VhostUserDevice(sock, device_type, **kw)
    except BaseException:
        sock.close()
        raise


def attach_disks(vm: VirtioAttachable, d: GuestDefinition, fds: Sequence[int], built: BuiltVm) -> None:
    """One virtio-blk PCI function per disk: pv.blk.Block on the image (inline) or a vhost-user front-end."""
    if not d.disks:
        return  # pv.blk was not preloaded (preload_for), and importing in the jail fails
    from pv.blk import Block

    for disk, fd in zip(d.disks, fds, strict=True):
        dev: VirtioDevice
        if disk.backend == "vhost-user":
            from pv.device import VIRTIO_ID_BLOCK

            # The back-end owns blk's config space (capacity, serial); the front-end only relays it.
            dev = _vhost_user(fd, VIRTIO_ID_BLOCK, built.owned_fds, num_queues=1, config_size=VIRTIO_BLK_CONFIG_SIZE)
            built.vhost_devices.append(dev)
        else:
            dev = Block(fd, read_only=disk.read_only, serial=disk.serial)
        vm.attach_virtio(dev)
        built.devices.append(dev)


def attach_nics(vm: VirtioAttachable, d: GuestDefinition, fds: Sequence[int], built: BuiltVm) -> None:
    """One virtio-net PCI function per nic: pv.net.Net on the tap (inline) or a vhost-user front-end."""
    if not d.nics:
        return  # pv.net was not preloaded (preload_for)
    from pv.net import Net

    for nic, fd in zip(d.nics, fds, strict=True):
        dev: VirtioDevice
        if nic.backend == "vhost-user":
            from pv.device import VIRTIO_ID_NET

            # The front-end owns net's config space (MAC, link up, one queue pair, no MTU), as QEMU does.
            config = struct.pack("<6sHHH", _mac_bytes(nic.mac), VIRTIO_NET_S_LINK_UP, 1, 0)
            dev = _vhost_user(fd, VIRTIO_ID_NET, built.owned_fds, num_queues=2, config=config)
            built.vhost_devices.append(dev)
        else:
            dev = Net(fd, _mac_bytes(nic.mac))
        vm.attach_virtio(dev)
        built.devices.append(dev)


def attach_rng_console(vm: VirtioAttachable, d: GuestDefinition, console_sink: SerialSink | None,
                       built: BuiltVm) -> None:
    """virtio-rng and the second console (virtio-console), after disks and nics, when the definition asks.
    ``console_sink`` is the second console's stream of the console log it shares with COM1
    (pv.console.SharedConsoleLog: whole lines with a "[hvc0] " prefix, between COM1's lines); host input still
    goes to COM1 only."""
    dev: VirtioDevice
    if d.rng:
        from pv.rng import Rng

        dev = Rng()
        vm.attach_virtio(dev)
        built.devices.append(dev)
    if d.console2:
        from pv.console import Console

        dev = Console(console_sink if console_sink is not None else _Discard())
        vm.attach_virtio(dev)
        built.devices.append(dev)


def attach_devices(vm: VirtioAttachable, d: GuestDefinition, res: GuestResources, built: BuiltVm,
                   console_sink: SerialSink | None) -> None:
    """Every device of the definition, in the order that fixes PCI slots and vhost-user device numbers."""
    attach_disks(vm, d, res.disks, built)
    attach_nics(vm, d, res.nics, built)
    attach_rng_console(vm, d, console_sink, built)


def build_vm(d: GuestDefinition, res: GuestResources, *, serial_sink: SerialSink | None,
             kvm: Kvm | None = None, mem: GuestMemory | None = None, mem_size: int | None = None,
             on_device_alert: Callable[[str], None] | None = None,
             vmm_factory: Callable[..., Vmm] | None = None) -> BuiltVm:
    """Assemble the VM for ``d`` from ``res`` (whose fds it takes over, see the module docstring).

    ``kvm``/``mem``: the DM's /dev/kvm fd and the guest RAM it allocated before its jail. ``serial_sink`` gets
    COM1 and, as whole prefixed lines between COM1's lines, the second console. ``vmm_factory`` replaces daemon.vmm.Vmm (unit tests).
    """
    owned = res.fds()
    com1_sink, hvc0_sink, shared = serial_sink, serial_sink, None
    try:
        check_resources(d, res)
        if d.console2 and serial_sink is not None:
            from pv.console import SharedConsoleLog

            shared = SharedConsoleLog(serial_sink)
            com1_sink, hvc0_sink = shared.primary, shared.secondary
        bios_log = None
        if d.firmware is not None and serial_sink is not None:
            from pv.console import SharedConsoleLog

            # The BIOS's debug port (0x402) in whole "[bios] " lines between COM1's (SeaBIOS's sercon) lines.
            bios_log = SharedConsoleLog(com1_sink, prefix=BIOS_LOG_PREFIX)  # type: ignore[arg-type]
            com1_sink = bios_log.primary  # type: ignore[assignment]
        cfg = machine_config(d, res, mem_size=mem_size)
        if vmm_factory is None:
            from daemon.vmm import Vmm

            vmm_factory = Vmm
            if mem is None:
                mem = guest_memory(d, cfg.mem_size)  # the Vmm owns and closes it
        vmm = vmm_factory(cfg, kvm=kvm, serial_sink=com1_sink, mem=mem)
    except BaseException:
        _close_all((), owned)
        raise
    built = BuiltVm(vmm, owned_fds=owned, console_log=shared, firmware_log=bios_log)
    try:
        vmm.on_device_alert = on_device_alert
        if bios_log is not None:
            vmm.firmware_log_sink = bios_log.secondary
        vmm.build()
        attach_devices(vmm, d, res, built, hvc0_sink)
        vmm.finish()
    except BaseException:
        built.close()
        raise
    return built
