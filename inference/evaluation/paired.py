"""Two versions on the same studies: paired differences, ``compare(a, b) -> Comparison``.

Per label, for sensitivity, false positives per study and the CPM: the value of each version, the difference
``b - a`` and its 95 % confidence interval from a paired bootstrap over studies (the same resampled studies for
both versions, ``resamples`` draws, seeded, so the interval is reproducible). Per lesion: how many both versions
found, only ``a``, only ``b``, neither, and the exact McNemar test on the discordant lesions (the two-sided
binomial p-value that ``a`` and ``b`` find lesions equally often). The interval treats studies as independent and
lesions within a study as correlated, which is how a dataset is sampled.

The promotion guard (issue 16) reads ``Comparison.labels[label]["sensitivity"]["difference"]`` and its interval to
refuse a regression beyond a tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from inference.evaluation.froc import cpm, froc_curve, froc_points
from inference.evaluation.metrics import EvalReport, StudyResult, labels_of

COMPARED = ("sensitivity", "fp_per_study", "cpm")


@dataclass(frozen=True)
class Comparison:
    a: str  # "name:version"
    b: str
    studies: int
    resamples: int
    labels: dict[str, dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "studies": self.studies, "resamples": self.resamples, "labels": self.labels}


def compare(a: EvalReport, b: EvalReport, *, resamples: int = 2000, seed: int = 0) -> Comparison:
    """Paired differences ``b - a`` of two reports on the same studies (same names and truth)."""
    if resamples < 100:
        raise ValueError(f"resamples must be >= 100 for a 95 % interval, got {resamples}")
    names_a, names_b = [s.name for s in a.studies], [s.name for s in b.studies]
    if names_a != names_b:
        raise ValueError(
            f"the reports cover different studies ({len(names_a)} and {len(names_b)}); compare needs pairs"
        )
    for sa, sb in zip(a.studies, b.studies, strict=True):
        if sa.lesions != sb.lesions:
            raise ValueError(f"study {sa.name}: the two reports have different truth")
    rng = np.random.default_rng(seed)
    n = len(a.studies)
    draws = rng.integers(0, n, size=(resamples, n))
    labels = {}
    for label in sorted(set(labels_of(a.studies)) | set(labels_of(b.studies))):
        tallies_a = [_tally(s, label) for s in a.studies]
        tallies_b = [_tally(s, label) for s in b.studies]
        values_a = [None if math.isnan(v) else v for v in _values(tallies_a, range(n))]
        values_b = [None if math.isnan(v) else v for v in _values(tallies_b, range(n))]
        boot = np.array([[_values(t, d) for t in (tallies_a, tallies_b)] for d in draws], dtype=float)  # (R, 2, 3)
        entry: dict[str, Any] = {}
        for k, metric in enumerate(COMPARED):
            if values_a[k] is None or values_b[k] is None:
                entry[metric] = {"a": values_a[k], "b": values_b[k], "difference": None, "ci95": None}
                continue
            diffs = boot[:, 1, k] - boot[:, 0, k]
            diffs = diffs[np.isfinite(diffs)]
            low, high = np.percentile(diffs, [2.5, 97.5]) if len(diffs) else (math.nan, math.nan)
            entry[metric] = {
                "a": round(values_a[k], 4),
                "b": round(values_b[k], 4),
                "difference": round(values_b[k] - values_a[k], 4),
                "ci95": [round(float(low), 4), round(float(high), 4)],
            }
        entry["lesions"] = _discordance(a.studies, b.studies, label)
        labels[label] = entry
    name = lambda r: f"{r.model}:{r.model_version}"  # noqa: E731
    return Comparison(name(a), name(b), n, resamples, labels)


@dataclass(frozen=True)
class _Tally:
    lesions: int
    hit_scores: tuple[float, ...]
    fp_scores: tuple[float, ...]


def _tally(study: StudyResult, label: str) -> _Tally:
    lesions = [n for n, lesion in enumerate(study.lesions) if lesion.label == label]
    hits = tuple(
        study.findings[study.match.lesion_finding[n]].score
        for n in lesions
        if study.match.lesion_finding[n] is not None
    )
    fps = tuple(
        f.score
        for f, m in zip(study.findings, study.match.finding_lesion, strict=True)
        if m is None and f.label == label
    )
    return _Tally(len(lesions), hits, fps)


def _values(tallies: Sequence[_Tally], picks: Sequence[int] | np.ndarray) -> tuple[float, float, float]:
    """(sensitivity, fp_per_study, cpm) of the studies ``picks`` (with repeats, as a bootstrap draws them); NaN
    sensitivity and CPM when they hold no lesion."""
    chosen = [tallies[int(i)] for i in picks]
    lesions = sum(t.lesions for t in chosen)
    hits = [s for t in chosen for s in t.hit_scores]
    fps = [s for t in chosen for s in t.fp_scores]
    fp_rate = len(fps) / len(chosen)
    if lesions == 0:
        return math.nan, fp_rate, math.nan
    return len(hits) / lesions, fp_rate, cpm(froc_points(froc_curve(hits, fps, lesions, len(chosen))))


def _discordance(a: Sequence[StudyResult], b: Sequence[StudyResult], label: str) -> dict[str, Any]:
    both = only_a = only_b = neither = 0
    for sa, sb in zip(a, b, strict=True):
        for n, lesion in enumerate(sa.lesions):
            if lesion.label != label:
                continue
            found_a, found_b = sa.match.lesion_finding[n] is not None, sb.match.lesion_finding[n] is not None
            both += found_a and found_b
            only_a += found_a and not found_b
            only_b += found_b and not found_a
            neither += not found_a and not found_b
    return {
        "both": both,
        "only_a": only_a,
        "only_b": only_b,
        "neither": neither,
        "mcnemar_p": mcnemar_exact(only_a, only_b),
    }


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (binomial, p = 1/2); 1 when none."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return float(f"{min(1.0, 2.0 * tail):.4g}")
