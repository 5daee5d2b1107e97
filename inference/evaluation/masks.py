"""Voxel truth and predicted masks of a segmentation study: the dataset's NIfTI label map, the server's DICOM SEG.

The truth is a label map in the study's voxel grid (``inference.evaluation.dataset``). The prediction is the DICOM
SEG the server returns for a DICOM study: each frame's pixels are put on the truth grid through the frame's
ImagePositionPatient, the plane orientation and the pixel spacing, so the comparison happens in patient
coordinates and does not trust that the SEG's frames come in any order. A frame that does not fall on the truth
grid (to 1e-3 voxel) means the mask was not written in the study's grid: that is an error, never resampled.

nibabel (NIfTI) and pydicom (DICOM) are imported where used: a dataset without masks needs neither.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from inference.evaluation.dataset import DatasetError

if TYPE_CHECKING:
    from inference.evaluation.dataset import Study

# LPS <-> RAS: negate the first two world axes (NIfTI affines are RAS). Its own inverse.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_GRID_TOLERANCE_VOXELS = 1e-3


@dataclass(frozen=True)
class TruthMask:
    """A study's truth: ``labels`` (X, Y, Z) integer, 0 background, n = findings[n - 1]; ``affine`` index -> LPS."""

    labels: np.ndarray
    affine: np.ndarray


def read_label_map(path: Path | None, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(integer label map, 4x4 affine voxel index -> LPS mm) of a NIfTI mask; DatasetError naming ``where``."""
    try:
        import nibabel as nib
    except ImportError as exc:  # pragma: no cover - the eval extra installs it
        raise RuntimeError("reading mask files needs nibabel: pip install 'radserve[eval]'") from exc
    if path is None:
        raise DatasetError(f"{where}: no mask file")
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as exc:  # nibabel raises several types for a damaged file
        raise DatasetError(f"{where}: not a readable NIfTI file ({type(exc).__name__})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DatasetError(f"{where}: must be a 3-D label map, got shape {list(data.shape)}")
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise DatasetError(f"{where}: voxel values must be integers (0 background, n = findings[n - 1])")
        data = data.astype(np.int64)
    if data.size and data.min() < 0:
        raise DatasetError(f"{where}: negative voxel value {int(data.min())} (0 background, n = findings[n - 1])")
    affine = LPS_TO_RAS @ np.asarray(image.affine, dtype=np.float64)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise DatasetError(f"{where}: the NIfTI affine is singular")
    return np.asarray(data), affine


def read_truth_mask(study: Study) -> TruthMask:
    labels, affine = read_label_map(study.mask, f"study {study.name}: mask")
    return TruthMask(labels, affine)


def study_grid_shape(study: Study) -> tuple[int, int, int] | None:
    """(columns, rows, slices) of the study's images as ``read`` decodes them, or None when that cannot be told
    from the headers alone (several series, mixed sizes)."""
    if study.nifti:
        import nibabel as nib

        shape = tuple(int(s) for s in nib.load(str(study.image_files[0])).shape)
        return (shape + (1,) * 3)[:3] if len(shape) <= 3 else None
    import pydicom

    sizes: set[tuple[int, int]] = set()
    series: set[str] = set()
    slices = 0
    for path in study.image_files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # not DICOM: the server will say so when it reads the study
            return None
        sizes.add((int(ds.get("Columns", 0)), int(ds.get("Rows", 0))))
        series.add(str(ds.get("SeriesInstanceUID", "")))
        slices += int(ds.get("NumberOfFrames", 1) or 1)
    if len(sizes) != 1 or len(series) != 1:
        return None
    ((columns, rows),) = sizes
    return columns, rows, slices


def seg_masks(seg: bytes, truth: TruthMask, labels: Iterable[str], where: str) -> dict[str, np.ndarray]:
    """label -> bool mask on the truth grid, from a DICOM SEG's segments, each assigned to a label by its
    SegmentLabel: one of ``labels`` as it is, else with a trailing number taken off ("lesion 2" is "lesion": one
    segment per finding). Every label of ``labels`` gets a mask, empty when no segment has it. Raises ValueError
    naming ``where``."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(seg))
    known = set(labels)
    segment_label: dict[int, str] = {}
    for item in ds.get("SegmentSequence", []):
        text = str(item.get("SegmentLabel", ""))
        base = re.sub(r" \d+$", "", text)
        segment_label[int(item.SegmentNumber)] = text if text in known else base
    masks = {label: np.zeros(truth.labels.shape, dtype=bool) for label in known | set(segment_label.values())}
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "PixelData" not in ds or n_frames == 0:
        return masks
    pixels = np.asarray(ds.pixel_array).reshape(n_frames, int(ds.Rows), int(ds.Columns))
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    inverse = np.linalg.inv(truth.affine)
    for n, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        segment = int(_group(frame, shared, "SegmentIdentificationSequence", where).ReferencedSegmentNumber)
        label = segment_label.get(segment)
        rows, columns = np.nonzero(pixels[n])
        if label not in masks or not len(rows):
            continue
        position = np.array(_group(frame, shared, "PlanePositionSequence", where).ImagePositionPatient, float)
        orientation = np.array(_group(frame, shared, "PlaneOrientationSequence", where).ImageOrientationPatient, float)
        spacing = np.array(_group(frame, shared, "PixelMeasuresSequence", where).PixelSpacing, float)
        # Pixel (r, c) lies at position + c * column spacing * row direction + r * row spacing * column direction.
        origin = inverse[:3, :3] @ position + inverse[:3, 3]
        step_column = inverse[:3, :3] @ (orientation[:3] * spacing[1])
        step_row = inverse[:3, :3] @ (orientation[3:] * spacing[0])
        index = origin[None, :] + columns[:, None] * step_column[None, :] + rows[:, None] * step_row[None, :]
        rounded = np.rint(index)
        if np.abs(index - rounded).max() > _GRID_TOLERANCE_VOXELS:
            raise ValueError(
                f"{where}: frame {n + 1} of the SEG does not lie on the mask's voxel grid (off by "
                f"{np.abs(index - rounded).max():.3f} voxel): the mask must be in the study's own grid"
            )
        ijk = rounded.astype(np.int64)
        inside = np.all((ijk >= 0) & (ijk < np.array(truth.labels.shape)), axis=1)
        if not inside.all():
            raise ValueError(f"{where}: frame {n + 1} of the SEG reaches outside the mask's grid")
        masks[label][ijk[:, 0], ijk[:, 1], ijk[:, 2]] = True
    return masks


def _group(frame: object, shared: object, name: str, where: str) -> object:
    for group in (frame, shared):
        if group is not None and name in group:  # type: ignore[operator]
            return getattr(group, name)[0]
    raise ValueError(f"{where}: the SEG has no {name} (a projection X-ray SEG has no plane to compare in 3-D)")
