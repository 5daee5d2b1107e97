"""Input limits: how much a single read may upload, inflate, decode and have built for it; plausible geometry.

Every check runs before the work it guards: the file count and byte total before parsing, the inflated bytes
while inflating, the voxel count and the world extent before decoding or allocating anything, the preprocessed
grid's voxel count before it is built (``inference.api.admission``). Each raises :class:`LimitExceededError`
(RESOURCE_EXHAUSTED) whose message quotes both the offending value and the configured limit.

Plausible ranges (InvalidInputError, INVALID_ARGUMENT, outside them; README "Security, limits and observability"):
the distance between neighbouring voxel centers along any axis (PixelSpacing, the slice step, NIfTI zooms, a raw
array's spacing or affine columns) lies in :data:`SPACING_RANGE_MM`; patient coordinates (ImagePositionPatient,
an affine's origin) within +-:data:`MAX_COORDINATE_MM`; the three voxel axes are far from parallel (the
column-normalised direction matrix has ``|det| >= MIN_AXES_DET``; DICOM's own orientation rules are stricter);
RescaleSlope and RescaleIntercept (NIfTI scl_slope and scl_inter) within +-:data:`MAX_RESCALE`, the slope nonzero,
and voxel values after rescaling within +-:data:`MAX_ABS_VOXEL` and finite. These bounds keep every later
computation (resampling grids, box coding, normalisation in float32) finite; they are far wider than any scanner's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

import numpy as np

from inference.errors import InvalidInputError, LimitExceededError

GIB = 1024**3
MIB = 1024**2

SPACING_RANGE_MM = (1e-3, 100.0)  # between neighbouring voxel centers, any axis
MAX_COORDINATE_MM = 1e5  # |x|, |y|, |z| of a position in the patient coordinate system (100 m)
MIN_AXES_DET = 1e-2  # |det| of the voxel axes' unit directions: 1 for orthogonal axes, 0 for parallel ones
MAX_RESCALE = 1e6  # |RescaleSlope|, |RescaleIntercept|
MAX_ABS_VOXEL = 1e12  # |voxel value| after rescaling: its square summed over any volume stays finite in float32


@dataclass(frozen=True)
class InputLimits:
    """Per-request limits on uploads, checked by every reader before it decodes anything."""

    max_voxels: int = 512 * 512 * 1200  # voxels in the decoded volume (about 1.2 GB as float32)
    max_request_bytes: int = 2 * GIB  # all uploaded bytes of one request, compressed as sent
    max_files: int = 4000  # files (DICOM instances) in one request
    max_chunk_bytes: int = 4 * MIB  # one streamed chunk
    max_dimension: int = 8192  # voxels along any one axis
    # Bytes inflated from compressed containers (deflated DICOM data sets, .nii.gz) per read, all files together.
    max_inflated_bytes: int = 2 * GIB
    # The study's field of view along any axis, in mm (a whole-body CT is about 2000 mm long).
    max_extent_mm: float = 3000.0
    # Voxels of the grid a model's preprocessing resamples the study onto, checked before it is built (a whole-body
    # CT at 1.5 mm is 333 x 333 x 1333 = 148 M voxels).
    max_grid_voxels: int = 512 * 512 * 600
    # How many times more voxels the resampled grid may have than the study (before padding up to the model's ROI):
    # 64 x 15 mm voxels resampled to 1.5 mm are 1000 times as many voxels and no more information. A thick-slice CT
    # or MR resampled to a model's isotropic grid is 1-10 times.
    max_upsampling: int = 64

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "max_extent_mm":
                if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
                    raise ValueError(f"InputLimits.{f.name} must be a positive number, got {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"InputLimits.{f.name} must be a positive integer, got {value!r}")
        if self.max_chunk_bytes > self.max_request_bytes:
            raise ValueError(
                f"InputLimits.max_chunk_bytes ({self.max_chunk_bytes}) must not exceed "
                f"max_request_bytes ({self.max_request_bytes})"
            )
        if self.max_dimension > self.max_voxels:
            raise ValueError(
                f"InputLimits.max_dimension ({self.max_dimension}) must not exceed max_voxels ({self.max_voxels})"
            )

    def check_files(self, n_files: int) -> None:
        if n_files > self.max_files:
            raise LimitExceededError(f"request has {n_files} files; the limit is {self.max_files}")

    def check_request_bytes(self, n_bytes: int) -> None:
        if n_bytes > self.max_request_bytes:
            raise LimitExceededError(f"request has {n_bytes} bytes; the limit is {self.max_request_bytes} bytes")

    def check_chunk_bytes(self, n_bytes: int) -> None:
        if n_bytes > self.max_chunk_bytes:
            raise LimitExceededError(f"chunk has {n_bytes} bytes; the limit is {self.max_chunk_bytes} bytes")

    def check_shape(self, shape: Iterable[int], what: str = "volume") -> None:
        """Check each axis against ``max_dimension`` and the product against ``max_voxels``.

        Uses Python integers, so a header claiming 2**31 or more voxels cannot overflow the check.
        ``what`` names the thing being checked in the message, e.g. ``"NIfTI image"``.
        """
        dims = tuple(int(s) for s in shape)
        for axis, size in enumerate(dims):
            if size > self.max_dimension:
                raise LimitExceededError(
                    f"{what} has {size} voxels along axis {axis} (shape {dims}); "
                    f"the limit is {self.max_dimension} per axis"
                )
        n_voxels = math.prod(dims)
        if n_voxels > self.max_voxels:
            raise LimitExceededError(
                f"{what} has {n_voxels} voxels (shape {dims}); the limit is {self.max_voxels} voxels"
            )

    def check_inflated_bytes(self, n_bytes: int, what: str) -> None:
        if n_bytes > self.max_inflated_bytes:
            raise LimitExceededError(
                f"{what} inflate to more than {self.max_inflated_bytes} bytes, the max_inflated_bytes limit per read"
            )

    def check_grid(self, shape: Iterable[int], what: str, *, resampled_voxels: int = 0, input_voxels: int = 0) -> None:
        """The preprocessed grid a model would build (``what`` names the model), before it is built: its voxels
        (``shape``, padded) against ``max_grid_voxels``, and the resampled voxels (before padding) per input voxel
        against ``max_upsampling``."""
        dims = tuple(int(s) for s in shape)
        if input_voxels and resampled_voxels > self.max_upsampling * input_voxels:
            raise LimitExceededError(
                f"{what} would resample the study's {input_voxels} voxels onto {resampled_voxels} "
                f"({resampled_voxels / input_voxels:.0f} times as many; the max_upsampling limit is "
                f"{self.max_upsampling}): the study's voxels are far coarser than the model reads"
            )
        n_voxels = math.prod(dims)
        if n_voxels > self.max_grid_voxels:
            raise LimitExceededError(
                f"{what} would resample the study onto {' x '.join(map(str, dims))} = {n_voxels} voxels; the "
                f"max_grid_voxels limit is {self.max_grid_voxels}"
            )


class InflateBudget:
    """The inflated bytes left to one read (:attr:`InputLimits.max_inflated_bytes`), shared by its files."""

    def __init__(self, limits: InputLimits) -> None:
        self.limits = limits
        self.used = 0

    @property
    def left(self) -> int:
        return max(self.limits.max_inflated_bytes - self.used, 0)

    def spend(self, n_bytes: int, what: str) -> None:
        self.used += n_bytes
        self.limits.check_inflated_bytes(self.used, what)


def check_geometry(affine: np.ndarray, shape: Sequence[int], what: str, limits: InputLimits) -> None:
    """The plausible ranges of the module docstring for a voxel -> LPS affine of a volume of ``shape``, and its
    world extent against ``limits.max_extent_mm``. Raises InvalidInputError or LimitExceededError."""
    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise InvalidInputError(f"{what}: the geometry is not finite")
    axes = affine[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    low, high = SPACING_RANGE_MM
    for axis, step in enumerate(spacing):
        if not low <= step <= high:
            raise InvalidInputError(
                f"{what}: voxel spacing along axis {axis} is {step:.4g} mm, outside the plausible range "
                f"{low:g}-{high:g} mm"
            )
    if abs(np.linalg.det(axes / spacing)) < MIN_AXES_DET:
        raise InvalidInputError(f"{what}: the voxel axes are (nearly) parallel; the geometry is degenerate")
    corners = (
        np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
        @ affine.T
    )
    worst = float(np.max(np.abs(corners[:, :3])))
    if worst > MAX_COORDINATE_MM:
        raise InvalidInputError(
            f"{what}: voxel positions reach {worst:.4g} mm from the origin, outside the plausible "
            f"+-{MAX_COORDINATE_MM:g} mm"
        )
    extent = spacing * np.maximum(np.asarray(shape, dtype=np.float64) - 1, 0)
    for axis, size in enumerate(extent):
        if size > limits.max_extent_mm:
            raise LimitExceededError(
                f"{what}: the field of view is {size:.0f} mm along axis {axis}; the max_extent_mm limit is "
                f"{limits.max_extent_mm:g} mm"
            )


def check_rescale(slope: float, intercept: float, what: str) -> None:
    """RescaleSlope / RescaleIntercept (or NIfTI's scl_slope / scl_inter) in their plausible ranges."""
    if not (math.isfinite(slope) and slope != 0 and abs(slope) <= MAX_RESCALE):
        raise InvalidInputError(
            f"{what} slope {slope:.4g} is outside the plausible range (nonzero, within +-{MAX_RESCALE:g})"
        )
    if not (math.isfinite(intercept) and abs(intercept) <= MAX_RESCALE):
        raise InvalidInputError(f"{what} intercept {intercept:.4g} is outside the plausible range +-{MAX_RESCALE:g}")


def check_voxel_values(voxels: np.ndarray, what: str) -> None:
    """Refuse NaN, infinite and implausibly large voxel values (two reductions, no temporary array)."""
    if voxels.size == 0:
        return
    low, high = float(voxels.min()), float(voxels.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        n_bad = int(voxels.size - np.count_nonzero(np.isfinite(voxels)))
        raise InvalidInputError(f"{what} has {n_bad} NaN or infinite voxel values; voxels must be finite numbers")
    if max(abs(low), abs(high)) > MAX_ABS_VOXEL:
        raise InvalidInputError(
            f"{what} has voxel values from {low:.4g} to {high:.4g}, outside the plausible +-{MAX_ABS_VOXEL:g}"
        )


DEFAULT_LIMITS = InputLimits()
