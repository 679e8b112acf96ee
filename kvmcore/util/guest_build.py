"""Build the kvmdm test guests: the shared runtime plus one guest source, assembled into a Multiboot ELF32.

The toolchain is the system GNU binutils (`as --32`, `ld -m elf_i386`): the guests are assembly, so no
compiler is needed. Outputs are cached by a hash of every input (runtime, guest source, linker script,
include files next to the guest, tool paths and flags), so repeated builds are free.

    python -m guests.build hello              # prints the ELF path
    python -m guests.build tests/guests/x.S

It lives below every package that needs it (kvmcore.util: no project imports): the daemon builds the demo guest
for ``"kernel": "demo"`` and ``kvmdm run --demo``, the tests build theirs; ``guests.build`` re-exports it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]
RUNTIME_DIR = _REPO / "guests" / "src"  # the sources stay with the guests package (its package data)
RUNTIME_SOURCES = ("boot.S", "rt.S", "virtio.S")
RUNTIME_INCLUDES = ("rt.inc",)
LINKER_SCRIPT = "guest.ld"
DEMO_SOURCE = RUNTIME_DIR / "hello.S"
# Test guests live with the tests; they are found by name when running from a source checkout.
TEST_GUESTS_DIR = _REPO / "tests" / "guests"

AS_FLAGS = ("--32", "--fatal-warnings")
LD_FLAGS = (
    "-m", "elf_i386",
    "-z", "noexecstack",
    "-z", "max-page-size=0x1000",
    "--build-id=none",
    "--fatal-warnings",
)  # fmt: skip
# A guest whose source carries this word is built alone, without the runtime (it brings its own entry, GDT,
# page tables): the shape of a kernel nobody here wrote, e.g. tests/guests/bare_iopl.S.
STANDALONE_MARKER = b"KVMDM_STANDALONE"
# Bump when the recipe changes in a way the hashed inputs do not show.
RECIPE_VERSION = "2"
TOOL_TIMEOUT_S = 60


class GuestBuildError(Exception):
    """A guest could not be built: unknown guest, missing toolchain, or the assembler/linker failed."""

    def __init__(self, message: str, stderr: str = "") -> None:
        self.stderr = stderr
        detail = " | ".join(line.strip() for line in stderr.splitlines() if line.strip())
        super().__init__(f"{message}: {detail}" if detail else message)


def default_out_dir() -> Path:
    """`$KVMDM_CACHE/guests`, else `~/.cache/kvmdm/guests`."""
    root = os.environ.get("KVMDM_CACHE") or "~/.cache/kvmdm"
    return Path(root).expanduser() / "guests"


def guest_names() -> list[str]:
    """Every guest buildable by name: the demo and the test guests (when the tests are present)."""
    names = {DEMO_SOURCE.stem}
    if TEST_GUESTS_DIR.is_dir():
        names.update(p.stem for p in TEST_GUESTS_DIR.glob("*.S"))
    return sorted(names)


def resolve_source(name_or_path: str | Path) -> Path:
    """A guest name ("hello", "pio_mmio", ...) or a path to a `.S` file -> the source path."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".S" or candidate.parent != Path("."):
        if not candidate.is_file():
            raise GuestBuildError(f"guest source {candidate} does not exist")
        return candidate.resolve()
    name = str(name_or_path)
    if name == DEMO_SOURCE.stem:
        return DEMO_SOURCE
    path = TEST_GUESTS_DIR / f"{name}.S"
    if path.is_file():
        return path
    raise GuestBuildError(f"unknown guest {name!r}; known guests: {', '.join(guest_names())}")


def is_standalone(source: Path) -> bool:
    """True for a guest that is linked without the runtime (its source says KVMDM_STANDALONE)."""
    return STANDALONE_MARKER in source.read_bytes()


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise GuestBuildError(f"toolchain missing: {name!r} not found on PATH (install GNU binutils)")
    return path


def _inputs_digest(source: Path, tools: tuple[str, str]) -> str:
    digest = hashlib.sha256()

    def feed(label: str, data: bytes) -> None:
        digest.update(f"{label}\0{len(data)}\0".encode())
        digest.update(data)

    feed("recipe", RECIPE_VERSION.encode())
    feed("tools", "\0".join(tools).encode())
    feed("as-flags", "\0".join(AS_FLAGS).encode())
    feed("ld-flags", "\0".join(LD_FLAGS).encode())
    for name in (*RUNTIME_SOURCES, *RUNTIME_INCLUDES, LINKER_SCRIPT):
        feed(f"runtime/{name}", (RUNTIME_DIR / name).read_bytes())
    # A guest may `.include` files that sit next to it.
    for inc in sorted(source.parent.glob("*.inc")):
        feed(f"include/{inc.name}", inc.read_bytes())
    feed(f"source/{source.name}", source.read_bytes())
    return digest.hexdigest()


def _run(argv: list[str], what: str) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GuestBuildError(f"{what}: could not run {argv[0]}", str(exc)) from exc
    if proc.returncode != 0:
        raise GuestBuildError(f"{what} failed (exit {proc.returncode})", proc.stderr or proc.stdout)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_guest(source: str | Path, out_dir: Path | None = None) -> Path:
    """Assemble the runtime and `source` (a path, or a guest name) into `<out_dir>/<name>.elf`.

    Rebuilds only when an input changed (a `<name>.elf.sha256` stamp records the inputs' hash).
    Raises GuestBuildError with the tool's stderr if the toolchain is missing or fails.
    """
    src = resolve_source(source)
    tools = (_tool("as"), _tool("ld"))
    out = Path(out_dir) if out_dir is not None else default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    elf = out / f"{src.stem}.elf"
    stamp = out / f"{src.stem}.elf.sha256"
    digest = _inputs_digest(src, tools)
    if elf.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return elf

    with tempfile.TemporaryDirectory(prefix="kvmdm-guest-") as tmp:
        tmpdir = Path(tmp)
        objects: list[str] = []
        runtime = () if is_standalone(src) else tuple(RUNTIME_DIR / name for name in RUNTIME_SOURCES)
        for unit in (*runtime, src):
            obj = tmpdir / f"{len(objects)}-{unit.stem}.o"
            _run(
                [
                    tools[0],
                    *AS_FLAGS,
                    "-I",
                    str(RUNTIME_DIR),
                    "-I",
                    str(src.parent),
                    "-o",
                    str(obj),
                    str(unit),
                ],
                f"assembling {unit.name}",
            )
            objects.append(str(obj))
        linked = tmpdir / "guest.elf"
        _run(
            [tools[1], *LD_FLAGS, "-T", str(RUNTIME_DIR / LINKER_SCRIPT), "-o", str(linked), *objects],
            f"linking {src.stem}.elf",
        )
        _atomic_write(elf, linked.read_bytes())
    _atomic_write(stamp, (digest + "\n").encode())
    return elf


def build_demo(out_dir: Path | None = None) -> Path:
    """Build the README demo guest (guests/src/hello.S)."""
    return build_guest(DEMO_SOURCE, out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guests.build", description=__doc__.splitlines()[0])
    parser.add_argument("guest", help=f"a guest name ({', '.join(guest_names())}) or a path to a .S file")
    parser.add_argument("--out-dir", type=Path, default=None, help="output directory (default: the cache)")
    args = parser.parse_args(argv)
    try:
        print(build_guest(args.guest, args.out_dir))
    except GuestBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
