"""Findings against truth: which finding found which lesion.

The rule (issue 16, README "Evaluate a model"): a finding is a hit when its center lies within the truth lesion's
radius, at least ``HIT_RADIUS_FLOOR_MM``, and it has the lesion's label; each lesion is found by at most one finding
and each finding finds at most one lesion. Findings are taken by decreasing score, each taking the nearest lesion
still free within reach; a finding left without a lesion is a false positive (a second finding on a lesion already
found is one too: the reader sees two marks).

Because findings are taken by decreasing score, the matching of the findings at or above any threshold is the
matching of all findings restricted to them: one matching serves every operating point of the FROC curve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from inference.evaluation.dataset import TruthLesion

HIT_RADIUS_FLOOR_MM = 3.0


@dataclass(frozen=True)
class Finding:
    """What the evaluation needs of a finding: the `read --format json` fields of DESIGN.md's contract."""

    label: str
    score: float
    center_mm: tuple[float, ...]  # LPS [x, y, z], or [x, y] on the image plane for projection X-ray
    diameter_mm: float | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "label": self.label,
            "score": self.score,
            "center_mm": list(self.center_mm),
            "diameter_mm": self.diameter_mm,
        }


def hit_radius_mm(diameter_mm: float) -> float:
    return max(diameter_mm / 2.0, HIT_RADIUS_FLOOR_MM)


@dataclass(frozen=True)
class StudyMatch:
    """The matching of one study: per lesion the finding that found it, per finding the lesion it found."""

    lesion_finding: tuple[int | None, ...]
    finding_lesion: tuple[int | None, ...]


def match_findings(lesions: Sequence[TruthLesion], findings: Sequence[Finding], where: str = "") -> StudyMatch:
    """Match ``findings`` to ``lesions`` by the rule above; ValueError when a center's dimension is not the truth's."""
    for n, finding in enumerate(findings):
        if lesions and len(finding.center_mm) != len(lesions[0].center_mm):
            raise ValueError(
                f"{where}finding {n + 1} has a {len(finding.center_mm)}-D center, the truth "
                f"{len(lesions[0].center_mm)}-D ([x, y] is for projection X-ray only)"
            )
    order = sorted(range(len(findings)), key=lambda n: -findings[n].score)
    lesion_finding: list[int | None] = [None] * len(lesions)
    finding_lesion: list[int | None] = [None] * len(findings)
    for n in order:
        finding = findings[n]
        best, best_d = None, math.inf
        for m, lesion in enumerate(lesions):
            if lesion_finding[m] is not None or lesion.label != finding.label:
                continue
            d = math.dist(finding.center_mm, lesion.center_mm)
            if d <= hit_radius_mm(lesion.diameter_mm) and d < best_d:
                best, best_d = m, d
        if best is not None:
            lesion_finding[best] = n
            finding_lesion[n] = best
    return StudyMatch(tuple(lesion_finding), tuple(finding_lesion))
