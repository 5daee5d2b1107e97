"""The Finding: one suspicious region for a radiologist to review, in patient coordinates; and its voxels."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Finding:
    label: str
    score: float
    # 3-D studies: LPS mm. Projection X-ray: [x, y] mm on the image plane (DESIGN.md contract).
    center_mm: tuple[float, ...]
    bbox_mm: tuple[float, ...]  # [x0, y0, z0, x1, y1, z1] (or [x0, y0, x1, y1] on an X-ray image plane)
    diameter_mm: float  # longest diameter
    volume_ml: float | None = None
    sop_instance_uid: str | None = None  # the source image nearest to center_mm (DICOM input only)
    center_voxel: tuple[float, ...] | None = None  # [i, j, k] in the input volume (X-ray: center_px [col, row])

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["center_mm"] = [round(float(v), 3) for v in self.center_mm]
        data["bbox_mm"] = [round(float(v), 3) for v in self.bbox_mm]
        data["score"] = round(float(self.score), 4)
        data["diameter_mm"] = round(float(self.diameter_mm), 3)
        if self.center_voxel is not None:
            data["center_voxel"] = [round(float(v), 2) for v in self.center_voxel]
        if self.volume_ml is not None:
            data["volume_ml"] = round(float(self.volume_ml), 4)
        return {k: v for k, v in data.items() if v is not None}


@dataclass(frozen=True)
class FindingMask:
    """One finding's voxels on the input volume's grid: a boolean block and the index of its first voxel.

    ``mask`` is indexed like ``Volume.voxels`` ([column, row, slice]); voxel ``(i, j, k)`` of the block is voxel
    ``offset + (i, j, k)`` of the volume. A block rather than a whole-volume array: a 512x512x300 study with ten
    findings would otherwise hold ten 79 MB masks.
    """

    offset: tuple[int, int, int]
    mask: np.ndarray  # bool (X, Y, Z) block

    def __post_init__(self) -> None:
        if not isinstance(self.mask, np.ndarray) or self.mask.ndim != 3 or self.mask.dtype != np.bool_:
            raise ValueError(f"FindingMask.mask must be a 3-D bool array, got {getattr(self.mask, 'shape', None)}")
        if len(self.offset) != 3 or any(int(o) != o or o < 0 for o in self.offset):
            raise ValueError(f"FindingMask.offset must be 3 non-negative integers, got {self.offset!r}")

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """Where the block lies in the volume's voxel array."""
        return tuple(slice(int(o), int(o) + n) for o, n in zip(self.offset, self.mask.shape, strict=True))  # type: ignore[return-value]

    @property
    def voxel_count(self) -> int:
        return int(np.count_nonzero(self.mask))

    def fits(self, shape: tuple[int, int, int]) -> bool:
        """Whether the block lies inside a volume of ``shape``."""
        return all(int(o) + n <= s for o, n, s in zip(self.offset, self.mask.shape, shape, strict=True))

    def dense(self, shape: tuple[int, int, int]) -> np.ndarray:
        """The mask on a whole volume of ``shape`` (a new array)."""
        if not self.fits(shape):
            raise ValueError(f"a mask block at {self.offset} of shape {self.mask.shape} does not fit a volume {shape}")
        out = np.zeros(shape, dtype=bool)
        out[self.slices] = self.mask
        return out
