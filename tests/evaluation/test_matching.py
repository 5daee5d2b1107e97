"""The matching rule: center within the truth lesion's radius (at least 3 mm), same label, one finding per lesion."""

from __future__ import annotations

import pytest

from inference.evaluation import Finding, TruthLesion, match_findings
from inference.evaluation.matching import hit_radius_mm


def lesion(center, diameter, label="nodule"):
    return TruthLesion(label, tuple(center), diameter)


def finding(center, score=0.9, label="nodule", diameter=None):
    return Finding(label, score, tuple(center), diameter)


def test_a_hit_lies_within_the_radius_of_a_large_lesion():
    truth = [lesion([0, 0, 0], 20.0)]  # radius 10 mm
    assert match_findings(truth, [finding([9.9, 0, 0])]).lesion_finding == (0,)
    assert match_findings(truth, [finding([0, 10.1, 0])]).lesion_finding == (None,)


def test_the_radius_is_never_under_three_mm():
    truth = [lesion([0, 0, 0], 4.0)]  # radius 2 mm: the floor, 3 mm, applies
    assert hit_radius_mm(4.0) == 3.0 and hit_radius_mm(8.0) == 4.0
    assert match_findings(truth, [finding([0, 0, 2.9])]).lesion_finding == (0,)
    assert match_findings(truth, [finding([0, 0, 3.1])]).finding_lesion == (None,)


def test_one_finding_per_lesion_the_second_is_a_false_positive():
    truth = [lesion([0, 0, 0], 10.0)]
    match = match_findings(truth, [finding([1, 0, 0], score=0.6), finding([0, 1, 0], score=0.9)])
    assert match.lesion_finding == (1,)  # the higher score takes the lesion
    assert match.finding_lesion == (None, 0)  # the other is a false positive


def test_a_finding_takes_the_nearest_free_lesion_and_findings_go_by_score():
    truth = [lesion([0, 0, 0], 20.0), lesion([12, 0, 0], 20.0)]  # overlapping reach
    match = match_findings(truth, [finding([7, 0, 0], score=0.5), finding([5, 0, 0], score=0.9)])
    # 0.9 at x=5 takes lesion 0 (5 mm < 7 mm); 0.5 at x=7 then takes lesion 1 (5 mm, within its 10 mm).
    assert match.lesion_finding == (1, 0)


def test_labels_must_agree():
    truth = [lesion([0, 0, 0], 10.0, label="mass")]
    match = match_findings(truth, [finding([0, 0, 0], label="nodule")])
    assert match.lesion_finding == (None,) and match.finding_lesion == (None,)


def test_projection_xray_matches_on_the_image_plane():
    truth = [lesion([100.0, 150.0], 20.0, label="opacity")]
    assert match_findings(truth, [finding([108.0, 145.0], label="opacity")]).lesion_finding == (0,)  # 9.4 mm
    assert match_findings(truth, [finding([108.0, 156.0], label="opacity")]).lesion_finding == (0,)  # 10.0 mm: on it
    assert match_findings(truth, [finding([108.0, 143.0], label="opacity")]).lesion_finding == (None,)  # 10.6 mm
    with pytest.raises(ValueError, match=r"study x: finding 1 has a 3-D center, the truth 2-D"):
        match_findings(truth, [finding([108.0, 145.0, 0.0], label="opacity")], where="study x: ")
