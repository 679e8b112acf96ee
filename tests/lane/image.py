"""The L1 of the real-KVM lane: Debian's generic kernel (it has 9p and kvm_amd as modules; the cloud kernel lacks
9p) and a busybox initramfs that loads the modules the lane needs, mounts the host's ``/`` over virtio-9p and
switches root to it, running the run directory's stage-2 script as PID 1.

Built from Debian's packages like the Linux test guest (tests.fixtures.linux_guest, whose helpers this reuses),
cached under $KVMDM_CACHE/lane/<kernel version>-<hash of what goes in>.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.fixtures.linux_guest import (
    BUSYBOX,
    LinuxGuestUnavailable,
    cache_root,
    cpio_newc,
    fetch_deb,
    module_dependencies,
    resolve_kernel_package,
)

META_PACKAGE = "linux-image-amd64"
L1_RECIPE = "3"  # bump when INIT or the build changes in a way the hash below does not see

# What L1 needs, by module name; their dependencies are added from each module's own .modinfo.
ROOT_MODULES = (
    "virtio_pci", "9pnet_virtio", "9p",  # the host's / over virtio-9p
    "kvm_amd",  # the point of the lane (QEMU-TCG -cpu max emulates AMD SVM with NPT)
    "tun", "vhost_net", "bridge", "veth", "dummy",  # guest networking, and QEMU's vhost-net for the benches
    "loop", "ext4", "vfat",  # disk images built and inspected inside L1
)

# PID 1 of L1, stage 1. The host's / becomes L1's root (switch_root, so it is a real mount point and the jail's
# pivot_root works there); stage 2 is a script in the run directory, named on the kernel command line.
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
# Module parameters come from the kernel command line as modprobe takes them there: kvm_amd.vgif=0.
for m in @MODULES@; do
  opts=$(tr ' ' '\n' < /proc/cmdline | sed -n "s/^$m\.//p" | tr '\n' ' ')
  insmod /mods/$m.ko $opts || echo "LANE: insmod $m $opts failed"
done
stage2=$(sed -n 's/.*lane.stage2=\([^ ]*\).*/\1/p' /proc/cmdline)
mkdir -p /host
# cache=loose: the host does not change the files L1 reads while the lane runs (the checkout, venv, caches), and
# without caching every Python import is a chain of 9p round trips through an emulated virtio ring.
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,cache=loose,access=client host /host \
  || { echo "LANE: cannot mount the host's / over 9p"; echo "LANE-RC=125"; poweroff -f; }
[ -f "/host$stage2" ] || { echo "LANE: no stage-2 script $stage2 on the host"; echo "LANE-RC=125"; poweroff -f; }
mount --move /dev /host/dev; mount --move /proc /host/proc; mount --move /sys /host/sys
exec switch_root /host /bin/bash "$stage2"
"""


@dataclass(frozen=True)
class L1Image:
    kernel: Path
    initrd: Path
    version: str  # the Debian package version


def _module_index(modroot: Path) -> dict[str, Path]:
    """module name -> .ko path under lib/modules/<kver>/kernel (names use '_' where files may use '-')."""
    out: dict[str, Path] = {}
    for path in modroot.rglob("*.ko*"):
        stem = re.sub(r"\.ko(\.xz)?$", "", path.name)
        out[stem.replace("-", "_")] = path
    return out


def _ko_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return lzma.decompress(data) if path.name.endswith(".xz") else data


def module_closure(index: dict[str, Path], roots: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """(name, .ko bytes) for the roots and everything they depend on, dependencies first."""
    order: list[tuple[str, bytes]] = []
    state: dict[str, int] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise LinuxGuestUnavailable(f"module dependency cycle: {' -> '.join(chain + (name,))}")
        if name not in index:
            raise LinuxGuestUnavailable(f"L1 kernel has no module {name} (needed by {' -> '.join(chain) or 'lane'})")
        state[name] = 1
        ko = _ko_bytes(index[name])
        for dep in module_dependencies(ko):
            visit(dep.replace("-", "_"), chain + (name,))
        state[name] = 2
        order.append((name, ko))

    for root in roots:
        visit(root, ())
    return order


def _unpacked(cache: Path, meta: str) -> tuple[Path, str]:
    """The kernel package unpacked under cache/pkgs/<version> (dpkg-deb -x once)."""
    pkg = resolve_kernel_package(meta)
    where = cache / "pkgs" / re.sub(r"[^A-Za-z0-9.+-]", "_", f"{pkg.name}_{pkg.version}")
    if not (where / ".complete").exists():
        deb = fetch_deb(pkg, cache_root())  # the .debs the Linux test guest fixture keeps
        where.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=where.parent, prefix=".unpack-"))
        try:
            r = subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                raise LinuxGuestUnavailable(f"dpkg-deb -x {deb} failed: {r.stderr.strip()[-300:]}")
            (tmp / ".complete").touch()
            shutil.rmtree(where, ignore_errors=True)
            os.rename(tmp, where)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return where, pkg.version


def build_l1_image(meta: str = META_PACKAGE) -> L1Image:
    """L1's kernel and initramfs, built once per kernel version and recipe."""
    import gzip

    if not BUSYBOX.exists():
        raise LinuxGuestUnavailable(f"{BUSYBOX} is missing (apt-get install busybox-static)")
    cache = cache_root().parent / "lane"
    root, version = _unpacked(cache, meta)
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    kvers = sorted((root / "lib" / "modules").iterdir()) if (root / "lib" / "modules").is_dir() else []
    if not kernels or not kvers:
        raise LinuxGuestUnavailable(f"{meta} {version} unpacked to {root} has no boot/vmlinuz-* or lib/modules")
    busybox = BUSYBOX.read_bytes()
    key = hashlib.sha256("\0".join((L1_RECIPE, INIT, *ROOT_MODULES, version)).encode()
                         + hashlib.sha256(busybox).digest()).hexdigest()[:16]
    out = cache / "images" / f"{re.sub(r'[^A-Za-z0-9.+-]', '_', version)}-{key}"
    initrd = out / "initrd.gz"
    if not initrd.exists():
        mods = module_closure(_module_index(kvers[0] / "kernel"), ROOT_MODULES)
        entries: list[tuple[str, int, bytes]] = [(d, 0o040755, b"") for d in ("bin", "mods", "proc", "sys", "dev")]
        entries.append(("dev/console", 0o020600, bytes([5, 1])))
        entries.append(("bin/busybox", 0o100755, busybox))
        entries += [(f"mods/{name}.ko", 0o100644, ko) for name, ko in mods]
        entries.append(("init", 0o100755, INIT.replace("@MODULES@", " ".join(n for n, _ in mods)).encode()))
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".initrd.{os.getpid()}"
        tmp.write_bytes(gzip.compress(cpio_newc(entries), compresslevel=6, mtime=0))
        os.replace(tmp, initrd)
    return L1Image(kernels[-1], initrd, version)
