"""Small C extensions (cffi, API mode) and small C programs, compiled on first use into a per-user cache.

Extensions are used by the two C inner loops (kvmcore.fastrun, pv.netring). Each is keyed by the hash of its
source and the interpreter, built with the system compiler, and loaded at import time: device models and back-ends
import them before entering their jails, where there is no filesystem and no compiler. Programs (the jail's keeper,
bench.vmm_floor) are keyed by their source and compiler arguments.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType


def cache_dir(kind: str) -> Path:
    base = os.environ.get("KVMDM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kvmdm")
    return Path(base) / kind


def build_program(kind: str, source: Path, cflags: tuple[str, ...], *, timeout: float = 60) -> Path:
    """Compile (once) ``source`` with ``cc *cflags`` into an executable (mode 0755: an unprivileged process may
    exec it) under ``cache_dir(kind)``, named after the hash of source and flags. Raises OSError or
    subprocess.SubprocessError (CalledProcessError carries the compiler's stderr) on failure."""
    src = source.read_bytes()
    tag = hashlib.sha256(src + repr(cflags).encode()).hexdigest()[:16]
    target = cache_dir(kind) / f"kvmdm-{kind}-{tag}"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / source.stem
            subprocess.run(["cc", *cflags, "-o", str(out), str(source)], check=True, capture_output=True,
                           timeout=timeout)
            out.chmod(0o755)
            os.replace(out, target)  # atomic: concurrent builders never run a half-written file
    return target


def build(kind: str, cdef: str, source: str, *, extra_compile_args: tuple[str, ...] = (),
          extra_link_args: tuple[str, ...] = ()) -> ModuleType:
    """Compile (once) and load the extension ``_kvmdm_<kind>_<hash>``. Raises on any build failure."""
    from cffi import FFI

    key = cdef + source + sys.version + repr(extra_compile_args) + repr(extra_link_args)
    tag = hashlib.sha256(key.encode()).hexdigest()[:16]
    name = f"_kvmdm_{kind}_{tag}"
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    target = cache_dir(kind) / (name + suffix)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        ffi = FFI()
        ffi.cdef(cdef)
        ffi.set_source(name, source, extra_compile_args=list(extra_compile_args),
                       extra_link_args=list(extra_link_args))
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(ffi.compile(tmpdir=tmp, verbose=False))
            os.replace(built, target)  # atomic: concurrent builders never load a half-written file
    loader = importlib.machinery.ExtensionFileLoader(name, str(target))
    spec = importlib.util.spec_from_file_location(name, str(target), loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module
