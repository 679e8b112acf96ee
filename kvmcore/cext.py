"""Small C extensions (cffi, API mode) compiled on first use into a per-user cache.

Used by the two C inner loops (kvmcore.fastrun, pv.netring). Each is keyed by the hash of its source and the
interpreter, built with the system compiler, and loaded at import time: device models and back-ends import them
before entering their jails, where there is no filesystem and no compiler.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType


def cache_dir(kind: str) -> Path:
    base = os.environ.get("KVMDM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kvmdm")
    return Path(base) / kind


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
