"""``evaluate(dataset, findings_by_study) -> EvalReport``: per label and size bucket, what a model found.

Per label, over the whole dataset (``overall``) and per size bucket of the truth lesions' diameters (< 6, 6-10,
10-20, >= 20 mm):

* ``lesions``, ``hits`` and ``sensitivity`` (hits / lesions; None without lesions);
* ``studies``, ``false_positives``, ``fp_per_study``, ``fp_max_in_a_study`` and ``studies_with_more_than_one_fp``
  (overall only: a false positive has no truth lesion, hence no size; a bucket's FROC counts every false positive of
  the label);
* ``froc`` (sensitivity at 1/8 ... 8 false positives per study, ``inference.evaluation.froc``) and ``cpm``;
* ``center_error_mm`` (distance from a hit's finding to its lesion's center) and ``diameter_error_mm`` (the
  finding's ``diameter_mm`` less the lesion's, signed: negative is under-measured) over the hits.

For studies with a truth mask and the server's DICOM SEG, per label: Dice per study (over the studies with truth
voxels of the label) and pooled over them, and lesion-wise detection: a truth lesion is detected when the predicted
mask covers at least one of its voxels (lesions without a voxel in the mask, e.g. a 5 mm lesion between slice
centers, are counted apart). The report keeps every study's findings and matching, so that versions can be
compared study by study (``inference.evaluation.paired``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inference.evaluation.dataset import Dataset, Study, TruthLesion
from inference.evaluation.froc import FROC_RATES, RATE_NAMES, cpm, froc_curve, froc_points
from inference.evaluation.masks import TruthMask, read_truth_mask, seg_masks
from inference.evaluation.matching import Finding, StudyMatch, match_findings

# (name, lower bound inclusive, upper bound exclusive), by the truth lesion's diameter in mm.
SIZE_BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("<6", 0.0, 6.0),
    ("6-10", 6.0, 10.0),
    ("10-20", 10.0, 20.0),
    (">=20", 20.0, math.inf),
)


def size_bucket(diameter_mm: float) -> str:
    for name, low, high in SIZE_BUCKETS:
        if low <= diameter_mm < high:
            return name
    raise ValueError(f"diameter_mm must be >= 0, got {diameter_mm}")


@dataclass(frozen=True)
class SegmentationResult:
    """One study's masks against its truth: per label (intersection, truth, predicted) voxel counts, and per lesion
    whether the prediction covers it (None: the lesion has no voxel in the truth mask)."""

    voxels: Mapping[str, tuple[int, int, int]]
    lesion_covered: tuple[bool | None, ...]


@dataclass(frozen=True)
class StudyResult:
    name: str
    lesions: tuple[TruthLesion, ...]
    findings: tuple[Finding, ...]
    match: StudyMatch
    segmentation: SegmentationResult | None = None


@dataclass(frozen=True)
class EvalReport:
    """A model's findings on a dataset, matched; metrics are computed from the studies on demand."""

    studies: tuple[StudyResult, ...]
    model: str = ""
    model_version: str = ""
    dataset: str = ""
    warnings: tuple[str, ...] = field(default=())

    @property
    def labels(self) -> tuple[str, ...]:
        return labels_of(self.studies)

    def metrics(self, label: str, bucket: str | None = None) -> dict[str, Any]:
        return label_metrics(self.studies, label, bucket)

    def segmentation(self, label: str) -> dict[str, Any] | None:
        return segmentation_metrics(self.studies, label)

    def to_json(self) -> dict[str, Any]:
        """eval.json: the model and dataset, per label ``overall``, ``buckets`` and ``segmentation``, per study
        the truth, the findings and which finding found which lesion."""
        labels = {}
        for label in self.labels:
            entry: dict[str, Any] = {
                "overall": self.metrics(label),
                "buckets": {name: self.metrics(label, name) for name, _, _ in SIZE_BUCKETS},
            }
            segmentation = self.segmentation(label)
            if segmentation is not None:
                entry["segmentation"] = segmentation
            labels[label] = entry
        return {
            "model": self.model,
            "model_version": self.model_version,
            "dataset": self.dataset,
            "studies": len(self.studies),
            "size_buckets_mm": {name: [low, None if math.isinf(high) else high] for name, low, high in SIZE_BUCKETS},
            "froc_rates": list(RATE_NAMES),
            "labels": labels,
            "warnings": list(self.warnings),
            "per_study": [_study_json(s) for s in self.studies],
        }


