"""Dice and lesion-wise detection from masks whose overlaps are counted by hand."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from inference.evaluation import Finding, TruthLesion, evaluate
from inference.evaluation.dataset import Dataset, Study
from inference.evaluation.metrics import compare_masks


def study_with_mask(tmp_path: Path, name: str, labels: np.ndarray, lesions: list[TruthLesion]) -> Study:
    folder = tmp_path / name
    folder.mkdir()
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), np.eye(4)), folder / "mask.nii.gz")
    return Study(name, folder, tuple(lesions), (folder,), False, "", folder / "mask.nii.gz")


def test_dice_pooled_and_per_study_and_lesions_covered(tmp_path):
    shape = (10, 10, 10)
    a_truth = np.zeros(shape, np.uint8)
    a_truth[0:4, 0:4, 0:4] = 1  # 64 voxels, lesion 1
    a_truth[6:8, 6:8, 6:8] = 2  # 8 voxels, lesion 2
    a = study_with_mask(
        tmp_path,
        "a",
        a_truth,
        [TruthLesion("lesion", (1.5, 1.5, 1.5), 6.0), TruthLesion("lesion", (6.5, 6.5, 6.5), 3.0)],
    )
    a_pred = np.zeros(shape, bool)
    a_pred[0:4, 0:4, 0:2] = True  # half of lesion 1: 32 voxels
    a_pred[9, 9, 9] = True  # one voxel off any lesion; lesion 2 untouched
    b_truth = np.zeros(shape, np.uint8)
    b_truth[2, 2, 2] = 1  # a one-voxel lesion...
    b = study_with_mask(
        tmp_path, "b", b_truth, [TruthLesion("lesion", (2, 2, 2), 5.0), TruthLesion("lesion", (30, 30, 30), 5.0)]
    )
    b_pred = np.zeros(shape, bool)
    b_pred[2, 2, 2] = True  # ...found whole; the second lesion has no voxel in the mask
    c = study_with_mask(tmp_path, "c", np.zeros(shape, np.uint8), [])  # lesion-free, with predicted voxels
    c_pred = np.zeros(shape, bool)
    c_pred[5, 5, 5:7] = True

    segmentations = {
        "a": compare_masks(a, {"lesion": a_pred}),
        "b": compare_masks(b, {"lesion": b_pred}),
        "c": compare_masks(c, {"lesion": c_pred}),
    }
    assert segmentations["a"].voxels["lesion"] == (32, 72, 33)
    assert segmentations["a"].lesion_covered == (True, False)
    assert segmentations["b"].lesion_covered == (True, None)
    report = evaluate(
        Dataset(tmp_path, (a, b, c)),
        {"a": [], "b": [], "c": [Finding("lesion", 0.9, (5, 5, 5.5))]},
        segmentations=segmentations,
    )

    seg = report.segmentation("lesion")
    assert seg["studies"] == 3
    assert seg["dice_per_study"]["studies"] == 2  # c has no truth voxels
    assert seg["dice_per_study"]["mean"] == pytest.approx((2 * 32 / (72 + 33) + 1.0) / 2, abs=1e-4)
    assert seg["dice_pooled"] == pytest.approx(2 * (32 + 1) / (72 + 33 + 1 + 1), abs=1e-4)
    assert seg["lesion_free_studies_with_predicted_voxels"] == 1
    overall = seg["lesion_wise"]["overall"]
    assert (overall["lesions"], overall["detected"], overall["lesions_without_voxels"]) == (3, 2, 1)
    assert seg["lesion_wise"]["buckets"]["<6"] == {
        "lesions": 2,
        "detected": 1,
        "sensitivity": 0.5,
        "lesions_without_voxels": 1,
    }
