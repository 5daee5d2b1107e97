"""The rules behind shadow agreement and the promotion guard, on findings and counts written by hand (no server)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from inference.config import PromotionPolicy
from inference.evaluation.promotion import PooledScore, regression_reasons
from inference.serving.promotion import shadow_reasons
from inference.serving.shadow import Agreement, ShadowTarget, match_findings


def finding(label: str, center: tuple[float, ...], diameter_mm: float = 10.0):
    return SimpleNamespace(label=label, center_mm=center, diameter_mm=diameter_mm)


def test_matching_takes_label_radius_floor_and_one_to_one():
    live = [finding("nodule", (0, 0, 0), 10.0), finding("nodule", (50, 0, 0), 2.0), finding("mass", (100, 0, 0))]
    shadow = [
        finding("nodule", (4, 0, 0)),  # 4 mm from the first live finding: inside its 5 mm radius
        finding("nodule", (1, 0, 0)),  # nearer still: takes the first live finding, the 4 mm one is left over
        finding("nodule", (52.9, 0, 0)),  # 2.9 mm from a 2 mm finding: inside the 3 mm floor
        finding("nodule", (100, 0, 0)),  # the right place, the wrong label
    ]
    pairs = match_findings(live, shadow)
    assert sorted((i, j) for i, j, _ in pairs) == [(0, 1), (1, 2)]
    assert sorted(round(d, 1) for _, _, d in pairs) == [1.0, 2.9]


def test_agreement_shares_and_shift():
    agreement = Agreement()
    agreement.add([finding("n", (0, 0, 0)), finding("n", (30, 0, 0))], [finding("n", (2, 0, 0))])
    agreement.add([], [])  # a read where neither found anything counts, and agrees
    assert (agreement.reads_compared, agreement.live_findings, agreement.shadow_findings) == (2, 2, 1)
    assert agreement.live_found_share == 0.5 and agreement.shadow_found_share == 1.0
    assert agreement.agreement == 0.5 and agreement.mean_center_shift_mm == 2.0
    assert Agreement().agreement == 1.0  # nothing compared: nothing disagrees (the guard counts reads apart)


@pytest.mark.parametrize(("fraction", "taken"), [(1.0, 8), (0.25, 2), (0.5, 4), (0.3, 2)])
def test_sampling_is_a_counter(fraction, taken):
    target = ShadowTarget("m", "2", fraction)
    assert sum(target.take() for _ in range(8)) == taken


def test_shadow_guard_needs_enough_reads_and_the_floor():
    policy = PromotionPolicy(min_shadow_reads=4, min_agreement=0.9)
    assert "it is not shadowed" in shadow_reasons(None, policy, "m:2")[0]
    few = Agreement(reads_compared=3, live_findings=3, shadow_findings=3, matched=3)
    assert "only 3 read(s) compared" in shadow_reasons(few, policy, "m:2")[0]
    low = Agreement(reads_compared=4, live_findings=10, shadow_findings=8, matched=8)  # 0.8 of live found
    assert "0.800 over 4 reads is below the floor 0.9" in shadow_reasons(low, policy, "m:2")[0]
    good = Agreement(reads_compared=4, live_findings=10, shadow_findings=10, matched=9)
    assert shadow_reasons(good, policy, "m:2") == []
    assert shadow_reasons(None, PromotionPolicy(min_shadow_reads=0), "m:2") == []
    with pytest.raises(ValueError, match="promotion_min_agreement must be in"):
        PromotionPolicy(min_agreement=1.5)


def test_evaluation_regression_beyond_tolerance():
    live = PooledScore(studies=10, lesions=20, hits=18, false_positives=5)  # 0.9, 0.5 FP per study
    same = regression_reasons(live, live, max_sensitivity_drop=0.05, max_fp_per_study_increase=0.25, dataset="d")
    assert same == []
    within = PooledScore(studies=10, lesions=20, hits=17, false_positives=7)  # drop 0.05, rise 0.2: within
    assert (
        regression_reasons(live, within, max_sensitivity_drop=0.05, max_fp_per_study_increase=0.25, dataset="d") == []
    )
    worse = PooledScore(studies=10, lesions=20, hits=10, false_positives=10)  # drop 0.4, rise 0.5
    reasons = regression_reasons(live, worse, max_sensitivity_drop=0.05, max_fp_per_study_increase=0.25, dataset="d")
    assert len(reasons) == 2
    assert "sensitivity 0.500 (10/20) against 0.900" in reasons[0] and "rise of 0.50" in reasons[1]
