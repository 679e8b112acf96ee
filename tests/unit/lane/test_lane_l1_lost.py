"""tests.lane: an L1 that dies under the command (a panic, a reset) is told apart from the command's own end, and
``tests.lane pytest`` gives the tests that had not passed one more L1, as after a hang."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.lane.__main__ import run_with_retry
from tests.lane.boot import RC_L1_HUNG, RC_NO_RESULT, LaneConfig, LaneResult, run_in_l1
from tests.lane.image import L1Image

# L1's last console lines in the CI run that failed on it (2026-12-04), then QEMU's exit (panic=-1, -no-reboot).
PANIC_TAIL = (
    "[  812.991975] RIP: 0010:error_entry+0x1a/0x130\n"
    "[  812.991975] Kernel panic - not syncing: Fatal exception in interrupt\n"
    "[  812.991975] Kernel Offset: 0x34600000 from 0xffffffff81000000\n"
)


def _fake_qemu(tmp_path: Path, console: str, exit_code: int = 0) -> str:
    """A stand-in for qemu-system-x86_64 that prints ``console`` as L1's console and exits."""
    script = tmp_path / "fake-qemu"
    script.write_text(f"#!{sys.executable}\nimport sys\nsys.stdout.write({console!r})\nsys.exit({exit_code})\n")
    script.chmod(0o755)
    return str(script)


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, console: str) -> LaneResult:
    monkeypatch.setenv("KVMDM_CACHE", str(tmp_path / "cache"))
    cfg = LaneConfig(timeout=60.0, qemu=_fake_qemu(tmp_path, console))
    image = L1Image(tmp_path / "vmlinuz", tmp_path / "initrd", "test")
    with (tmp_path / "out.txt").open("w") as out:
        return run_in_l1(image, ["true"], tmp_path, cfg, out=out)


def test_a_panicked_l1_is_lost_with_its_panic_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    res = _run(tmp_path, monkeypatch, "LANE-L1-READY 6.1\n" + PANIC_TAIL)
    assert (res.rc, res.l1_died, res.l1_lost) == (RC_NO_RESULT, True, True)
    assert res.panic == "Kernel panic - not syncing: Fatal exception in interrupt"
    assert "Fatal exception in interrupt" in (res.run_dir / "console.log").read_text()


def test_a_reset_with_no_message_is_lost_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    res = _run(tmp_path, monkeypatch, "LANE-L1-READY 6.1\n[   30.1] some line\n")
    assert (res.rc, res.l1_died, res.l1_lost, res.panic) == (RC_NO_RESULT, True, True, None)


def test_the_last_panic_line_is_l1s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A failing test printed a guest's panic first; then L1 itself panicked.
    console = "LANE-L1-READY 6.1\n[    2.0] Kernel panic - not syncing: VFS: Unable to mount root fs\n" + PANIC_TAIL
    res = _run(tmp_path, monkeypatch, console)
    assert res.l1_lost and res.panic == "Kernel panic - not syncing: Fatal exception in interrupt"


def test_qemu_that_never_brought_l1_up_is_no_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No LANE-L1-READY: QEMU could not start L1 (a bad option, no kernel); rerunning the tests would not help.
    res = _run(tmp_path, monkeypatch, "qemu-system-x86_64: -kernel vmlinuz: could not open\n")
    assert (res.rc, res.l1_died, res.l1_lost) == (RC_NO_RESULT, False, False)


def test_the_commands_own_status_is_not_a_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A guest's panic that the command printed (a failing test's console tail) comes before L1's LANE-RC.
    res = _run(tmp_path, monkeypatch, "LANE-L1-READY 6.1\n" + PANIC_TAIL + "LANE-RC=1\n")
    assert (res.rc, res.l1_died, res.l1_lost, res.panic) == (1, False, False, None)
    # The stage-2 script's own "no result" (it could not cd to the checkout) is a result: nothing to rerun.
    res = _run(tmp_path, monkeypatch, "LANE-RC=125\n")
    assert (res.rc, res.l1_died, res.l1_lost) == (RC_NO_RESULT, False, False)


def _scripted(tmp_path: Path, *results: LaneResult, passed: str = "") -> tuple[list[list[str]], object]:
    calls: list[list[str]] = []
    it = iter(results)

    def run_once(argv: list[str]) -> LaneResult:
        calls.append(argv)
        res = next(it)
        if passed and len(calls) == 1:
            (res.run_dir / "passed.txt").write_text(passed)
        return res

    return calls, run_once


def _res(tmp_path: Path, name: str, rc: int, died: bool = False) -> LaneResult:
    d = tmp_path / name
    d.mkdir()
    return LaneResult(rc, d, 1.0, 0.5, l1_died=died, panic="Kernel panic - not syncing: x" if died else None)


def test_pytest_reruns_what_had_not_passed_after_l1_died(tmp_path: Path) -> None:
    calls, run_once = _scripted(tmp_path, _res(tmp_path, "a", RC_NO_RESULT, died=True), _res(tmp_path, "b", 0),
                                passed="tests/realkvm/test_a.py::test_one\n")
    assert run_with_retry(run_once, ["pytest", "tests/realkvm"], retry=True) == 0  # type: ignore[arg-type]
    assert calls == [["pytest", "tests/realkvm"],
                     ["pytest", "tests/realkvm", "--deselect=tests/realkvm/test_a.py::test_one"]]


def test_a_second_loss_fails_and_run_never_retries(tmp_path: Path) -> None:
    calls, run_once = _scripted(tmp_path, _res(tmp_path, "a", RC_L1_HUNG), _res(tmp_path, "b", RC_NO_RESULT, True))
    assert run_with_retry(run_once, ["pytest"], retry=True) == RC_NO_RESULT  # type: ignore[arg-type]
    assert len(calls) == 2
    calls, run_once = _scripted(tmp_path, _res(tmp_path, "c", RC_NO_RESULT, died=True))
    assert run_with_retry(run_once, ["true"], retry=False) == RC_NO_RESULT  # type: ignore[arg-type]
    assert len(calls) == 1


def test_a_failed_command_is_not_retried(tmp_path: Path) -> None:
    calls, run_once = _scripted(tmp_path, _res(tmp_path, "a", 1))
    assert run_with_retry(run_once, ["pytest"], retry=True) == 1  # type: ignore[arg-type]
    assert len(calls) == 1
