"""The labelled-study format: one folder per study, its image files and a ``truth.json``.

A dataset is a directory; every subdirectory not starting with ``.`` is a study (files at the top, such as the
``dataset.json`` that ``radserve phantoms make`` writes, are not studies). A study folder holds:

* its images, as ``radserve read`` takes them: DICOM files (any names, subfolders allowed) or one NIfTI file
  (``.nii`` / ``.nii.gz``);
* ``truth.json``::

      {"findings": [{"label": "nodule", "center_mm": [x, y, z], "diameter_mm": 8.5}, ...],
       "mask": "mask.nii.gz",     (optional) the truth voxels of a segmentation study
       "modality": "MR"}          (optional) the modality of a NIfTI study, as `read --modality`

  ``center_mm`` is in DICOM patient coordinates (LPS, mm), or ``[x, y]`` on the image plane for projection X-ray
  (DESIGN.md); ``diameter_mm`` is the lesion's longest diameter. Other keys in a finding (e.g. ``volume_ml``) are
  allowed and kept in ``TruthLesion.attributes``.
* the mask, when ``truth.json`` names one: a NIfTI label map in the study's own voxel grid (the grid ``read`` decodes:
  for a DICOM series, i = column, j = row, k = slice in slice order, with the series' geometry as the NIfTI affine,
  RAS as NIfTI requires), integer voxel values: 0 background, n the voxels of ``findings[n - 1]``.

:func:`load_dataset` checks all of it before anything is read and raises :class:`DatasetError` naming the study
folder and the field at fault.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRUTH_FILE = "truth.json"
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class DatasetError(ValueError):
    """A malformed dataset: the message names the study folder and the field at fault."""


@dataclass(frozen=True)
class TruthLesion:
    """One labelled lesion: ``center_mm`` LPS [x, y, z] (or image-plane [x, y]), longest ``diameter_mm``."""

    label: str
    center_mm: tuple[float, ...]
    diameter_mm: float
    attributes: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "center_mm": list(self.center_mm),
            "diameter_mm": self.diameter_mm,
            **self.attributes,
        }


@dataclass(frozen=True)
class Study:
    """A study folder of a dataset. ``name`` is the folder's path relative to the dataset root."""

    name: str
    path: Path
    lesions: tuple[TruthLesion, ...]
    image_files: tuple[Path, ...]
    nifti: bool  # one NIfTI file, else DICOM files
    modality: str = ""  # truth.json's "modality" (for NIfTI), else ""
    mask: Path | None = None

    @property
    def planar(self) -> bool | None:
        """True for [x, y] centers (projection X-ray), False for [x, y, z], None when the study has no lesion."""
        return None if not self.lesions else len(self.lesions[0].center_mm) == 2


@dataclass(frozen=True)
class Dataset:
    root: Path
    studies: tuple[Study, ...]

    def __len__(self) -> int:
        return len(self.studies)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(sorted({lesion.label for study in self.studies for lesion in study.lesions}))


