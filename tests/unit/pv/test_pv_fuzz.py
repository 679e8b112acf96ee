"""Runs bench/fuzz_virtqueue.py briefly so CI exercises the fuzz target, and proves it can report a crash."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from pv.rng import Rng

FUZZ = Path(__file__).resolve().parents[3] / "bench" / "fuzz_virtqueue.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_virtqueue", FUZZ)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_fuzz_target_runs_2000_cases_without_crashes(capsys: pytest.CaptureFixture[str]) -> None:
    rc = load().main(["--cases", "2000", "--seed", "20240601"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "0 crashes" in out and "2000 cases" in out
    assert "reads=" in out  # the cases reach real virtio-blk I/O, not just the first ring check


def test_fuzz_target_reports_an_unexpected_exception_as_a_crash(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Rng, chain: object) -> int:
        raise KeyError("backend bug")

    monkeypatch.setattr(Rng, "process_request", broken)
    rc = load().main(["--cases", "300", "--seed", "1"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "CRASH" in out and "KeyError" in out
