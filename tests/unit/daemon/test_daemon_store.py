"""Durable definition store: atomic replace, corrupt files reported and skipped, leftovers of crashes removed."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from daemon.config import parse_definition  # noqa: E402
from daemon.paths import Paths  # noqa: E402
from daemon.store import DefinitionStore, atomic_write  # noqa: E402


@pytest.fixture
def store(tmp_path: Path) -> DefinitionStore:
    p = Paths(tmp_path / "state", tmp_path / "run")
    p.ensure()
    return DefinitionStore(p)


def test_saved_definitions_load_back_equal(store: DefinitionStore) -> None:
    d = parse_definition({"name": "a1", "kernel": "demo", "vcpus": 2, "nics": [{}]})
    store.save(d)
    defs, errs = store.load_all()
    assert defs == {"a1": d} and errs == []
    assert oct(store.paths.definition_file("a1").stat().st_mode & 0o777) == "0o600"


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path: Path) -> None:
    f = tmp_path / "x.json"
    atomic_write(f, b"old")
    atomic_write(f, b"new contents")
    assert f.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_failed_write_keeps_the_previous_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "x.json"
    atomic_write(f, b"old")

    def boom(fd: int) -> None:
        raise OSError(5, "EIO")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        atomic_write(f, b"new")
    assert f.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


@pytest.mark.parametrize("content", [b"{truncated", b"[]", b'{"name": "bad", "kernel": "demo", "vcpus": 99}',
                                     b"\xff\xfe", b'{"name": "other", "kernel": "demo"}'])
def test_corrupt_definition_is_reported_and_skipped_not_fatal(store: DefinitionStore, content: bytes) -> None:
    store.save(parse_definition({"name": "good", "kernel": "demo"}))
    (store.paths.definitions_dir / "bad.json").write_bytes(content)
    defs, errs = store.load_all()
    assert list(defs) == ["good"]
    assert len(errs) == 1 and errs[0].path.endswith("bad.json")


def test_leftover_temp_file_from_interrupted_write_is_removed(store: DefinitionStore) -> None:
    store.save(parse_definition({"name": "g", "kernel": "demo"}))
    tmp = store.paths.definitions_dir / ".tmp-g.json.1234"
    tmp.write_bytes(b'{"name": "g", "kern')
    defs, errs = store.load_all()
    assert list(defs) == ["g"] and errs == [] and not tmp.exists()


def test_definition_with_missing_image_still_loads(store: DefinitionStore) -> None:
    (store.paths.definitions_dir / "m.json").write_text(json.dumps({"name": "m", "kernel": "/gone/vmlinuz"}))
    defs, errs = store.load_all()
    assert "m" in defs and errs == []


def test_delete_removes_the_file(store: DefinitionStore) -> None:
    store.save(parse_definition({"name": "g", "kernel": "demo"}))
    store.delete("g")
    assert not store.exists("g") and store.load_all() == ({}, [])