def evaluate(
    dataset: Dataset,
    findings_by_study: Mapping[str, Sequence[Finding]],
    *,
    segmentations: Mapping[str, SegmentationResult | None] | None = None,
    model: str = "",
    model_version: str = "",
    warnings: Sequence[str] = (),
) -> EvalReport:
    """Match each study's findings to its truth and keep the result (see the module docstring).

    ``findings_by_study`` maps every study's name to its findings; ``segmentations`` (optional) maps a study with a
    truth mask to its predicted masks compared with it (:func:`compare_masks`, or :func:`compare_seg` for the
    server's DICOM SEG), or None where there is no prediction to compare. Raises ValueError for a study without
    findings given, or with centers of the wrong dimension.
    """
    missing = [s.name for s in dataset.studies if s.name not in findings_by_study]
    if missing:
        raise ValueError(f"no findings given for {len(missing)} studies, e.g. {missing[0]}")
    segmentations = segmentations or {}
    results = []
    for study in dataset.studies:
        findings = tuple(findings_by_study[study.name])
        match = match_findings(study.lesions, findings, where=f"study {study.name}: ")
        segmentation = segmentations.get(study.name) if study.mask is not None else None
        results.append(StudyResult(study.name, study.lesions, findings, match, segmentation))
    truth_labels = {lesion.label for study in dataset.studies for lesion in study.lesions}
    found_labels = {f.label for result in results for f in result.findings}
    if truth_labels and found_labels and not truth_labels & found_labels:
        warnings = [
            *warnings,
            f"the truth's labels ({', '.join(sorted(truth_labels))}) and the findings' "
            f"({', '.join(sorted(found_labels))}) have none in common: a hit needs the lesion's label",
        ]
    return EvalReport(tuple(results), model, model_version, str(dataset.root), tuple(warnings))


def compare_seg(study: Study, seg: bytes | None) -> SegmentationResult:
    """The server's DICOM SEG of ``study`` (None: it sent none, having found nothing) against the truth mask."""
    truth = read_truth_mask(study)
    labels = {lesion.label for lesion in study.lesions}
    predicted = {} if seg is None else seg_masks(seg, truth, labels, f"study {study.name}")
    return compare_masks(study, predicted, truth)


def compare_masks(
    study: Study, predicted: Mapping[str, np.ndarray], truth: TruthMask | None = None
) -> SegmentationResult:
    """Predicted masks (label -> bool array on the truth mask's grid) against the study's truth mask."""
    truth = truth or read_truth_mask(study)
    voxels = {}
    for label in {lesion.label for lesion in study.lesions} | set(predicted):
        numbers = [n + 1 for n, lesion in enumerate(study.lesions) if lesion.label == label]
        truth_label = np.isin(truth.labels, numbers)
        mask = predicted.get(label)
        mask = np.zeros(truth.labels.shape, dtype=bool) if mask is None else mask
        if mask.shape != truth.labels.shape:
            raise ValueError(
                f"study {study.name}: predicted mask {mask.shape} is not on the truth grid {truth.labels.shape}"
            )
        voxels[label] = (int(np.logical_and(truth_label, mask).sum()), int(truth_label.sum()), int(mask.sum()))
    covered: list[bool | None] = []
    for n, lesion in enumerate(study.lesions):
        own = truth.labels == n + 1
        mask = predicted.get(lesion.label)
        covered.append(None if not own.any() else bool(mask is not None and np.logical_and(own, mask).any()))
    return SegmentationResult(voxels, tuple(covered))


def labels_of(studies: Sequence[StudyResult]) -> tuple[str, ...]:
    labels = {lesion.label for s in studies for lesion in s.lesions} | {f.label for s in studies for f in s.findings}
    return tuple(sorted(labels))


def label_metrics(studies: Sequence[StudyResult], label: str, bucket: str | None = None) -> dict[str, Any]:
    """The metrics of ``label`` over ``studies`` (all lesions, or those of one size ``bucket``)."""
    hit_scores: list[float] = []
    fp_scores: list[float] = []
    center_errors: list[float] = []
    diameter_errors: list[float] = []
    lesions = 0
    fp_counts = []
    for study in studies:
        for n, lesion in enumerate(study.lesions):
            if lesion.label != label or (bucket is not None and size_bucket(lesion.diameter_mm) != bucket):
                continue
            lesions += 1
            found = study.match.lesion_finding[n]
            if found is None:
                continue
            finding = study.findings[found]
            hit_scores.append(finding.score)
            center_errors.append(math.dist(finding.center_mm, lesion.center_mm))
            if finding.diameter_mm is not None:
                diameter_errors.append(finding.diameter_mm - lesion.diameter_mm)
        study_fps = [
            f.score
            for f, m in zip(study.findings, study.match.finding_lesion, strict=True)
            if m is None and f.label == label
        ]
        fp_scores += study_fps
        fp_counts.append(len(study_fps))
    n_studies = len(studies)
    points = froc_points(froc_curve(hit_scores, fp_scores, lesions, n_studies)) if lesions else None
    metrics: dict[str, Any] = {
        "lesions": lesions,
        "hits": len(hit_scores),
        "sensitivity": _ratio(len(hit_scores), lesions),
    }
    if bucket is None:
        metrics = {
            "studies": n_studies,
            **metrics,
            "false_positives": len(fp_scores),
            "fp_per_study": _ratio(len(fp_scores), n_studies),
            "fp_max_in_a_study": max(fp_counts, default=0),
            "studies_with_more_than_one_fp": sum(n > 1 for n in fp_counts),
        }
    metrics["froc"] = (
        None if points is None else {name: round(p, 4) for name, p in zip(RATE_NAMES, points, strict=True)}
    )
    metrics["cpm"] = None if points is None else round(cpm(points), 4)
    metrics["center_error_mm"] = _stats(center_errors)
    metrics["diameter_error_mm"] = _signed_stats(diameter_errors)
    return metrics


