"""kvmcore._abi against the C compiler's view of <linux/kvm.h>: every struct size, field offset, kvm_run offset,
ioctl number and KVM_* constant the Python side declares is compared with what gcc computes from the system
headers (one test id per name), so a typo or a layout drift fails loudly instead of corrupting an ioctl.
"""

from __future__ import annotations

import ctypes as C
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kvmcore import _abi as abi

HEADER = Path("/usr/include/linux/kvm.h")

# ---------------------------------------------------------------------------------------------- what to compare
# Structs: every ctypes Structure named like its C struct (private helpers such as the routing union excluded).
STRUCTS: dict[str, Any] = {
    name: obj
    for name, obj in vars(abi).items()
    if name.startswith("kvm_") and isinstance(obj, type) and issubclass(obj, C.Structure | C.Union)
}
# Fields the Python side names differently on purpose (kvm_vcpu_events is mirrored as an opaque 64-byte blob).
_FIELD_EXCEPTIONS = {("kvm_vcpu_events", "raw")}
FIELDS = [
    (sname, fname)
    for sname, st in STRUCTS.items()
    for fname, *_ in st._fields_
    if (sname, fname) not in _FIELD_EXCEPTIONS
]

# kvm_run offsets: each RUN_* constant and the C member it stands for (api.rst, "The kvm_run structure").
RUN_MEMBERS = {
    "RUN_IMMEDIATE_EXIT": "immediate_exit",
    "RUN_EXIT_REASON": "exit_reason",
    "RUN_IF_FLAG": "if_flag",
    "RUN_UNION": "io",
    "RUN_IO_DIRECTION": "io.direction",
    "RUN_IO_SIZE": "io.size",
    "RUN_IO_PORT": "io.port",
    "RUN_IO_COUNT": "io.count",
    "RUN_IO_DATA_OFFSET": "io.data_offset",
    "RUN_MMIO_PHYS_ADDR": "mmio.phys_addr",
    "RUN_MMIO_DATA": "mmio.data",
    "RUN_MMIO_LEN": "mmio.len",
    "RUN_MMIO_IS_WRITE": "mmio.is_write",
    "RUN_INTERNAL_SUBERROR": "internal.suberror",
    "RUN_INTERNAL_NDATA": "internal.ndata",
    "RUN_INTERNAL_DATA": "internal.data",
    "RUN_SYSTEM_EVENT_TYPE": "system_event.type",
    "RUN_SYSTEM_EVENT_NDATA": "system_event.ndata",
    "RUN_SYSTEM_EVENT_DATA": "system_event.data",
    "RUN_FAIL_ENTRY_REASON": "fail_entry.hardware_entry_failure_reason",
    "RUN_FAIL_ENTRY_CPU": "fail_entry.cpu",
    "RUN_EXCEPTION_EXCEPTION": "ex.exception",
    "RUN_EXCEPTION_ERROR_CODE": "ex.error_code",
}
RUN_NAMES = sorted(n for n in vars(abi) if n.startswith("RUN_"))

_INT_NAMES = sorted(n for n, v in vars(abi).items() if n.startswith("KVM") and type(v) is int)
IOCTLS = sorted(abi.IOCTL_NAMES.values())
CONSTANTS = sorted(n for n in _INT_NAMES if n not in abi.IOCTL_NAMES.values())


# ---------------------------------------------------------------------------------------------- the C side
def _c_program() -> str:
    lines = ["#include <stddef.h>", "#include <stdio.h>", "#include <linux/kvm.h>", "",
             "#define P(name, expr) printf(\"%s %llu\\n\", name, (unsigned long long)(expr))",
             "int main(void) {"]
    for sname in STRUCTS:
        lines.append(f'  P("sizeof {sname}", sizeof(struct {sname}));')
    for sname, fname in FIELDS:
        lines.append(f'  P("offsetof {sname}.{fname}", offsetof(struct {sname}, {fname}));')
        lines.append(f'  P("fieldsize {sname}.{fname}", sizeof(((struct {sname} *)0)->{fname}));')
    for pname, member in RUN_MEMBERS.items():
        lines.append(f'  P("run {pname}", offsetof(struct kvm_run, {member}));')
    for name in _INT_NAMES + ["KVM_API_VERSION"]:
        # #ifdef so that a name the header lacks is reported for that name only, not as a compile failure.
        lines += [f"#ifdef {name}", f'  P("const {name}", {name});', "#else",
                  f'  printf("undefined {name}\\n");', "#endif"]
    lines += ["  return 0;", "}", ""]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def c_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int | None]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: cannot compare kvmcore._abi with <linux/kvm.h>")
    if not HEADER.exists():
        pytest.skip(f"{HEADER} is missing (install linux-libc-dev): cannot compare kvmcore._abi with it")
    d = tmp_path_factory.mktemp("abi")
    src, exe = d / "abi.c", d / "abi"
    src.write_text(_c_program())
    cc = subprocess.run([gcc, "-std=gnu11", "-o", str(exe), str(src)], capture_output=True, text=True)
    assert cc.returncode == 0, f"the ABI probe did not compile:\n{cc.stderr}"
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    values: dict[str, int | None] = {}
    for line in out.splitlines():
        if line.startswith("undefined "):
            values["const " + line.split()[1]] = None
        else:
            key, _, num = line.rpartition(" ")
            values[key] = int(num)
    return values


