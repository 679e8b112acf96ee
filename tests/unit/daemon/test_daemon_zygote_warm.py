"""daemon.zygote_warm: the throwaway VMs the DM zygote builds before it serves leave nothing behind."""

from __future__ import annotations

import logging
import os
from typing import Any

import pytest

from daemon import builder, zygote_warm
from kvmcore import kvm as kvm_mod
from kvmcore.kvm import KvmUnavailable
from kvmcore.loader.elf import parse_elf
from kvmcore.loader.multiboot import find_header


def test_warm_kernel_is_a_multiboot_elf_loaded_at_1_mib() -> None:
    img = zygote_warm.WARM_KERNEL
    elf = parse_elf(img)
    assert elf.bits == 32 and len(elf.segments) == 1
    seg = elf.segments[0]
    assert (seg.paddr, seg.offset, seg.filesz) == (zygote_warm.LOAD_ADDR, 0, len(img))
    assert img[elf.entry - zygote_warm.LOAD_ADDR:] == b"\xf4\xeb\xfd"  # hlt; jmp back to it
    assert find_header(img).flags == 0x3


@pytest.mark.kvm
def test_warm_build_builds_and_closes_every_vm() -> None:
    before = set(os.listdir("/proc/self/fd"))
    assert zygote_warm.warm_build(2) == 2
    assert set(os.listdir("/proc/self/fd")) == before


def test_without_kvm_nothing_is_built_and_nothing_left_open(monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable(*_a: Any, **_k: Any) -> None:
        raise KvmUnavailable("open /dev/kvm", 2)

    monkeypatch.setattr(kvm_mod.Kvm, "__init__", unavailable)
    before = set(os.listdir("/proc/self/fd"))
    assert zygote_warm.warm_build(3) == 0
    assert set(os.listdir("/proc/self/fd")) == before


@pytest.mark.kvm
def test_fds_a_build_leaves_open_are_closed_and_reported(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    real = builder.build_vm
    leaked: list[int] = []

    def leaky(*a: Any, **k: Any) -> Any:
        leaked.append(os.open("/dev/null", os.O_RDONLY))
        return real(*a, **k)

    monkeypatch.setattr(builder, "build_vm", leaky)
    with caplog.at_level(logging.ERROR, logger="kvmdm.zygote"):
        assert zygote_warm.warm_build(1) == 1
    assert leaked and not os.path.exists(f"/proc/self/fd/{leaked[0]}")
    assert f"left fds [{leaked[0]}] open" in caplog.text