def load_dataset(root: Path | str) -> Dataset:
    """Every study folder under ``root``, checked (see the module docstring); raises DatasetError."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset {root}: not a directory")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DatasetError(f"dataset {root}: no study folders (one folder per study, each with a {TRUTH_FILE})")
    studies = tuple(load_study(folder, name=folder.name) for folder in folders)
    kinds = {study.planar for study in studies} - {None}
    if len(kinds) > 1:
        planar = next(s for s in studies if s.planar)
        spatial = next(s for s in studies if s.planar is False)
        raise DatasetError(
            f"dataset {root}: study {planar.name} has [x, y] centers (projection X-ray) and study {spatial.name} "
            "[x, y, z] centers; a dataset holds one kind"
        )
    return Dataset(root, studies)


def load_study(folder: Path, *, name: str | None = None) -> Study:
    """One study folder, checked; raises DatasetError naming it."""
    name = name or folder.name
    truth_path = folder / TRUTH_FILE
    if not truth_path.is_file():
        raise DatasetError(f"study {name}: missing {TRUTH_FILE}")
    try:
        truth = json.loads(truth_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DatasetError(f"study {name}: {TRUTH_FILE} is not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"study {name}: {TRUTH_FILE} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    if not isinstance(truth, dict):
        raise DatasetError(f"study {name}: {TRUTH_FILE} must hold a JSON object, got {_kind(truth)}")
    if "findings" not in truth:
        raise DatasetError(f"study {name}: {TRUTH_FILE} has no 'findings' (a list, empty for a study without lesions)")
    raw = truth["findings"]
    if not isinstance(raw, list):
        raise DatasetError(f"study {name}: {TRUTH_FILE} 'findings' must be a list, got {_kind(raw)}")
    lesions = tuple(_lesion(item, f"study {name}: {TRUTH_FILE} findings[{n}]") for n, item in enumerate(raw))
    dims = {len(lesion.center_mm) for lesion in lesions}
    if len(dims) > 1:
        raise DatasetError(
            f"study {name}: {TRUTH_FILE} mixes [x, y] and [x, y, z] center_mm; a study is projection X-ray or not"
        )

    modality = truth.get("modality", "")
    if not isinstance(modality, str):
        raise DatasetError(
            f"study {name}: {TRUTH_FILE} 'modality' must be a string such as \"MR\", got {_kind(modality)}"
        )

    mask = None
    if truth.get("mask") is not None:
        mask = _mask_path(folder, truth["mask"], f"study {name}: {TRUTH_FILE} 'mask'")
        if dims == {2}:
            raise DatasetError(f"study {name}: {TRUTH_FILE} 'mask' is for 3-D studies; its findings are [x, y]")

    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p != truth_path
        and (mask is None or p.resolve() != mask.resolve())
    )
    if not files:
        raise DatasetError(f"study {name}: no image files beside {TRUTH_FILE}")
    niftis = [p for p in files if p.name.lower().endswith(NIFTI_SUFFIXES)]
    if niftis and len(files) > 1:
        raise DatasetError(
            f"study {name}: a NIfTI study is one .nii or .nii.gz file; found {len(niftis)} NIfTI and "
            f"{len(files) - len(niftis)} other files (a mask must be named by {TRUTH_FILE} 'mask')"
        )
    study = Study(name, folder, lesions, tuple(files), bool(niftis), modality.upper(), mask)
    if mask is not None:
        check_mask(study)
    return study


def write_truth(
    folder: Path,
    lesions: Iterable[TruthLesion],
    *,
    mask: str | None = None,
    modality: str | None = None,
) -> Path:
    """Write ``folder/truth.json`` (the format :func:`load_study` reads)."""
    body: dict[str, Any] = {"findings": [lesion.to_json() for lesion in lesions]}
    if mask is not None:
        body["mask"] = mask
    if modality:
        body["modality"] = modality
    path = Path(folder) / TRUTH_FILE
    path.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    return path


def check_mask(study: Study) -> None:
    """The mask is a 3-D integer label map whose values name findings, in the grid of the study's images."""
    from inference.evaluation.masks import read_label_map, study_grid_shape

    where = f"study {study.name}: mask {study.mask.name if study.mask else ''}"
    labels, _ = read_label_map(study.mask, where)
    top = int(labels.max()) if labels.size else 0
    if top > len(study.lesions):
        raise DatasetError(
            f"{where}: holds the value {top}, but {TRUTH_FILE} has {len(study.lesions)} findings "
            "(value n marks the voxels of findings[n - 1])"
        )
    expected = study_grid_shape(study)
    if expected is not None and tuple(labels.shape) != expected:
        raise DatasetError(
            f"{where}: shape {list(labels.shape)}, but the study's images make a grid of {list(expected)} "
            "(columns, rows, slices): the mask must be in the study's own voxel grid"
        )


def _lesion(item: object, where: str) -> TruthLesion:
    if not isinstance(item, dict):
        raise DatasetError(f"{where}: must be an object with label, center_mm and diameter_mm, got {_kind(item)}")
    for key in ("label", "center_mm", "diameter_mm"):
        if key not in item:
            raise DatasetError(f"{where}: missing '{key}'")
    label = item["label"]
    if not isinstance(label, str) or not label.strip():
        raise DatasetError(f"{where}.label: must be a non-empty string, got {_kind(label)}")
    center = item["center_mm"]
    if not isinstance(center, list) or len(center) not in (2, 3) or not all(_finite(v) for v in center):
        raise DatasetError(
            f"{where}.center_mm: must be [x, y, z] (LPS mm) or [x, y] (image plane mm) of finite numbers, "
            f"got {_short(center)}"
        )
    diameter = item["diameter_mm"]
    if not _finite(diameter) or diameter <= 0:
        raise DatasetError(f"{where}.diameter_mm: must be a positive number (mm), got {_short(diameter)}")
    attributes = {k: v for k, v in item.items() if k not in ("label", "center_mm", "diameter_mm")}
    return TruthLesion(label, tuple(float(v) for v in center), float(diameter), attributes)


def _mask_path(folder: Path, value: object, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise DatasetError(f"{where}: must be the mask's file name, got {_kind(value)}")
    path = folder / value
    if Path(value).is_absolute() or ".." in Path(value).parts:
        raise DatasetError(f"{where}: must name a file inside the study folder, got {value!r}")
    if not value.lower().endswith(NIFTI_SUFFIXES):
        raise DatasetError(f"{where}: must be a NIfTI file (.nii or .nii.gz), got {value!r}")
    if not path.is_file():
        raise DatasetError(f"{where}: {value} does not exist in the study folder")
    return path


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