def _c(values: dict[str, int | None], key: str) -> int:
    assert key in values, f"the probe printed nothing for {key!r}"
    v = values[key]
    assert v is not None, f"{key.split()[-1]} is not defined by {HEADER}"
    return v


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_struct_size_matches_c(c_values: dict[str, int | None], name: str) -> None:
    assert C.sizeof(STRUCTS[name]) == _c(c_values, f"sizeof {name}")


@pytest.mark.parametrize("sname,fname", FIELDS, ids=[f"{s}.{f}" for s, f in FIELDS])
def test_struct_field_offset_and_size_match_c(c_values: dict[str, int | None], sname: str, fname: str) -> None:
    field = getattr(STRUCTS[sname], fname)
    assert field.offset == _c(c_values, f"offsetof {sname}.{fname}")
    assert field.size == _c(c_values, f"fieldsize {sname}.{fname}")


def test_every_run_offset_constant_is_checked() -> None:
    # A RUN_* constant added to _abi without a C member here would otherwise go unchecked.
    assert RUN_NAMES == sorted(RUN_MEMBERS)


@pytest.mark.parametrize("name", sorted(RUN_MEMBERS))
def test_kvm_run_offset_matches_c(c_values: dict[str, int | None], name: str) -> None:
    assert getattr(abi, name) == _c(c_values, f"run {name}")


@pytest.mark.parametrize("name", IOCTLS)
def test_ioctl_number_matches_c(c_values: dict[str, int | None], name: str) -> None:
    assert getattr(abi, name) == _c(c_values, f"const {name}")


@pytest.mark.parametrize("name", CONSTANTS)
def test_constant_matches_c(c_values: dict[str, int | None], name: str) -> None:
    assert getattr(abi, name) == _c(c_values, f"const {name}")


def test_api_version_matches_c(c_values: dict[str, int | None]) -> None:
    assert abi.API_VERSION == _c(c_values, "const KVM_API_VERSION")


def test_ioctl_names_has_one_entry_per_ioctl_number() -> None:
    # IOCTL_NAMES is built by value: two ioctls with the same number would silently lose one name.
    ioctl_like = [n for n in _INT_NAMES if getattr(abi, n) > 0xFF and (getattr(abi, n) >> 8) & 0xFF == abi.KVMIO]
    assert sorted(ioctl_like) == IOCTLS
    assert all(abi.IOCTL_NAMES[getattr(abi, n)] == n for n in IOCTLS)


def test_capability_and_exit_constants_are_all_compared() -> None:
    # The brief: every KVM_CAP_* and KVM_EXIT_* constant must be among the compared names.
    caps = [n for n in vars(abi) if n.startswith(("KVM_CAP_", "KVM_EXIT_"))]
    assert caps and set(caps) <= set(CONSTANTS)


@pytest.mark.parametrize("n", [0, 1, 7])
def test_flexible_array_buffers_place_entries_right_after_the_header(n: int) -> None:
    for make, header, entry in ((abi.msrs_buffer, abi.kvm_msrs, abi.kvm_msr_entry),
                                (abi.cpuid_buffer, abi.kvm_cpuid2, abi.kvm_cpuid_entry2),
                                (abi.routing_buffer, abi.kvm_irq_routing, abi.kvm_irq_routing_entry)):
        buf: Any = make(n)
        assert buf.entries.offset == C.sizeof(header)
        assert C.sizeof(buf) == C.sizeof(header) + n * C.sizeof(entry)
