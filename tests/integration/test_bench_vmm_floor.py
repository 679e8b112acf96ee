"""bench/vmm_floor.c, the C floor bench.daemon compares the DM's startup CPU with, really builds a VM the demo guest
runs in: every start reaches KVM_RUN and the guest runs from its ELF entry to a port access (values are not judged
here; the ratio lives in the bench's output)."""

from __future__ import annotations

import pytest

from bench import vmm_floor

pytestmark = [pytest.mark.kvm]

KVM_EXIT_IO = 2


def test_the_floor_program_runs_the_demo_guest() -> None:
    r = vmm_floor.run(vmm_floor.demo_kernel(), 3)
    assert r["runs"] == 3
    assert r["cpu_ms"]["median"] > 0 and r["minor_faults"] > 0
    # Every start saw the same first exit: a port access of the guest's runtime, not a shutdown or failed entry.
    assert len(r["first_exits"]) == 1
    reason, port = r["first_exits"][0]
    assert reason == KVM_EXIT_IO and 0 <= port <= 0xFFFF


def test_a_file_that_is_not_elf32_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "not.elf"
    bad.write_bytes(b"\x7fELF\x02" + bytes(60))  # ELF64
    with pytest.raises(vmm_floor.FloorUnavailable, match="not an ELF32 file"):
        vmm_floor.run(bad, 1)
