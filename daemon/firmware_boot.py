"""The firmware half of a PC (daemon.vmm.Vmm with ``MachineConfig.firmware``): what a BIOS needs around it.

* memory: kvmcore.firmware.FirmwareMemory's slots (BIOS at the top of 4 GiB, its ISA alias, shadow RAM), the
  devices.pam state machine behind the i440FX PAM registers, and the MMIO sink that takes writes to read-only
  shadow regions;
* ports: QEMU's fw_cfg (0x510/0x511, DMA at 0x514) with kvmdm's PC items (devices.fw_cfg.pc_fw_cfg) and the
  debug console at 0x402 (devices.debugcon), whose output joins the console log;
* the end of a boot that found nothing: SeaBIOS says "No bootable device." on the debug port, waits
  BOOT_FAIL_WAIT_MS and resets; :attr:`FirmwareBoot.boot_failed` makes daemon.vmm.Vmm end the guest there with a
  "no bootable device" crash instead of rebooting it into the same failure forever.

Created in ``Vmm.attach_memory`` (memory), completed in ``Vmm.finish`` (ports: the boot order needs the PCI
slots of the devices attached in between).
"""

from __future__ import annotations

from collections.abc import Sequence

from devices.bus import Bus
from devices.debugcon import SEABIOS_DEBUG_PORT, ByteSink, Debugcon
from devices.fw_cfg import (
    DMA_LENGTH,
    DMA_PORT,
    IO_LENGTH,
    IO_PORT,
    FwCfg,
    pc_fw_cfg,
    virtio_blk_boot_path,
    virtio_net_boot_path,
)
from devices.pam import (
    SHADOW_END,
    SHADOW_START,
    Backing,
    Pam,
    PamHostBridge,
    PamRegion,
    ShadowWriteSink,
    Source,
)
from kvmcore.firmware import FirmwareMemory
from kvmcore.kvm import Vm
from kvmcore.loader.e820 import firmware_e820_map
from kvmcore.memory import GuestMemory

BOOT_KINDS = ("disk", "net")
# etc/boot-fail-wait: how long SeaBIOS shows "No bootable device.  Retrying in N seconds." before it resets to
# retry (its own default 60 s; QEMU's default -1 never retries). The reset that follows ends the guest as a boot
# failure (FirmwareBoot.boot_failed): retrying is the daemon's restart policy's job, with its limits and backoff.
BOOT_FAIL_WAIT_MS = 5000
# SeaBIOS src/boot.c boot_fail(): its words once every entry of the boot order failed, on the debug port too.
BOOT_FAILURE_LINE = b"No bootable device."


class FirmwareBoot:
    def __init__(self, vm: Vm, mem: GuestMemory, bios: bytes, mmio: Bus) -> None:
        self.mem = mem
        self.memory = FirmwareMemory(vm.set_user_memory_region, mem, bios)
        self.memory.map()
        self.pam = Pam(self._apply, self.memory.rom_floor)
        self.shadow_sink = ShadowWriteSink(self.pam, mem, self.memory.rom_alias)
        mmio.insert(self.shadow_sink, SHADOW_START, SHADOW_END - SHADOW_START)
        self.acpi_files: dict[str, bytes] | None = None
        self.fw_cfg: FwCfg | None = None
        self.debugcon: Debugcon | None = None
        self.bootorder: list[str] = []
        self.boot_failed = False  # the BIOS said it found nothing to boot: its next reset is a failure, not a reboot

    def _apply(self, region: PamRegion, backing: Backing) -> None:
        self.memory.apply(region.gpa, region.size, backing.source is Source.ROM, backing.writable)

    def host_bridge(self) -> PamHostBridge:
        return PamHostBridge(self.pam)

    def attach_io(self, pio: Bus, *, vcpus: int, boot: Sequence[tuple[str, int]],
                  option_roms: dict[str, bytes] | None = None,
                  pci_roms: dict[tuple[int, int], bytes] | None = None, log_sink: ByteSink | None = None) -> FwCfg:
        """fw_cfg and the debug port on the port bus. ``boot``: (kind, PCI slot) in boot order."""
        paths = []
        for kind, slot in boot:
            if kind not in BOOT_KINDS:
                raise ValueError(f"boot device kind {kind!r} is not one of {BOOT_KINDS}")
            paths.append(virtio_blk_boot_path(slot) if kind == "disk" else virtio_net_boot_path(slot))
        self.bootorder = paths
        fw = pc_fw_cfg(self.mem, vcpus=vcpus, e820=firmware_e820_map(self.mem), acpi_files=self.acpi_files,
                       bootorder=paths, boot_fail_wait_ms=BOOT_FAIL_WAIT_MS, option_roms=option_roms,
                       pci_roms=pci_roms)
        pio.insert(fw.io, IO_PORT, IO_LENGTH)
        pio.insert(fw.dma, DMA_PORT, DMA_LENGTH)
        self.fw_cfg = fw
        self.debugcon = Debugcon(log_sink, on_line=self._bios_line)
        pio.insert(self.debugcon, SEABIOS_DEBUG_PORT, 1)
        return fw

    def _bios_line(self, line: bytes) -> None:
        if line.startswith(BOOT_FAILURE_LINE):
            self.boot_failed = True

    def close(self) -> None:
        self.memory.close()
