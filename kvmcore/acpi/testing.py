"""For tests: walk an ACPI table set the way an OS does (RSDP -> XSDT/RSDT -> FADT -> DSDT/FACS), checking every
signature, length, alignment and checksum on the way, in any memory (a placed blob, a simulated firmware's RAM).
Shipped with the package, like pv.testing, so firmware work can reuse it."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from kvmcore.acpi import tables as t

Reader = Callable[[int, int], bytes]


class AcpiWalkError(AssertionError):
    """The tables found in memory are not what an OS would accept (the message says which check failed)."""


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise AcpiWalkError(message)


@dataclass(frozen=True)
class Found:
    addr: int
    data: bytes


def _sum_ok(data: bytes) -> bool:
    return sum(data) % 256 == 0


def _sdt(read: Reader, addr: int, signature: bytes) -> Found:
    header = read(addr, t.SDT_HEADER_SIZE)
    _expect(header[:4] == signature, f"expected {signature!r} at {addr:#x}, found {header[:4]!r}")
    length = struct.unpack_from("<I", header, t.SDT_LENGTH_OFFSET)[0]
    data = read(addr, length)
    _expect(_sum_ok(data), f"{signature!r} at {addr:#x}: checksum does not sum to zero")
    return Found(addr, data)


def walk(read: Reader, rsdp_addr: int) -> dict[str, Found]:
    """Every table reachable from the RSDP, validated; keys are the signatures ("RSDP", "XSDT", "FACP", ...)."""
    _expect(rsdp_addr % t.RSDP_ALIGN == 0, f"RSDP at {rsdp_addr:#x} is not 16-byte aligned (§5.2.5.1)")
    rsdp = read(rsdp_addr, t.RSDP_SIZE)
    sig, _ck, _oem, rev, rsdt_addr, length, xsdt_addr, _ext, _res = t.RSDP.unpack(rsdp)
    _expect(sig == t.RSDP_SIGNATURE and rev == 2 and length == t.RSDP_SIZE,
            f"RSDP at {rsdp_addr:#x}: signature {sig!r}, revision {rev}, length {length} (want ACPI 2.0+, 36)")
    _expect(_sum_ok(rsdp[: t.RSDP_V1_SIZE]), "RSDP: ACPI 1.0 checksum")
    _expect(_sum_ok(rsdp), "RSDP: extended checksum")
    out = {"RSDP": Found(rsdp_addr, rsdp)}
    out["XSDT"] = xsdt = _sdt(read, xsdt_addr, b"XSDT")
    out["RSDT"] = rsdt = _sdt(read, rsdt_addr, b"RSDT")
    x_entries = struct.unpack_from(f"<{(len(xsdt.data) - 36) // 8}Q", xsdt.data, 36)
    r_entries = struct.unpack_from(f"<{(len(rsdt.data) - 36) // 4}I", rsdt.data, 36)
    _expect(list(x_entries) == list(r_entries), "RSDT and XSDT list different tables")
    for addr in x_entries:
        sig4 = read(addr, 4)
        out[sig4.decode()] = _sdt(read, addr, sig4)
    fadt = out["FACP"].data
    dsdt32 = struct.unpack_from("<I", fadt, t.FADT_DSDT)[0]
    dsdt64 = struct.unpack_from("<Q", fadt, t.FADT_X_DSDT)[0]
    _expect(dsdt32 == dsdt64, "FADT DSDT and X_DSDT differ")
    out["DSDT"] = _sdt(read, dsdt64, b"DSDT")
    facs_addr = struct.unpack_from("<I", fadt, t.FADT_FIRMWARE_CTRL)[0]
    _expect(facs_addr % t.FACS_ALIGN == 0, "FACS must be 64-byte aligned (§5.2.10)")
    facs = read(facs_addr, t.FACS_SIZE)
    _expect(facs[:4] == b"FACS" and struct.unpack_from("<I", facs, 4)[0] == t.FACS_SIZE,
            f"no 64-byte FACS at {facs_addr:#x}")
    out["FACS"] = Found(facs_addr, facs)
    return out


def reader_for(blob: bytes, base: int) -> Reader:
    def read(addr: int, length: int) -> bytes:
        _expect(base <= addr and addr + length <= base + len(blob), f"read {addr:#x}+{length} outside the tables")
        return blob[addr - base : addr - base + length]

    return read
