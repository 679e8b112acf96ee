"""The blast guest (tests/guests/virtio_net_blast.S) counts only what really crossed the tap: a small run of each
design (inline pv.net.Net, and the vhost-user back-end), with each per-frame loop (pv.netring's C loop and the
Python reference), in a subprocess (it unshares its own network namespace),
guest counts compared with the tap's counters. Plus the host cross-check itself must be able to fail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.ablation import CrossCheckFailed, TapCounters, cross_check, guest_counts, odd_reads

REPO = Path(__file__).resolve().parents[2]

RUN = r"""
import json, sys, tempfile
from pathlib import Path
from bench import ablation as a
from guests.build import build_guest
a.unshare_netns()
elf = build_guest(a.NET_GUEST)
out = {}
for design, engine in [(d, e) for d in ("inline", "stub") for e in ("c", "python")]:
    with a.net_device(design, Path(tempfile.mkdtemp(dir="/tmp")), False, engine) as (dev, pids, ifname):
        bl = a.start_blaster(ifname, 1514)
        before = a.tap_counters(ifname)
        try:
            phases, text = a.run_guest(elf, "tx=3000 rx=1000 size=1514", dev, pids, timeout=120,
                                       on_rx_phase=lambda: a.release_blaster(bl))
        finally:
            a.stop_blaster(bl)
        d = a.tap_counters(ifname) - before
    out[design + "/" + engine] = {"text": text, "tap_rx": d.rx_packets, "tap_rx_errs": d.rx_errs, "tap_tx": d.tx_packets}
print(json.dumps(out))
"""


@pytest.mark.kvm
@pytest.mark.root
def test_blast_guest_counts_match_the_frames_the_host_saw_on_the_tap() -> None:
    r = subprocess.run([sys.executable, "-c", RUN], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.splitlines()[-1])
    assert sorted(res) == ["inline/c", "inline/python", "stub/c", "stub/python"]
    for design in res:
        m = res[design]
        sent, received = guest_counts(m["text"])
        assert (sent, received) == (3000, 1000), m["text"]
        assert m["tap_rx"] == sent  # every frame the guest counted was written into the tap, no more
        # Ring indices are published as single 16-bit stores (pv.queue): the polling guest never sees a torn or
        # transiently zeroed used->idx.
        assert odd_reads(m["text"]) == 0, m["text"]
        assert m["tap_rx_errs"] == 0
        assert received <= m["tap_tx"] <= received + 65  # read from the tap: counted + at most Q posted + 1


def test_cross_check_fails_when_the_tap_saw_fewer_frames_than_the_guest_sent() -> None:
    with pytest.raises(CrossCheckFailed, match="sent 1000 frames, the tap received 140"):
        cross_check("t", 1000, 0, TapCounters(rx_packets=140, rx_errs=0, tx_packets=0, tx_drop=0))


def test_cross_check_tolerates_only_the_taps_own_error_count() -> None:
    cross_check("t", 1000, 0, TapCounters(rx_packets=995, rx_errs=5, tx_packets=0, tx_drop=0))
    with pytest.raises(CrossCheckFailed):
        cross_check("t", 1000, 0, TapCounters(rx_packets=994, rx_errs=5, tx_packets=0, tx_drop=0))


def test_cross_check_fails_when_the_guest_received_more_than_the_device_read() -> None:
    with pytest.raises(CrossCheckFailed, match="received 500"):
        cross_check("t", 0, 500, TapCounters(rx_packets=0, rx_errs=0, tx_packets=400, tx_drop=0))
    with pytest.raises(CrossCheckFailed):  # more than Q + 1 read but not counted: the guest lost frames
        cross_check("t", 0, 500, TapCounters(rx_packets=0, rx_errs=0, tx_packets=566, tx_drop=0))
    cross_check("t", 0, 500, TapCounters(rx_packets=0, rx_errs=0, tx_packets=565, tx_drop=0))


def test_guest_counts_reads_the_result_line_and_rejects_output_without_one() -> None:
    assert guest_counts("x\nvirtio_net_blast: sent 7 received 3 odd-used-idx-reads 0\n") == (7, 3)
    with pytest.raises(RuntimeError, match="no result line"):
        guest_counts("virtio_net_blast: tx timeout after 3 frames\n")
