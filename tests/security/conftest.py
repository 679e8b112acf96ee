"""Shared fixtures for the jail and seccomp attack tests.

Tests marked ``root`` need real privileges (namespaces, pivot_root, setresuid). Without root they are skipped
with the reason, unless KVMDM_REQUIRE_ROOT=1, in which case they fail: CI on a root runner must not silently
skip the only tests that attack the jail.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.jail import JailConfig

NOBODY = 65534


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") and os.geteuid() != 0:
        msg = "needs root (namespaces, pivot_root, setresuid); set KVMDM_REQUIRE_ROOT=1 to fail instead"
        if os.environ.get("KVMDM_REQUIRE_ROOT") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    if item.get_closest_marker("kvm") and not os.path.exists("/dev/kvm"):
        msg = "needs /dev/kvm; set KVMDM_REQUIRE_KVM=1 to fail instead"
        if os.environ.get("KVMDM_REQUIRE_KVM") == "1":
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture
def jail_root(tmp_path: Path) -> Path:
    """An empty, root-owned 0755 directory: what JailConfig.validate_host accepts as root_dir."""
    root = tmp_path / "jail-root"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)  # mkdir's mode is filtered by the umask
    return root


@pytest.fixture
def make_config(jail_root: Path) -> Callable[..., JailConfig]:
    """JailConfig factory with the production defaults (seccomp "dm", pid namespace) over ``jail_root``."""

    def make(**kw: object) -> JailConfig:
        args: dict[str, object] = {"root_dir": jail_root, "uid": NOBODY, "gid": NOBODY}
        args.update(kw)
        return JailConfig(**args)  # type: ignore[arg-type]

    return make


@pytest.fixture
def kvm_fd() -> Iterator[int]:
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    yield fd
    os.close(fd)
