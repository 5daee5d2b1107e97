"""`radserve phantoms make`: labelled datasets in eval's format, the same bytes for the same seed."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from inference.cli import main
from inference.evaluation import load_dataset
from inference.phantoms.dataset import make_dataset


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("modality", "shape"), [("CT", (64, 64, 24)), ("MR", (48, 48, 20)), ("DX", (256, 256))])
def test_the_same_seed_writes_the_same_bytes_and_eval_reads_them(tmp_path, modality, shape):
    first = make_dataset(tmp_path / "a", modality, 2, seed=11, shape=shape)
    make_dataset(tmp_path / "b", modality, 2, seed=11, shape=shape)
    make_dataset(tmp_path / "c", modality, 2, seed=12, shape=shape)
    assert [p.name for p in first] == ["study_0000", "study_0001"]
    assert tree(tmp_path / "a") == tree(tmp_path / "b")
    assert tree(tmp_path / "a") != tree(tmp_path / "c")

    data = load_dataset(tmp_path / "a")
    assert len(data) == 2 and all(not s.nifti for s in data.studies)
    assert {len(lesion.center_mm) for s in data.studies for lesion in s.lesions} <= {2 if modality == "DX" else 3}
    assert all((s.mask is not None) == (modality == "MR") for s in data.studies)
    manifest = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert manifest["modality"] == modality and manifest["seed"] == 11 and manifest["count"] == 2


def test_the_mr_mask_marks_each_lesion_where_its_truth_says(tmp_path):
    make_dataset(tmp_path / "mr", "MR", 6, seed=2, shape=(64, 64, 24))
    checked = 0
    for study in load_dataset(tmp_path / "mr").studies:
        image = nib.load(study.mask)
        labels = np.asarray(image.dataobj)
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine  # RAS -> LPS
        # The mask's grid is the series': voxel (i, j, k) is column i, row j of slice k (files in slice order).
        first = pydicom.dcmread(study.image_files[0], stop_before_pixels=True)
        assert np.allclose(affine[:3, 3], [float(v) for v in first.ImagePositionPatient], atol=1e-3)
        assert labels.shape == (first.Columns, first.Rows, len(study.image_files))
        for n, lesion in enumerate(study.lesions, start=1):
            voxels = np.argwhere(labels == n)
            if len(voxels) < 20:  # a lesion of a few voxels: its voxel centroid is not its analytic centroid
                continue
            centroid = affine[:3, :3] @ voxels.mean(axis=0) + affine[:3, 3]
            spacing = np.linalg.norm(affine[:3, :3], axis=0)
            assert np.all(np.abs(centroid - np.array(lesion.center_mm)) < spacing), (study.name, n)
            checked += 1
    assert checked >= 2


def test_the_command_refuses_a_used_folder_and_a_bad_shape(tmp_path, capsys):
    out = tmp_path / "used"
    out.mkdir()
    (out / "something").write_text("x")
    assert main(["phantoms", "make", "--modality", "ct", "--count", "1", "--out", str(out)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    new = str(tmp_path / "new")
    assert main(["phantoms", "make", "--modality", "DX", "--count", "1", "--out", new, "--shape", "64x64x3"]) == 2
    assert "a DX shape is ROWSxCOLUMNS, got 64x64x3" in capsys.readouterr().err
    assert main(["phantoms", "make", "--modality", "MR", "--count", "1", "--out", new, "--shape", "big"]) == 2
    assert "--shape must be sizes joined by x" in capsys.readouterr().err
    assert main(["phantoms", "make", "--modality", "CT", "--count", "1", "--out", new, "--bias-amplitude", "0.3"]) == 2
    assert "a bias amplitude is for MR, between 0 and 1, got 0.3 for CT" in capsys.readouterr().err
    args = ["--shape", "32x32x16", "--bias-amplitude", "0.35"]
    assert main(["phantoms", "make", "--modality", "MR", "--count", "1", "--out", new, *args]) == 0
    captured = capsys.readouterr()
    assert "[1/1] study_0000" in captured.err and "wrote 1 MR studies" in captured.out
    assert json.loads((Path(new) / "dataset.json").read_text())["bias_amplitude"] == 0.35
