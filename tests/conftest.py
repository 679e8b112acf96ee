"""Suite-wide markers: `kvm`, `qemu` and `root` tests skip with a reason on machines without the resource,
unless KVMDM_REQUIRE_KVM / KVMDM_REQUIRE_QEMU / KVMDM_REQUIRE_ROOT=1 (set in CI), where they fail instead."""

from __future__ import annotations

import os
import shutil

import pytest


def _kvm_usable() -> str | None:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"/dev/kvm is not usable ({e.strerror})"
    os.close(fd)
    return None


def _qemu_usable() -> str | None:
    return None if shutil.which("qemu-system-x86_64") else "qemu-system-x86_64 is not installed"


def _root() -> str | None:
    return None if os.geteuid() == 0 else "needs root"


_CHECKS = {"kvm": (_kvm_usable, "KVMDM_REQUIRE_KVM"), "qemu": (_qemu_usable, "KVMDM_REQUIRE_QEMU"),
           "root": (_root, "KVMDM_REQUIRE_ROOT")}


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker, (check, env) in _CHECKS.items():
        if item.get_closest_marker(marker) is None:
            continue
        why = check()
        if why is None:
            continue
        if os.environ.get(env) == "1":
            pytest.fail(f"{why}, and {env}=1 says this machine must have it")
        pytest.skip(f"{why} (set {env}=1 to make this a failure)")
