"""Frames in patient space: positions, orientations and spacings -> the stack's affine and slice order.

Part of :mod:`inference.io.dicom`, whose docstring states the reading policy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset

from inference.errors import InvalidInputError, UnsupportedError
from inference.io.dicom.elements import (
    _fmt,
    _get,
    _orientation,
    _pixel_spacing,
    _position,
    _rescale,
    _sop_name,
    _thickness,
)

if TYPE_CHECKING:
    from inference.io.dicom.headers import _Header
    from inference.io.dicom.pixel_format import _PixelFormat


ORIENTATION_ATOL = 1e-3  # per IOP component, between images of one series
PIXEL_SPACING_RTOL = 1e-3
STEP_RTOL = 0.01  # slice steps agree with the median step within 1% ...
STEP_ATOL_MM = 0.01  # ... or 0.01 mm, whichever is larger
DUPLICATE_ATOL_MM = 0.01
TILT_MAX_DEG = 0.1  # stack axis vs slice normal ...
LATERAL_ATOL_MM = 0.02  # ... or this much in-plane drift over the whole stack, whichever is larger
DEFAULT_STEP_MM = 1.0


@dataclass(frozen=True)
class _Frame:
    """Geometry and rescale of one 2-D image: a single-frame instance or one frame of a multi-frame one."""

    file_index: int
    frame_number: int | None  # 1-based within an enhanced multi-frame instance
    position: tuple[float, float, float] | None  # ImagePositionPatient
    orientation: tuple[float, ...] | None  # ImageOrientationPatient, directions normalised
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    spacing_element: str
    thickness_mm: float | None
    slope: float
    intercept: float

    @property
    def where(self) -> str:
        if self.frame_number is None:
            return f"file {self.file_index}"
        return f"file {self.file_index} frame {self.frame_number}"


def _frames_of(h: _Header, fmt: _PixelFormat) -> list[_Frame]:
    ds, where = h.ds, h.where
    if fmt.enhanced:
        return _enhanced_frames(h, fmt)
    if fmt.frames > 1:
        raise UnsupportedError(
            f"{where}: multi-frame {_sop_name(h.sop_class_uid)} with {fmt.frames} frames has no per-frame "
            "functional groups; only enhanced multi-frame images are read"
        )
    position = _position(ds, where, "ImagePositionPatient")
    spacing, element = _pixel_spacing(ds, where, "", allow_imager=position is None)
    slope, intercept = _rescale(ds, where, "")
    return [
        _Frame(
            file_index=h.index,
            frame_number=None,
            position=position,
            orientation=_orientation(ds, where, "ImageOrientationPatient"),
            pixel_spacing=spacing,
            spacing_element=element,
            thickness_mm=_thickness(ds, where, "SliceThickness"),
            slope=slope,
            intercept=intercept,
        )
    ]


def _enhanced_frames(h: _Header, fmt: _PixelFormat) -> list[_Frame]:
    ds = h.ds
    try:
        per_frame = ds.PerFrameFunctionalGroupsSequence
        shared_seq = ds.get("SharedFunctionalGroupsSequence")
    except Exception as exc:
        raise InvalidInputError(f"{h.where}: functional group sequences could not be parsed") from exc
    shared = shared_seq[0] if shared_seq else Dataset()
    if len(per_frame) != fmt.frames:
        raise InvalidInputError(
            f"{h.where}: PerFrameFunctionalGroupsSequence has {len(per_frame)} items for {fmt.frames} frames"
        )
    frames = []
    for number, item in enumerate(per_frame, start=1):
        where = f"{h.where} frame {number}"

        def macro(sequence: str, item: Dataset = item, where: str = where) -> Dataset:
            for group in (item, shared):
                seq = _get(group, sequence, where, sequence)
                if seq:
                    if len(seq) != 1:
                        raise InvalidInputError(f"{where}: {sequence} must have exactly one item, has {len(seq)}")
                    return seq[0]
            return Dataset()

        position = _position(macro("PlanePositionSequence"), where, "PlanePositionSequence > ImagePositionPatient")
        measures = macro("PixelMeasuresSequence")
        spacing, element = _pixel_spacing(measures, where, "PixelMeasuresSequence > ", allow_imager=False)
        slope, intercept = _rescale(
            macro("PixelValueTransformationSequence"), where, "PixelValueTransformationSequence > "
        )
        frames.append(
            _Frame(
                file_index=h.index,
                frame_number=number,
                position=position,
                orientation=_orientation(
                    macro("PlaneOrientationSequence"), where, "PlaneOrientationSequence > ImageOrientationPatient"
                ),
                pixel_spacing=spacing,
                spacing_element=element,
                thickness_mm=_thickness(measures, where, "PixelMeasuresSequence > SliceThickness"),
                slope=slope,
                intercept=intercept,
            )
        )
    return frames


def _stack_geometry(frames: list[_Frame], label: str) -> tuple[np.ndarray, list[int]]:
    """The voxel -> LPS affine of the sorted stack, and the frame indices in slice order."""
    if len(frames) == 1:
        return _single_image_affine(frames[0]), [0]
    ref = frames[0]
    for f in frames:
        for name, value in (("ImagePositionPatient", f.position), ("ImageOrientationPatient", f.orientation)):
            if value is None:
                raise InvalidInputError(
                    f"{f.where}: {name} missing; it is needed to stack the {len(frames)} images of {label}"
                )
    for f in frames[1:]:
        deviation = float(np.max(np.abs(np.subtract(f.orientation, ref.orientation))))
        if deviation > ORIENTATION_ATOL:
            raise InvalidInputError(
                f"ImageOrientationPatient differs between {ref.where} and {f.where} in {label} (by up to "
                f"{deviation:.3g}; tolerance {ORIENTATION_ATOL}): a series must be one stack of parallel slices"
            )
        if not np.allclose(f.pixel_spacing, ref.pixel_spacing, rtol=PIXEL_SPACING_RTOL, atol=0.0):
            raise InvalidInputError(
                f"PixelSpacing differs ({_fmt(ref.pixel_spacing)} vs {_fmt(f.pixel_spacing)} mm) between "
                f"{ref.where} and {f.where} in {label}"
            )
    row_dir, col_dir, normal = _directions(ref.orientation)
    positions = np.array([f.position for f in frames], dtype=np.float64)
    along = positions @ normal
    order = [int(i) for i in np.argsort(along, kind="stable")]
    along_sorted = along[order]
    steps = np.diff(along_sorted)

    duplicates = np.flatnonzero(steps < DUPLICATE_ATOL_MM)
    if duplicates.size:
        k = int(duplicates[0])
        raise InvalidInputError(
            f"duplicate slice positions in {label}: {frames[order[k]].where} and {frames[order[k + 1]].where} are "
            f"both at {along_sorted[k]:.2f} mm along the slice normal ({duplicates.size} duplicates; multi-echo, "
            "multi-phase or multi-stack series are not read)"
        )
    usual = float(np.sort(steps)[(len(steps) - 1) // 2])  # lower median: a step that occurs
    tol = max(STEP_ATOL_MM, STEP_RTOL * usual)
    gaps: list[tuple[int, int]] = []
    for k, step in enumerate(steps):
        if abs(step - usual) <= tol:
            continue
        multiple = round(step / usual)
        if multiple >= 2 and abs(step - multiple * usual) <= multiple * tol:
            gaps.append((k, multiple))
            continue
        raise InvalidInputError(
            f"slice spacing varies ({usual:.4g} mm vs {step:.4g} mm) in {label}, between "
            f"{frames[order[k]].where} and {frames[order[k + 1]].where}; steps must agree within "
            f"{STEP_RTOL:.0%} or {STEP_ATOL_MM} mm"
        )
    if gaps:
        k, multiple = gaps[0]
        missing = sum(m - 1 for _, m in gaps)
        raise InvalidInputError(
            f"{missing} slice{'s' if missing != 1 else ''} missing in {label}: the gap between "
            f"{frames[order[k]].where} and {frames[order[k + 1]].where} is {steps[k]:.4g} mm, {multiple} times the "
            f"usual {usual:.4g} mm step" + (f" ({len(gaps)} such gaps)" if len(gaps) > 1 else "")
        )

    total = positions[order[-1]] - positions[order[0]]
    axial = float(total @ normal)
    lateral = float(np.linalg.norm(total - axial * normal))
    lateral_tol = max(LATERAL_ATOL_MM, math.tan(math.radians(TILT_MAX_DEG)) * axial)
    if lateral > lateral_tol:
        raise UnsupportedError(
            f"{label} is a tilted or sheared stack: slices advance {math.degrees(math.atan2(lateral, axial)):.2f} "
            f"degrees off their normal (gantry tilt?); tilted stacks are not resampled (tolerance {TILT_MAX_DEG} "
            "degrees)"
        )
    step = total / (len(frames) - 1)
    residual = positions[order] - (positions[order[0]] + np.outer(np.arange(len(frames)), step))
    residual -= np.outer(residual @ normal, normal)  # along the normal the spacing check above applies
    off_axis = np.linalg.norm(residual, axis=1)
    worst = int(np.argmax(off_axis))
    if off_axis[worst] > lateral_tol:
        raise InvalidInputError(
            f"slice positions in {label} do not lie on one axis: {frames[order[worst]].where} is "
            f"{off_axis[worst]:.2f} mm off it in the slice plane"
        )

    row_spacing, col_spacing = ref.pixel_spacing
    affine = np.eye(4)
    affine[:3, 0] = row_dir * col_spacing
    affine[:3, 1] = col_dir * row_spacing
    affine[:3, 2] = step
    affine[:3, 3] = positions[order[0]]
    return affine, order


def _single_image_affine(f: _Frame) -> np.ndarray:
    orientation = f.orientation if f.orientation is not None else (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    row_dir, col_dir, normal = _directions(orientation)
    step = DEFAULT_STEP_MM
    if f.position is not None and f.thickness_mm is not None:
        step = f.thickness_mm
    row_spacing, col_spacing = f.pixel_spacing
    affine = np.eye(4)
    affine[:3, 0] = row_dir * col_spacing
    affine[:3, 1] = col_dir * row_spacing
    affine[:3, 2] = normal * step
    affine[:3, 3] = f.position if f.position is not None else (0.0, 0.0, 0.0)
    return affine


def _directions(orientation: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    row_dir = np.asarray(orientation[:3], dtype=np.float64)
    col_dir = np.asarray(orientation[3:], dtype=np.float64)
    normal = np.cross(row_dir, col_dir)
    return row_dir, col_dir, normal / np.linalg.norm(normal)
