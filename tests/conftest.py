"""Suite-wide markers: `kvm`, `qemu`, `root` and `realkvm` tests skip with a reason on machines without the
resource, unless KVMDM_REQUIRE_KVM / KVMDM_REQUIRE_QEMU / KVMDM_REQUIRE_ROOT / KVMDM_REQUIRE_REALKVM=1, where they
fail instead. CI sets the first three on the host; the real-KVM lane (tests.lane) sets all four inside its L1."""

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


def _real_kvm() -> str | None:
    from tests.lane import real_kvm_module

    if real_kvm_module() is None:
        loaded = ", ".join(sorted(m for m in os.listdir("/sys/module") if m.startswith("kvm"))) or "no kvm module"
        return (f"needs hardware-assisted KVM (kvm_amd/kvm_intel; this kernel has {loaded}): run it in the real-KVM "
                "lane, `.venv/bin/python -m tests.lane pytest`")
    return _kvm_usable()


_CHECKS = {"kvm": (_kvm_usable, "KVMDM_REQUIRE_KVM"), "qemu": (_qemu_usable, "KVMDM_REQUIRE_QEMU"),
           "root": (_root, "KVMDM_REQUIRE_ROOT"), "realkvm": (_real_kvm, "KVMDM_REQUIRE_REALKVM")}


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


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """In the real-KVM lane, note each passed test in the run directory (on the host, through 9p) as it passes:
    if L1 then hangs, the lane's second L1 runs only the tests not noted here (tests.lane.__main__)."""
    run = os.environ.get("KVMDM_LANE_RUN")
    if not run or report.when != "call" or not report.passed:
        return
    fd = os.open(os.path.join(run, "passed.txt"), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_SYNC, 0o644)
    try:
        os.write(fd, (report.nodeid + "\n").encode())
    finally:
        os.close(fd)
