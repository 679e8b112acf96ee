"""Durable guest definitions: ``<state_dir>/guests/<name>.json``, one file per guest, written atomically.

Atomicity recipe (a crash at any point leaves either the old or the new file, never a torn one): write a
temporary file in the same directory, fsync it, rename(2) over the target (atomic within a filesystem), then fsync
the directory so the rename itself is durable (see rename(2) and fsync(2) "calling fsync() on the file does not
ensure that the entry in the directory ... has also reached disk").
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from daemon.config import ConfigError, GuestDefinition, parse_definition
from daemon.paths import Paths

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    d = path.parent
    tmp = d / f"{TMP_PREFIX}{path.name}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.rename(tmp, path)
    fsync_dir(d)


def fsync_dir(d: Path) -> None:
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@dataclass(frozen=True)
class StoreError:
    """A definition file that could not be loaded (reported in /health, skipped)."""

    path: str
    error: str


class DefinitionStore:
    def __init__(self, paths: Paths) -> None:
        self.paths = paths

    def save(self, definition: GuestDefinition) -> None:
        self.paths.definitions_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.paths.definition_file(definition.name), definition.to_json().encode() + b"\n")

    def delete(self, name: str) -> None:
        self.paths.definition_file(name).unlink(missing_ok=True)
        fsync_dir(self.paths.definitions_dir)

    def exists(self, name: str) -> bool:
        return self.paths.definition_file(name).exists()

    def load_all(self) -> tuple[dict[str, GuestDefinition], list[StoreError]]:
        """Load every definition. A corrupt file is reported and skipped, never fatal; leftover temporary files
        from a crash mid-write are removed (their target still holds the previous complete version)."""
        defs: dict[str, GuestDefinition] = {}
        errors: list[StoreError] = []
        ddir = self.paths.definitions_dir
        if not ddir.is_dir():
            return defs, errors
        for p in sorted(ddir.iterdir()):
            if p.name.startswith(TMP_PREFIX):
                log.warning("removing leftover temporary file %s (interrupted write)", p)
                p.unlink(missing_ok=True)
                continue
            if p.suffix != ".json" or not p.is_file():
                continue
            try:
                raw = json.loads(p.read_bytes())
                # Image files may have moved since creation; that is reported when the guest starts, not here.
                d = parse_definition(raw, check_paths=False)
                if d.name != p.stem:
                    raise ConfigError([f"name: {d.name!r} does not match the file name {p.stem!r}"])
            except (OSError, ValueError, RecursionError) as e:
                log.error("skipping corrupt guest definition %s: %s", p, e)
                errors.append(StoreError(str(p), str(e)))
                continue
            defs[d.name] = d
        return defs, errors
