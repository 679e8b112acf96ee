"""Shared fixtures for the interop tests (QEMU, qemu-storage-daemon and Linux's virtio drivers as peers).

``linux_guest(script)`` builds (or takes from the cache) the Linux test guest with ``script`` as its /test.sh
and returns (vmlinuz, initrd) in the test's tmp_path; it skips with the reason when the guest cannot be built
here (offline, no apt), and fails instead when KVMDM_REQUIRE_QEMU=1. Boot it with
tests.interop.linux_harness.run_linux_tcg.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.linux_guest import require_linux_guest

LinuxGuestFactory = Callable[[str | None], tuple[Path, Path]]


@pytest.fixture
def linux_guest(tmp_path: Path) -> LinuxGuestFactory:
    def build(script: str | None = None) -> tuple[Path, Path]:
        return require_linux_guest(tmp_path / "linux-guest", script)

    return build


@pytest.fixture
def qemu_storage_daemon() -> str:
    path = shutil.which("qemu-storage-daemon")
    if path is None:
        msg = "qemu-storage-daemon is not installed (package qemu-system-common)"
        if os.environ.get("KVMDM_REQUIRE_QEMU") == "1":
            pytest.fail(f"{msg}, and KVMDM_REQUIRE_QEMU=1 says this machine must have it")
        pytest.skip(f"{msg} (set KVMDM_REQUIRE_QEMU=1 to make this a failure)")
    return path
