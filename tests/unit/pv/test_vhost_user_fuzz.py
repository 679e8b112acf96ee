"""A short run of bench/fuzz_vhost_user.py in the unit suite: no crash, no fd leak, and the cases reach the
running device (activations), so the fuzzer is not stuck at the first refused message."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[3] / "bench" / "fuzz_vhost_user.py"


def _load():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("fuzz_vhost_user", _PATH)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_vhost_user"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_fuzzed_vhost_user_conversations_neither_crash_nor_leak_fds(capsys: pytest.CaptureFixture[str]) -> None:
    fuzz = _load()
    assert fuzz.main(["--cases", "400", "--seed", "1234"]) == 0
    out = capsys.readouterr().out
    assert " 0 crashes, 0 fd leaks" in out
    assert fuzz.TOTALS["activations"] > 0 and fuzz.TOTALS["refused"] > 0
