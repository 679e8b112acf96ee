"""Conventional PCI for kvmdm: config space, bus 0 with an i440FX host bridge, config mechanisms, MSI-X."""

from devices.pci.config import BarSpec, BarType, PciConfigError, PciConfiguration
from devices.pci.device import PciDevice, PciPlatform
from devices.pci.msix import MsixConfig, msix_capability
from devices.pci.root import I440fxHostBridge, PciConfigIo, PciConfigMmio, PciRoot, assign_bars

__all__ = [
    "BarSpec",
    "BarType",
    "I440fxHostBridge",
    "MsixConfig",
    "PciConfigError",
    "PciConfigIo",
    "PciConfigMmio",
    "PciConfiguration",
    "PciDevice",
    "PciPlatform",
    "PciRoot",
    "assign_bars",
    "msix_capability",
]
