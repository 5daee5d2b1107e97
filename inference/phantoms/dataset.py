"""`radserve phantoms make`: a labelled dataset of synthetic studies, in the format `radserve eval` reads.

``make_dataset(out, "MR", 40, seed=1)`` writes ``out/study_0000/`` ... each with the study's DICOM files (a CT or MR
series, or one DX image), its ``truth.json`` (the planted lesions: label, centroid, longest diameter, and for MR
each lesion's contrast) and, for MR, ``mask.nii.gz``: the planted lesions evaluated at the voxel centers of the
study's grid (value n = truth.json's findings[n - 1]). ``out/dataset.json`` records how the set was made.

Seeded and reproducible: study n is drawn from ``SeedSequence([seed, modality, n])``, independent of the count
and of the streams the training scripts draw from, and every UID is derived from the same key, so the same
arguments write the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from inference.evaluation.dataset import TruthLesion, write_truth
from inference.io.volume import LPS_TO_RAS
from inference.phantoms.base import Phantom
from inference.phantoms.brain_mr import lesion_labels, render_brain_mr, sample_brain_mr_params
from inference.phantoms.chest_ct import make_chest_ct
from inference.phantoms.chest_xray import make_chest_xray
from inference.phantoms.writers import write_dicom_series, write_xray_dicom

logger = logging.getLogger(__name__)

MODALITIES = ("CT", "MR", "DX")
_MODALITY_KEY = {"CT": 1, "MR": 2, "DX": 3}  # part of each study's seed, so CT and MR sets of one seed differ
MASK_FILE = "mask.nii.gz"
MANIFEST = "dataset.json"


def study_uid(seed: int, modality: str, index: int, role: str) -> str:
    """A UID derived from the study's key: "2.25." and 122 bits of SHA-256 (the form of inference/outputs/uids.py)."""
    digest = hashlib.sha256(json.dumps(["radserve/phantoms/v1", seed, modality, index, role]).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big') >> 6}"


def make_study(
    out: Path,
    modality: str,
    index: int,
    *,
    seed: int,
    shape: Sequence[int] | None = None,
    bias_amplitude: float | None = None,
) -> list[TruthLesion]:
    """Write study ``index`` of the set into ``out`` (created); returns its truth. ``bias_amplitude`` (MR) fixes the
    bias field's typical relative deviation instead of drawing it (5-20 %)."""
    modality = modality.upper()
    rng = np.random.default_rng(np.random.SeedSequence([seed, _MODALITY_KEY[modality], index]))
    out.mkdir(parents=True, exist_ok=False)
    uids = {role: study_uid(seed, modality, index, role) for role in ("study", "series", "frame_of_reference")}
    patient = {
        "patient_name": f"PHANTOM^{modality}",
        "patient_id": f"PHANTOM-{index:04d}",
        "accession_number": f"P{index:07d}",
    }
    mask = None
    if modality == "DX":
        phantom: Phantom = make_chest_xray(rng, **({"size_px": tuple(shape)} if shape else {}))
        write_xray_dicom(
            phantom,
            out / "image.dcm",
            study_instance_uid=uids["study"],
            series_instance_uid=uids["series"],
            sop_instance_uid=study_uid(seed, modality, index, "image"),
            **patient,
        )
        lesions = [TruthLesion(lesion.label, tuple(lesion.center_mm), lesion.diameter_mm) for lesion in phantom.lesions]
    else:
        if modality == "CT":
            phantom = make_chest_ct(rng, **({"shape": tuple(shape)} if shape else {}))
            attributes: list[dict[str, Any]] = [{} for _ in phantom.lesions]
        else:
            options: dict[str, Any] = {"bias_amplitude": bias_amplitude} if bias_amplitude is not None else {}
            params = sample_brain_mr_params(rng, **options, **({"shape": tuple(shape)} if shape else {}))
            phantom = render_brain_mr(params)
            attributes = [{"contrast": lesion.contrast} for lesion in params.lesions]
            mask = MASK_FILE
            _write_mask(out / MASK_FILE, lesion_labels(params), phantom.volume.affine)
        n_slices = phantom.volume.shape[2]
        write_dicom_series(
            phantom,
            out,
            study_instance_uid=uids["study"],
            series_instance_uid=uids["series"],
            frame_of_reference_uid=uids["frame_of_reference"],
            sop_instance_uids=[study_uid(seed, modality, index, f"slice {k}") for k in range(n_slices)],
            **patient,
        )
        lesions = [
            TruthLesion(
                lesion.label, tuple(lesion.center_mm), lesion.diameter_mm, {"volume_ml": lesion.volume_ml, **extra}
            )
            for lesion, extra in zip(phantom.lesions, attributes, strict=True)
        ]
    write_truth(out, lesions, mask=mask)
    return lesions


def make_dataset(
    out: Path,
    modality: str,
    count: int,
    *,
    seed: int = 0,
    shape: Sequence[int] | None = None,
    bias_amplitude: float | None = None,
    progress: Callable[[int, int, Path, list[TruthLesion]], None] | None = None,
) -> list[Path]:
    """Write ``count`` studies of ``modality`` (CT, MR or DX) into the new or empty folder ``out``."""
    modality = modality.upper()
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if bias_amplitude is not None and (modality != "MR" or not 0.0 <= bias_amplitude <= 1.0):
        raise ValueError(f"a bias amplitude is for MR, between 0 and 1, got {bias_amplitude} for {modality}")
    if shape is not None and len(shape) != (2 if modality == "DX" else 3):
        form = "ROWSxCOLUMNS" if modality == "DX" else "COLUMNSxROWSxSLICES"
        raise ValueError(f"a {modality} shape is {form}, got {'x'.join(map(str, shape))}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; the dataset goes into a new one")
    out.mkdir(parents=True, exist_ok=True)
    folders = []
    digits = max(4, len(str(count - 1)))
    for index in range(count):
        folder = out / f"study_{index:0{digits}d}"
        lesions = make_study(folder, modality, index, seed=seed, shape=shape, bias_amplitude=bias_amplitude)
        folders.append(folder)
        if progress is not None:
            progress(index + 1, count, folder, lesions)
    manifest = {
        "format": "radserve labelled studies (inference/evaluation/dataset.py)",
        "generator": "radserve phantoms make (inference/phantoms/dataset.py)",
        "modality": modality,
        "count": count,
        "seed": seed,
        "shape": list(shape) if shape else None,
        "bias_amplitude": bias_amplitude,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return folders


def _write_mask(path: Path, labels: np.ndarray, affine_lps: np.ndarray) -> None:
    import nibabel as nib

    affine_ras = LPS_TO_RAS @ affine_lps
    image = nib.Nifti1Image(labels.astype(np.uint8), affine_ras)
    image.set_sform(affine_ras, code=1)
    image.set_qform(affine_ras, code=1)
    image.header.set_xyzt_units(xyz="mm")
    nib.save(image, path)


def main(args: argparse.Namespace) -> int:
    try:
        shape = None if args.shape is None else tuple(int(v) for v in args.shape.lower().split("x"))
    except ValueError:
        print(f"error: --shape must be sizes joined by x, e.g. 128x128x40, got {args.shape!r}", file=sys.stderr)
        return 2

    def progress(done: int, total: int, folder: Path, lesions: list[TruthLesion]) -> None:
        sizes = ", ".join(f"{lesion.diameter_mm:.1f}" for lesion in lesions) or "none"
        print(f"[{done}/{total}] {folder.name}: lesions (mm) {sizes}", file=sys.stderr)

    try:
        make_dataset(
            args.out,
            args.modality,
            args.count,
            seed=args.seed,
            shape=shape,
            bias_amplitude=args.bias_amplitude,
            progress=progress,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.count} {args.modality} studies to {args.out}")
    return 0
