"""Summary statistics the benches print, one definition for all of them."""

from __future__ import annotations

import statistics
from collections.abc import Iterable


def pct(xs: Iterable[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile of ``xs`` (not interpolated: a value that was measured)."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def median_p90(xs: Iterable[float]) -> dict[str, float]:
    v = list(xs)
    return {"median": statistics.median(v), "p90": pct(v, 90)}
