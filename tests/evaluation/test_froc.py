"""FROC points and the CPM on hand-made findings whose answers are worked out by hand."""

from __future__ import annotations

import pytest

from inference.evaluation import EvalReport, Finding, TruthLesion, cpm, evaluate, froc_curve, froc_points
from inference.evaluation.dataset import Dataset, Study
from inference.evaluation.froc import sensitivity_at


def test_operating_points_group_equal_scores_and_run_by_decreasing_threshold():
    curve = froc_curve(hit_scores=[0.9, 0.7, 0.7], fp_scores=[0.8, 0.7, 0.2], lesions=4, studies=2)
    assert [(p.threshold, p.fp_per_study, p.sensitivity) for p in curve] == [
        (0.9, 0.0, 0.25),
        (0.8, 0.5, 0.25),
        (0.7, 1.0, 0.75),  # two hits and one false positive share the score 0.7: they come together
        (0.2, 1.5, 0.75),
    ]


def test_sensitivity_at_a_rate_is_the_best_point_within_it_without_interpolation():
    curve = froc_curve(hit_scores=[0.9, 0.7, 0.7], fp_scores=[0.8, 0.7, 0.2], lesions=4, studies=2)
    assert sensitivity_at(curve, 0.125) == 0.25  # only the first point has no more than 1/8 FP per study
    assert sensitivity_at(curve, 0.5) == 0.25
    assert sensitivity_at(curve, 0.99) == 0.25  # 0.75 needs 1 FP per study: not interpolated
    assert sensitivity_at(curve, 1.0) == 0.75
    assert sensitivity_at(curve, 8.0) == 0.75  # beyond the last point: all findings
    points = froc_points(curve)
    assert points == [0.25, 0.25, 0.25, 0.75, 0.75, 0.75, 0.75]
    assert cpm(points) == pytest.approx((3 * 0.25 + 4 * 0.75) / 7)


def test_no_point_within_the_smallest_rate_gives_zero():
    curve = froc_curve(hit_scores=[0.5], fp_scores=[0.9, 0.8], lesions=1, studies=4)
    # The first point already has 1/4 FP per study, the second 2/4 with the hit.
    assert froc_points(curve) == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_a_report_counts_lesions_hits_and_false_positives_per_label_and_bucket(tmp_path):
    # Four studies: 5 nodules (4, 8, 12, 25 and 9 mm) and one mass; findings by hand.
    truth = {
        "a": [TruthLesion("nodule", (0, 0, 0), 4.0), TruthLesion("nodule", (50, 0, 0), 8.0)],
        "b": [TruthLesion("nodule", (0, 0, 0), 12.0), TruthLesion("mass", (80, 0, 0), 30.0)],
        "c": [TruthLesion("nodule", (0, 0, 0), 25.0)],
        "d": [TruthLesion("nodule", (0, 0, 0), 9.0)],
    }
    findings = {
        "a": [Finding("nodule", 0.9, (1, 0, 0), 5.0), Finding("nodule", 0.4, (50, 30, 0), 7.0)],  # hit 4 mm; FP
        "b": [Finding("nodule", 0.8, (0, 5, 0), 11.0), Finding("nodule", 0.3, (0, -5, 0), 11.0)],  # hit; 2nd is FP
        "c": [Finding("nodule", 0.6, (0, 0, 12), 23.0)],  # 12 mm from a 25 mm nodule's center: hit
        "d": [Finding("mass", 0.95, (0, 0, 0), 9.0)],  # wrong label: the nodule is missed, the mass finding is a FP
    }
    studies = tuple(Study(name, tmp_path, tuple(lesions), (tmp_path,), False) for name, lesions in truth.items())
    report = evaluate(Dataset(tmp_path, studies), findings)
    assert isinstance(report, EvalReport) and report.labels == ("mass", "nodule")

    nodule = report.metrics("nodule")
    assert (nodule["studies"], nodule["lesions"], nodule["hits"], nodule["false_positives"]) == (4, 5, 3, 2)
    assert nodule["sensitivity"] == 0.6 and nodule["fp_per_study"] == 0.5
    # Hits at 0.9, 0.8, 0.6; false positives at 0.4 and 0.3 over 4 studies, 5 lesions:
    # 1/8 and 1/4 FP per study: 3/5 (no FP above 0.6); 1/2: still 3/5; beyond: no further hit.
    assert nodule["froc"] == {k: 0.6 for k in ("1/8", "1/4", "1/2", "1", "2", "4", "8")}
    assert nodule["center_error_mm"]["max"] == pytest.approx(12.0)
    assert nodule["diameter_error_mm"]["mean"] == pytest.approx(((5 - 4) + (11 - 12) + (23 - 25)) / 3, abs=1e-4)

    buckets = {name: report.metrics("nodule", name) for name in ("<6", "6-10", "10-20", ">=20")}
    assert [(b["lesions"], b["hits"]) for b in buckets.values()] == [(1, 1), (2, 0), (1, 1), (1, 1)]
    assert buckets["6-10"]["froc"]["8"] == 0.0 and buckets["6-10"]["cpm"] == 0.0
    assert "false_positives" not in buckets["<6"]  # a false positive has no size

    mass = report.metrics("mass")
    assert (mass["lesions"], mass["hits"], mass["false_positives"]) == (1, 0, 1)
    # The mass finding (0.95) is a false positive: 1 FP over 4 studies = 1/4 FP per study, no hit at any rate.
    assert mass["cpm"] == 0.0


def test_labels_that_never_meet_are_warned_about(tmp_path):
    study = Study("a", tmp_path, (TruthLesion("Nodule", (0, 0, 0), 8.0),), (tmp_path,), False)
    report = evaluate(Dataset(tmp_path, (study,)), {"a": [Finding("nodule", 0.9, (0, 0, 0), 8.0)]})
    assert report.metrics("Nodule")["hits"] == 0 and report.metrics("nodule")["false_positives"] == 1
    assert report.warnings == (
        "the truth's labels (Nodule) and the findings' (nodule) have none in common: a hit needs the lesion's label",
    )
