"""Paired differences of two versions on the same studies, against answers worked out by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from inference.evaluation import Finding, TruthLesion, compare, evaluate, mcnemar_exact
from inference.evaluation.dataset import Dataset, Study


def dataset(tmp_path: Path, n: int = 10) -> Dataset:
    studies = tuple(
        Study(f"s{k}", tmp_path, (TruthLesion("lesion", (0.0, 0.0, 0.0), 10.0),), (tmp_path,), False) for k in range(n)
    )
    return Dataset(tmp_path, studies)


def found(score: float = 0.9) -> Finding:
    return Finding("lesion", score, (0.5, 0.0, 0.0), 10.0)


def far(score: float = 0.5) -> Finding:
    return Finding("lesion", score, (60.0, 0.0, 0.0), 10.0)


def test_paired_differences_discordant_lesions_and_mcnemar(tmp_path):
    data = dataset(tmp_path)
    # a finds the lesions of studies 0-5; b those of 0-7 and adds a false positive in study 9.
    a = evaluate(data, {f"s{k}": [found()] if k < 6 else [] for k in range(10)}, model="m", model_version="1")
    b_findings = {f"s{k}": [found()] if k < 8 else [] for k in range(10)}
    b_findings["s9"] = [far()]
    b = evaluate(data, b_findings, model="m", model_version="2")

    result = compare(a, b, resamples=500, seed=3)
    assert (result.a, result.b, result.studies) == ("m:1", "m:2", 10)
    entry = result.labels["lesion"]
    assert entry["sensitivity"]["a"] == 0.6 and entry["sensitivity"]["b"] == 0.8
    assert entry["sensitivity"]["difference"] == pytest.approx(0.2)
    low, high = entry["sensitivity"]["ci95"]
    # b finds every lesion a finds, in every study: no resample can show b below a.
    assert 0.0 <= low <= 0.2 <= high
    assert entry["fp_per_study"]["difference"] == pytest.approx(0.1) and entry["fp_per_study"]["ci95"][0] >= 0.0
    assert entry["lesions"] == {"both": 6, "only_a": 0, "only_b": 2, "neither": 2, "mcnemar_p": 0.5}
    assert compare(a, b, resamples=500, seed=3).labels == result.labels  # seeded: the same interval


def test_a_version_against_itself_differs_by_nothing(tmp_path):
    data = dataset(tmp_path, 6)
    report = evaluate(data, {f"s{k}": [found(0.5 + k / 20), far(0.3)] for k in range(6)})
    entry = compare(report, report, resamples=200).labels["lesion"]
    for metric in ("sensitivity", "fp_per_study", "cpm"):
        assert entry[metric]["difference"] == 0.0 and entry[metric]["ci95"] == [0.0, 0.0]
    assert entry["lesions"]["only_a"] == entry["lesions"]["only_b"] == 0 and entry["lesions"]["mcnemar_p"] == 1.0


def test_reports_on_different_studies_are_refused(tmp_path):
    a = evaluate(dataset(tmp_path, 4), {f"s{k}": [] for k in range(4)})
    b = evaluate(dataset(tmp_path, 5), {f"s{k}": [] for k in range(5)})
    with pytest.raises(ValueError, match="different studies"):
        compare(a, b)


def test_mcnemar_exact_by_hand():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32, abs=1e-4)  # 2 x P(X <= 0), X ~ Bin(5, 1/2)
    assert mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 1024, abs=1e-4)
    assert mcnemar_exact(4, 4) == 1.0