def froc_of(studies: Sequence[StudyResult], label: str, bucket: str | None = None) -> list[tuple[float, float]]:
    """(fp_per_study, sensitivity) operating points of ``label``, for plotting."""
    hit_scores, fp_scores, lesions = [], [], 0
    for study in studies:
        for n, lesion in enumerate(study.lesions):
            if lesion.label == label and (bucket is None or size_bucket(lesion.diameter_mm) == bucket):
                lesions += 1
                if study.match.lesion_finding[n] is not None:
                    hit_scores.append(study.findings[study.match.lesion_finding[n]].score)
        fp_scores += [
            f.score
            for f, m in zip(study.findings, study.match.finding_lesion, strict=True)
            if m is None and f.label == label
        ]
    return [(p.fp_per_study, p.sensitivity) for p in froc_curve(hit_scores, fp_scores, lesions, len(studies))]


def segmentation_metrics(studies: Sequence[StudyResult], label: str) -> dict[str, Any] | None:
    """Dice and lesion-wise detection of ``label`` over the studies with masks; None when no study has one."""
    measured = [s for s in studies if s.segmentation is not None]
    if not measured:
        return None
    dices, intersection, total = [], 0, 0
    lesion_free_with_voxels = 0
    for study in measured:
        inter, truth, predicted = study.segmentation.voxels.get(label, (0, 0, 0))  # type: ignore[union-attr]
        if truth:
            dices.append(2.0 * inter / (truth + predicted))
            intersection += inter
            total += truth + predicted
        elif predicted:
            lesion_free_with_voxels += 1

    def lesion_wise(bucket: str | None) -> dict[str, Any]:
        counted = detected = without_voxels = 0
        for study in measured:
            for lesion, covered in zip(study.lesions, study.segmentation.lesion_covered, strict=True):  # type: ignore[union-attr]
                if lesion.label != label or (bucket is not None and size_bucket(lesion.diameter_mm) != bucket):
                    continue
                if covered is None:
                    without_voxels += 1
                    continue
                counted += 1
                detected += covered
        return {
            "lesions": counted,
            "detected": detected,
            "sensitivity": _ratio(detected, counted),
            "lesions_without_voxels": without_voxels,
        }

    return {
        "studies": len(measured),
        "dice_per_study": {
            "studies": len(dices),
            "mean": _round(statistics.fmean(dices)) if dices else None,
            "median": _round(statistics.median(dices)) if dices else None,
            "min": _round(min(dices)) if dices else None,
        },
        "dice_pooled": _round(2.0 * intersection / total) if total else None,
        "lesion_free_studies_with_predicted_voxels": lesion_free_with_voxels,
        "lesion_wise": {
            "overall": lesion_wise(None),
            "buckets": {name: lesion_wise(name) for name, _, _ in SIZE_BUCKETS},
        },
    }


def _ratio(numerator: int, denominator: int) -> float | None:
    return None if denominator == 0 else round(numerator / denominator, 4)


def _round(value: float) -> float:
    return round(value, 4)


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "p90": None, "max": None}
    return {
        "mean": _round(statistics.fmean(values)),
        "median": _round(statistics.median(values)),
        "p90": _round(float(np.percentile(values, 90))),
        "max": _round(max(values)),
    }


def _signed_stats(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "mean_abs": None, "median": None}
    return {
        "mean": _round(statistics.fmean(values)),
        "mean_abs": _round(statistics.fmean(abs(v) for v in values)),
        "median": _round(statistics.median(values)),
    }


def _study_json(study: StudyResult) -> dict[str, Any]:
    body: dict[str, Any] = {
        "study": study.name,
        "truth": [lesion.to_json() for lesion in study.lesions],
        "findings": [
            {**f.to_json(), "lesion": None if m is None else m}
            for f, m in zip(study.findings, study.match.finding_lesion, strict=True)
        ],
    }
    if study.segmentation is not None:
        body["segmentation"] = {
            "voxels": {
                k: dict(zip(("intersection", "truth", "predicted"), v, strict=True))
                for k, v in study.segmentation.voxels.items()
            },
            "lesion_covered": list(study.segmentation.lesion_covered),
        }
    return body


__all__ = [
    "FROC_RATES",
    "SIZE_BUCKETS",
    "EvalReport",
    "SegmentationResult",
    "StudyResult",
    "evaluate",
    "label_metrics",
    "segmentation_metrics",
    "size_bucket",
]
