"""The C fast path (kvmcore.fastrun) must be indistinguishable from the Python vCPU loop, its reference: same guest
output, same exit counts, same bus statistics; claimed addresses always reach the Python devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmcore import fastrun

REPO = Path(__file__).resolve().parents[3]
GUESTS = REPO / "tests" / "guests"

RUN = r"""
import json, sys
from guests.build import build_guest
from guests.kvmdm import run_kvmdm
from kvmcore import fastrun
import daemon.vmm as V
stats = {}
orig = V.Vmm.close
def close(self):
    stats["pio"] = vars(self.pio.stats).copy(); stats["mmio"] = vars(self.mmio.stats).copy()
    orig(self)
V.Vmm.close = close
handled = []
from kvmcore import vcpu_loop
orig_run = vcpu_loop.VcpuThread.run
def run(self):
    orig_run(self)
    k = self._fast.counts if self._fast is not None else None
    handled.append(0 if k is None else k.pio_reads + k.pio_writes + k.mmio_reads + k.mmio_writes)
    dev.append(0 if k is None else k.dev_reads + k.dev_writes)
vcpu_loop.VcpuThread.run = run
dev = []
devstate = {}
orig_close = V.Vmm.close
def close2(self):
    devstate["serial"] = repr(self.serial.snapshot()); devstate["serial_metrics"] = vars(self.serial.metrics).copy()
    devstate["pci"] = [(s, bytes(d.config.register_file()[0]).hex(), vars(d.config.stats)) for s, d in self.pci_root.devices()]
    devstate["pci_root"] = vars(self.pci_root.stats)
    close(self)
V.Vmm.close = close2
r = run_kvmdm(build_guest(sys.argv[1]), sys.argv[2])
print(json.dumps({"fast": fastrun.AVAILABLE, "c_handled": sum(handled), "c_dev": sum(dev), "status": r.status,
                  "output": r.output, "kind": r.reason.kind, "exits": dict(r.exits), "stats": stats,
                  "devices": devstate}))
"""


def _run(guest: str, cmdline: str, *, fast: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("KVMDM_NO_FASTRUN", None)
    if not fast:
        env["KVMDM_NO_FASTRUN"] = "1"
    r = subprocess.run([sys.executable, "-c", RUN, str(GUESTS / f"{guest}.S"), cmdline], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.splitlines()[-1])


def test_fast_path_builds_on_this_machine() -> None:
    # CI machines have gcc and the Python headers (scripts/setup): the fast path must not silently fall back there.
    assert fastrun.AVAILABLE


@pytest.mark.kvm
@pytest.mark.parametrize(("guest", "cmdline"), [("hammer", ""), ("pio_mmio", ""), ("loop", "loops=3000 port=0x80")])
def test_c_and_python_loops_give_the_same_output_exits_and_bus_stats(guest: str, cmdline: str) -> None:
    c, py = _run(guest, cmdline, fast=True), _run(guest, cmdline, fast=False)
    assert c["fast"] and not py["fast"]
    assert (c["status"], c["kind"], c["output"]) == (py["status"], py["kind"], py["output"])
    assert c["exits"] == py["exits"]
    assert c["stats"] == py["stats"]


@pytest.mark.kvm
def test_unclaimed_port_writes_are_answered_in_c_and_counted_by_the_bus() -> None:
    c = _run("loop", "loops=5000 port=0x80", fast=True)
    assert c["c_handled"] >= 5000  # the C loop really served them (not a silent fallback to Python)
    assert c["stats"]["pio"]["unclaimed_writes"] >= 5000
    assert _run("loop", "loops=5000 port=0x80", fast=False)["c_handled"] == 0


@pytest.mark.kvm
def test_claimed_ports_always_reach_the_python_device() -> None:
    # pc-testdev's data register at 0xe0 is claimed: 5000 outs there are device work, never answered in C.
    c = _run("loop", "loops=5000 port=0xe0", fast=True)
    assert c["c_handled"] < 100 and c["status"] == 1


# The UART's and config mechanism #1's C halves on a real vCPU: the loop guest polls LSR, writes THR, and reads
# and writes config space through 0xCF8/0xCFC (bench/exits.py's cases), with the C path on and off.
_DEVICE_LOOPS = [
    "loops=3000 port=0x3fd dir=1",
    "loops=3000 port=0x3f8",
    "loops=3000 pci=0x80000000 port=0xcfc dir=1 size=4",
    "loops=3000 pci=0x8000003c port=0xcfc size=4",
    "loops=1000 pci=0x80000800 port=0xcfc dir=1 size=2",  # an absent slot, word reads
    "loops=1000 pci=0x80000000 port=0xcfd dir=1 size=4",  # past the ports' end: unclaimed, Python, all-ones
    "loops=1000 pci=0x80000000 port=0xcfa dir=1 size=4",  # straddles 0xCFC inside the ports: PciConfigIo's bad
    "loops=1000 port=0x3fd dir=1 size=2",  # a word at LSR: the UART's invalid access, Python's
    "loops=1000 port=0x3ff dir=1 size=2",  # straddles the UART's end: unclaimed, all-ones
]


@pytest.mark.kvm
@pytest.mark.parametrize("cmdline", _DEVICE_LOOPS)
def test_uart_and_pci_config_c_halves_match_the_python_devices_on_a_real_vcpu(cmdline: str) -> None:
    c, py = _run("loop", cmdline, fast=True), _run("loop", cmdline, fast=False)
    assert c["fast"] and not py["fast"]
    assert (c["status"], c["kind"], c["output"]) == (py["status"], py["kind"], py["output"])
    assert c["exits"] == py["exits"]
    assert c["stats"] == py["stats"]
    assert c["devices"] == py["devices"]
    loops = int(cmdline.split()[0].split("=")[1])
    if "size=2" in cmdline and "0x3f" in cmdline:
        assert c["c_dev"] < 200  # only the guest's own console I/O: the loop's accesses all went to Python
    elif "0xcfd" in cmdline or "0xcfa" in cmdline:
        assert c["c_dev"] < loops + 200  # the latch writes only: the straddling reads went to Python
    else:
        assert c["c_dev"] >= loops  # the C halves really answered the loop's accesses
    assert py["c_dev"] == 0
