"""tests.lane.boot.HangWatch: when the lane gives up on an L1 that stopped giving its heartbeat."""

from __future__ import annotations

from pathlib import Path

from tests.lane.boot import HangWatch


def test_no_verdict_before_the_first_beat(tmp_path: Path) -> None:
    w = HangWatch(hang_s=60.0)
    beat = tmp_path / "heartbeat.log"
    w.beat_file(beat, 0.0)  # L1 still booting: no file yet
    assert not w.hung(1000.0)
    beat.write_text("")
    w.beat_file(beat, 1000.0)  # an empty file is no beat
    assert not w.hung(5000.0)


def test_beats_keep_it_alive_and_their_absence_is_a_hang(tmp_path: Path) -> None:
    w = HangWatch(hang_s=60.0)
    beat = tmp_path / "heartbeat.log"
    t = 0.0
    for _ in range(10):
        with beat.open("a") as f:
            f.write(f"{int(t)}\n")
        w.beat_file(beat, t)
        assert not w.hung(t + 59.0)
        t += 15.0
    last = t - 15.0
    for now in (last + 30.0, last + 60.0):
        w.beat_file(beat, now)  # the file did not grow
        assert not w.hung(now)
    w.beat_file(beat, last + 61.0)
    assert w.hung(last + 61.0)
    assert w.silent_for(last + 61.0) == 61.0


def test_a_late_beat_ends_the_silence(tmp_path: Path) -> None:
    w = HangWatch(hang_s=60.0)
    beat = tmp_path / "heartbeat.log"
    beat.write_text("1\n")
    w.beat_file(beat, 0.0)
    assert w.hung(61.0)
    beat.write_text("1\n2\n")
    w.beat_file(beat, 62.0)
    assert not w.hung(62.0)
