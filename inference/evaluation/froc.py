"""FROC: sensitivity against false positives per study, over the findings' score thresholds, and the LUNA16 CPM.

Every distinct score is a threshold; at threshold t the operating point is (false positives with score >= t per
study, hits with score >= t over the lesions). The sensitivity reported at a rate r of false positives per study is
the highest sensitivity of an operating point with at most r false positives per study: a point a reader can
actually set, no interpolation between thresholds (LUNA16's script interpolates linearly, which can credit a
sensitivity no threshold gives). A rate beyond the last point gets the sensitivity of all findings, since lowering
the threshold further adds nothing the server returned. The CPM is the mean over the rates 1/8 ... 8 (LUNA16's
competition performance metric).

The findings are those the server returned, i.e. above the model's own score threshold: the curve ends there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

FROC_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
RATE_NAMES = ("1/8", "1/4", "1/2", "1", "2", "4", "8")


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    fp_per_study: float
    sensitivity: float


def froc_curve(
    hit_scores: Sequence[float], fp_scores: Sequence[float], lesions: int, studies: int
) -> list[OperatingPoint]:
    """The operating points, by decreasing threshold; empty when there are no lesions or no studies."""
    if lesions <= 0 or studies <= 0:
        return []
    events = sorted([(s, True) for s in hit_scores] + [(s, False) for s in fp_scores], key=lambda e: -e[0])
    points: list[OperatingPoint] = []
    hits = fps = 0
    for n, (score, is_hit) in enumerate(events):
        hits += is_hit
        fps += not is_hit
        if n + 1 == len(events) or events[n + 1][0] != score:  # all findings of one score pass together
            points.append(OperatingPoint(score, fps / studies, hits / lesions))
    return points


def sensitivity_at(curve: Sequence[OperatingPoint], rate: float) -> float:
    """The highest sensitivity with at most ``rate`` false positives per study (0 before the first point)."""
    return max((p.sensitivity for p in curve if p.fp_per_study <= rate + 1e-12), default=0.0)


def froc_points(curve: Sequence[OperatingPoint], rates: Sequence[float] = FROC_RATES) -> list[float]:
    return [sensitivity_at(curve, rate) for rate in rates]


def cpm(points: Sequence[float]) -> float:
    """LUNA16's competition performance metric: the mean sensitivity over the FROC rates."""
    return sum(points) / len(points)
