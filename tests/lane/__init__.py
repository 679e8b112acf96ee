"""The real-KVM lane: the project's hardware-KVM tests on a machine whose own KVM cannot run them.

This project's machines expose kvm_pvm, which runs CPL3 natively and emulates everything else, so Linux and
firmware cannot boot under it. QEMU-TCG with ``-cpu max`` emulates AMD SVM with nested paging, so an L1 Debian
kernel (linux-image-amd64) under it loads ``kvm_amd`` and has a hardware-style ``/dev/kvm``. The lane boots that
L1 once, shares the host's ``/`` with it over virtio-9p, switches root to it (same checkout, venv and caches),
and runs one command there, by default ``pytest -m realkvm``; the command's exit status comes back as the lane's.

* ``image.py`` builds the L1 kernel + initramfs from Debian's package (cached under $KVMDM_CACHE/lane);
* ``boot.py`` writes the run directory, boots QEMU and streams the L1 console until the ``LANE-RC=`` marker;
* ``__main__.py`` is the CLI: ``python -m tests.lane run -- CMD...`` / ``python -m tests.lane pytest [ARGS]``.

On a host with VT-x/AMD-V (``kvm_intel``/``kvm_amd`` loaded) the realkvm tests run directly and the lane is not
needed; ``tests.lane.host_has_real_kvm`` is what scripts/test asks.
"""

from __future__ import annotations

from pathlib import Path


def real_kvm_module() -> str | None:
    """``kvm_amd`` or ``kvm_intel`` when this kernel's /dev/kvm is hardware-assisted KVM, else None."""
    for mod in ("kvm_amd", "kvm_intel"):
        if Path("/sys/module", mod).is_dir():
            return mod
    return None


def host_has_real_kvm() -> bool:
    return real_kvm_module() is not None and Path("/dev/kvm").exists()
