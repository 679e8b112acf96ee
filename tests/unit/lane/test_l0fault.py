"""tests.realkvm.l0fault: which run endings count as the lane's L0 fault, and the one retry it gets there."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest

from tests.realkvm.l0fault import Run, kvmdm_l0_fault, qemu_l0_fault, run_streaming, with_l0_retry


def test_kvmdm_endings() -> None:
    assert kvmdm_l0_fault(Run(None, "[    1.2] HugeTLB: registered 1.00 GiB page si", "", stalled=True))
    assert kvmdm_l0_fault(Run(4, "...", "kvmdm: guest triple fault (KVM_EXIT_SHUTDOWN)\n"))
    assert kvmdm_l0_fault(Run(0, "GUEST-EXIT rc=0", "")) is None
    assert kvmdm_l0_fault(Run(4, "", "kvmdm: no bootable device\n")) is None  # a crash of another kind counts
    assert kvmdm_l0_fault(Run(1, "", "kvmdm: error: bad definition\n")) is None


def test_qemu_endings() -> None:
    assert qemu_l0_fault(Run(0, "[    0.1] Linux version", ""), "GUEST-EXIT rc=0")
    assert qemu_l0_fault(Run(0, "GUEST-EXIT rc=0", ""), "GUEST-EXIT rc=0") is None
    assert qemu_l0_fault(Run(1, "", "qemu: could not open"), "GUEST-EXIT rc=0") is None


def _runs(*results: Run) -> tuple[list[int], Callable[[], Run]]:
    calls: list[int] = []
    it = iter(results)

    def once() -> Run:
        calls.append(1)
        return next(it)

    return calls, once


def test_a_fault_gets_up_to_two_more_runs_in_the_lane_only(monkeypatch: pytest.MonkeyPatch) -> None:
    stalled, good = Run(None, "cut mid-li", "", stalled=True), Run(0, "GUEST-EXIT rc=0", "")
    crashed = Run(4, "...", "kvmdm: guest triple fault (KVM_EXIT_SHUTDOWN)\n")
    monkeypatch.setenv("KVMDM_IN_LANE", "1")
    calls, once = _runs(stalled, good)
    assert with_l0_retry(once, kvmdm_l0_fault) is good
    assert len(calls) == 2
    calls, once = _runs(crashed, stalled, good)  # the CI lane run of 2026-12-04, then a good third
    assert with_l0_retry(once, kvmdm_l0_fault) is good
    assert len(calls) == 3
    calls, once = _runs(stalled, crashed, stalled)
    assert with_l0_retry(once, kvmdm_l0_fault).stalled
    assert len(calls) == 3  # and no fourth
    bad = Run(4, "", "kvmdm: no bootable device\n")
    calls, once = _runs(stalled, bad, good)
    assert with_l0_retry(once, kvmdm_l0_fault) is bad  # a retry that fails another way counts at once
    assert len(calls) == 2
    monkeypatch.delenv("KVMDM_IN_LANE")
    calls, once = _runs(stalled, good)
    assert with_l0_retry(once, kvmdm_l0_fault) is stalled
    assert len(calls) == 1  # on hardware KVM nothing is retried


def test_any_other_failure_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMDM_IN_LANE", "1")
    bad = Run(4, "", "kvmdm: no bootable device\n")
    calls, once = _runs(bad, Run(0, "", ""))
    assert with_l0_retry(once, kvmdm_l0_fault) is bad
    assert len(calls) == 1


def test_run_streaming_stops_a_silent_process_and_says_so() -> None:
    r = run_streaming([sys.executable, "-c", "import time; print('x', flush=True); time.sleep(60)"], 30.0,
                      stall_limit=1.0, chain=[("x", "x")])
    assert r.stalled
    assert r.console == "x\n"
    assert "x" in r.seen


def test_run_streaming_returns_the_status_and_both_streams() -> None:
    r = run_streaming([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                      30.0, stall_limit=20.0)
    assert (r.rc, r.console, r.stderr, r.stalled) == (3, "out\n", "err\n", False)
