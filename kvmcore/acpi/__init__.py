"""ACPI tables for kvmdm's guests, in pure Python (no ctypes, no I/O).

``aml`` encodes AML (the DSDT's byte code), ``tables`` lays out the fixed-format tables, ``build`` assembles the
set from an :class:`AcpiPlatform`, and ``linker`` resolves it: ``build_tables(p).place(gpa)`` for a direct kernel
boot, ``build_tables(p).table_loader()`` for firmware reading QEMU-style fw_cfg files.
"""

from kvmcore.acpi.build import AcpiConfigError, AcpiPlatform, build_tables
from kvmcore.acpi.linker import AcpiLinkError, AcpiPlacementError, AcpiTables

__all__ = ["AcpiConfigError", "AcpiLinkError", "AcpiPlacementError", "AcpiPlatform", "AcpiTables", "build_tables"]
