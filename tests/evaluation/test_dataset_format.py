"""The labelled-study format: what load_dataset accepts, and the message for each malformed dataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from inference.cli import main
from inference.evaluation import DatasetError, load_dataset
from inference.phantoms.dataset import make_study


@pytest.fixture(scope="module")
def mr_study(tmp_path_factory) -> Path:
    """A valid MR study (DICOM series, truth.json, mask.nii.gz) with lesions, to copy and break."""
    folder = tmp_path_factory.mktemp("template") / "study"
    for index in range(20):  # the first index whose phantom holds a lesion
        lesions = make_study(folder, "MR", index, seed=5, shape=(32, 32, 16))
        if lesions:
            return folder
        shutil.rmtree(folder)
    raise AssertionError("no phantom with a lesion")


def dataset_with(tmp_path: Path, template: Path, name: str = "s1") -> Path:
    root = tmp_path / "data"
    shutil.copytree(template, root / name)
    return root


def truth_of(root: Path, name: str = "s1") -> dict:
    return json.loads((root / name / "truth.json").read_text())


def write_truth(root: Path, body, name: str = "s1") -> None:
    (root / name / "truth.json").write_text(body if isinstance(body, str) else json.dumps(body))


def test_a_valid_study_loads(tmp_path, mr_study):
    root = dataset_with(tmp_path, mr_study)
    (root / "dataset.json").write_text("{}")  # files at the top are not studies
    data = load_dataset(root)
    (study,) = data.studies
    assert study.name == "s1" and not study.nifti and study.mask == root / "s1" / "mask.nii.gz"
    assert len(study.image_files) == 16 and all(p.suffix == ".dcm" for p in study.image_files)
    assert study.lesions[0].label == "lesion" and len(study.lesions[0].center_mm) == 3
    assert study.lesions[0].attributes["contrast"] in ("bright", "dark")
    assert data.labels == ("lesion",)


MALFORMED_TRUTH = [
    ("{", r"study s1: truth.json is not valid JSON \(line 1, column 2: "),
    ("[]", r"study s1: truth.json must hold a JSON object, got a list"),
    ({"lesions": []}, r"study s1: truth.json has no 'findings'"),
    ({"findings": {}}, r"study s1: truth.json 'findings' must be a list, got an object"),
    ({"findings": [3]}, r"study s1: truth.json findings\[0\]: must be an object"),
    ({"findings": [{"label": "lesion", "center_mm": [0, 0, 0]}]}, r"findings\[0\]: missing 'diameter_mm'"),
    (
        {"findings": [{"label": "lesion", "center_mm": [0, 0, 0, 1], "diameter_mm": 5}]},
        r"study s1: truth.json findings\[0\].center_mm: must be \[x, y, z\] \(LPS mm\) or \[x, y\].*got \[0, 0, 0, 1\]",
    ),
    (
        {"findings": [{"label": "lesion", "center_mm": [0, "a", 0], "diameter_mm": 5}]},
        r"findings\[0\].center_mm: must be",
    ),
    (
        {"findings": [{"label": "lesion", "center_mm": [0, 0, 0], "diameter_mm": -2}]},
        r"findings\[0\].diameter_mm: must be a positive number \(mm\), got -2",
    ),
    (
        {"findings": [{"label": "", "center_mm": [0, 0, 0], "diameter_mm": 5}]},
        r"findings\[0\].label: must be a non-empty",
    ),
    (
        {
            "findings": [
                {"label": "a", "center_mm": [0, 0, 0], "diameter_mm": 5},
                {"label": "a", "center_mm": [0, 0], "diameter_mm": 5},
            ]
        },
        r"study s1: truth.json mixes \[x, y\] and \[x, y, z\] center_mm",
    ),
    ({"findings": [], "modality": 3}, r"study s1: truth.json 'modality' must be a string"),
    ({"findings": [], "mask": "../mask.nii.gz"}, r"study s1: truth.json 'mask': must name a file inside the study"),
    ({"findings": [], "mask": "mask.png"}, r"'mask': must be a NIfTI file \(.nii or .nii.gz\), got 'mask.png'"),
    ({"findings": [], "mask": "other.nii.gz"}, r"'mask': other.nii.gz does not exist in the study folder"),
]


@pytest.mark.parametrize(("truth", "message"), MALFORMED_TRUTH)
def test_malformed_truth_names_the_study_and_the_field(tmp_path, mr_study, truth, message):
    root = dataset_with(tmp_path, mr_study)
    write_truth(root, truth)
    with pytest.raises(DatasetError, match=message):
        load_dataset(root)


def test_missing_truth_no_images_and_mixed_kinds(tmp_path, mr_study):
    root = dataset_with(tmp_path, mr_study)
    (root / "s1" / "truth.json").unlink()
    with pytest.raises(DatasetError, match=r"^study s1: missing truth.json$"):
        load_dataset(root)

    empty = tmp_path / "empty"
    (empty / "s2").mkdir(parents=True)
    write_truth(empty, {"findings": []}, name="s2")
    with pytest.raises(DatasetError, match=r"study s2: no image files beside truth.json"):
        load_dataset(empty)
    with pytest.raises(DatasetError, match=r"no study folders"):
        load_dataset(tmp_path / "empty" / "s2")
    with pytest.raises(DatasetError, match=r"not a directory"):
        load_dataset(tmp_path / "nowhere")

    nifti = tmp_path / "nifti"
    shutil.copytree(mr_study, nifti / "s3")
    (nifti / "s3" / "image.nii.gz").write_bytes(b"")
    write_truth(nifti, {"findings": []}, name="s3")  # the mask is no longer named: two NIfTI files beside DICOM
    with pytest.raises(DatasetError, match=r"study s3: a NIfTI study is one .nii or .nii.gz file; found 2 NIfTI"):
        load_dataset(nifti)

    mixed = dataset_with(tmp_path / "m", mr_study, "s4")
    (mixed / "s5").mkdir()
    (mixed / "s5" / "image.dcm").write_bytes(b"")
    write_truth(mixed, {"findings": [{"label": "opacity", "center_mm": [1, 2], "diameter_mm": 9}]}, name="s5")
    with pytest.raises(DatasetError, match=r"study s5 has \[x, y\] centers .* and study s4 \[x, y, z\] centers"):
        load_dataset(mixed)


def test_a_mask_must_be_a_label_map_in_the_studys_grid(tmp_path, mr_study):
    root = dataset_with(tmp_path, mr_study)
    mask_path = root / "s1" / "mask.nii.gz"
    original = nib.load(mask_path)
    labels = np.asarray(original.dataobj)
    n_lesions = len(truth_of(root)["findings"])

    nib.save(nib.Nifti1Image(labels[:, :, :-1], original.affine), mask_path)
    with pytest.raises(
        DatasetError,
        match=r"study s1: mask mask.nii.gz: shape \[32, 32, 15\], but the study's images "
        r"make a grid of \[32, 32, 16\] \(columns, rows, slices\)",
    ):
        load_dataset(root)

    too_high = labels.copy()
    too_high[0, 0, 0] = n_lesions + 1
    nib.save(nib.Nifti1Image(too_high, original.affine), mask_path)
    with pytest.raises(
        DatasetError, match=rf"holds the value {n_lesions + 1}, but truth.json has {n_lesions} findings"
    ):
        load_dataset(root)

    nib.save(nib.Nifti1Image(labels.astype(np.float32) + 0.5, original.affine), mask_path)
    with pytest.raises(DatasetError, match=r"voxel values must be integers"):
        load_dataset(root)

    nib.save(nib.Nifti1Image(labels[:, :, 0], original.affine), mask_path)
    with pytest.raises(DatasetError, match=r"must be a 3-D label map, got shape \[32, 32\]"):
        load_dataset(root)

    mask_path.write_bytes(b"not a nifti file")
    with pytest.raises(DatasetError, match=r"study s1: mask mask.nii.gz: not a readable NIfTI file"):
        load_dataset(root)


def test_the_cli_refuses_a_malformed_dataset_before_reading(tmp_path, mr_study, capsys):
    root = dataset_with(tmp_path, mr_study)
    write_truth(root, {"findings": [{"label": "lesion", "center_mm": [0, 0], "diameter_mm": "big"}]})
    # No server at this address: the dataset is checked first, so the error is the dataset's, not UNAVAILABLE.
    code = main(["eval", str(root), "--server", "127.0.0.1:9", "--model", "brain_lesion_mr"])
    assert code == 2
    err = capsys.readouterr().err
    assert 'error: study s1: truth.json findings[0].diameter_mm: must be a positive number (mm), got "big"' in err
