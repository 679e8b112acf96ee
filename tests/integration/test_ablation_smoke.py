"""Keeps bench/ablation.py working: one tiny run of both designs (blk and, as root, net), in a subprocess because
the bench unshares its own network namespace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kvm

REPO = Path(__file__).resolve().parents[2]


def test_ablation_bench_reports_both_designs_with_no_dm_exits_per_request() -> None:
    argv = [sys.executable, "-m", "bench.ablation", "--mb", "2", "--image-mb", "4", "--rand", "64", "--tx", "500",
            "--rx", "0", "--repeat", "1", "--json", "--dir", "/tmp"]
    r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    med = res["median"]
    assert set(med) == {"inline", "stub"}
    for design in ("inline", "stub"):
        m = med[design]
        assert m["seq_read_MiBps"] > 0 and m["rand_iops"] > 0
        assert m["rand_lat_us"] == pytest.approx(1e6 / m["rand_iops"])
        # Steady state: notify is an ioeventfd in both designs; only the marker writes on COM1 reach userspace.
        assert m["mmio_exits_per_req"] == 0
        assert m["exits_per_req"] < 0.2
        if os.geteuid() == 0:
            assert m["tx_fps"] > 0 and m["tx_mmio_exits_per_frame"] == 0
    assert med["inline"]["rand_cpu_backend"] == 0  # inline: no back-end process to account
    assert "seq_read_MiBps" in res["ratio_stub_over_inline"]
