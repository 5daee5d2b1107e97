"""Progressive geometry: where each slice of a DICOM series goes, before the series is complete.

A progressive read (:mod:`inference.api.progressive`) decodes each uploaded file as soon as it has arrived
(:func:`inference.io.dicom.read_dicom_file`: a one-slice Volume). :class:`SliceAssembly` takes those slices in any
order and, once the grid of the finished series is fixed, says where each one goes. The grid is fixed by:

* the number of slices to expect (``ReadHeader.expected_instances``: without it nothing is placed before the end);
* the orientation, pixel spacing and columns x rows of the first image;
* the step along the slice normal, from two images' positions and InstanceNumbers: position = p_a + (n - n_a) x
  step, with the instances numbered 1..expected (the DICOM habit). That is a hypothesis: the series' own reader
  checks it when the upload ends (:meth:`SliceAssembly.agrees_with`) and the read falls back to the whole-study
  path when it is wrong. Slices are placed by their position, never by their number.

A slice that breaks the hypothesis (another size, orientation or in-plane position, a position off the grid, a
duplicate, no InstanceNumber) stops placement for the read (``broken`` says why, for the log); the usual series
checks and their statuses are the reader's, at the end, exactly as for a whole-study read. Nothing here raises
on bad input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inference.io.volume import Volume

__all__ = ["ExpectedGrid", "SliceAssembly"]

DIRECTION_ATOL = 1e-3  # in-plane affine columns (mm per voxel) of the images of one series
LATERAL_ATOL_MM = 0.05  # in-plane drift of a slice's position from the first image's
ON_GRID_RTOL = 0.01  # a position within 1% of a step of a grid slice
AFFINE_ATOL_MM = 1e-3  # the reader's affine and the expected grid's, element by element
MIN_STEP_MM = 0.01


@dataclass(frozen=True)
class ExpectedGrid:
    """The input grid the finished series will have: (columns, rows, slices) and voxel index -> LPS mm."""

    shape: tuple[int, int, int]
    affine: np.ndarray


@dataclass
class _Slice:
    file_index: int
    position_mm: float  # along the first image's slice normal
    instance_number: int
    plane: np.ndarray  # (columns, rows) float32
    sop_instance_uid: str


class SliceAssembly:
    """One-slice Volumes in (any order), grid positions out; see the module docstring."""

    def __init__(self, expected_slices: int) -> None:
        if expected_slices < 2:
            raise ValueError(f"expected_slices must be >= 2, got {expected_slices!r}")
        self.expected_slices = expected_slices
        self.grid: ExpectedGrid | None = None
        self.broken: str | None = None
        self.placed: dict[int, _Slice] = {}  # grid slice index k -> slice
        self._waiting: list[_Slice] = []
        self._reference: Volume | None = None
        self._normal = np.zeros(3)

    def add(self, file_index: int, volume: Volume) -> list[int]:
        """Take one file's decoded Volume; returns the grid indices placed by it (it, and any it unblocked)."""
        if self.broken is not None or volume.voxels.size == 0:
            return []
        if volume.shape[2] != 1 or volume.source is None or len(volume.source.images) != 1:
            return self._break(f"file {file_index} is not a single-slice image")
        number = getattr(volume.source.header, "InstanceNumber", None)
        try:
            number = int(number)
        except (TypeError, ValueError):
            return self._break(f"file {file_index} has no InstanceNumber")
        reference = self._reference
        if reference is None:
            self._reference = reference = volume
            normal = np.cross(volume.affine[:3, 0], volume.affine[:3, 1])
            self._normal = normal / np.linalg.norm(normal)
        elif volume.shape[:2] != reference.shape[:2] or not np.allclose(
            volume.affine[:3, :2], reference.affine[:3, :2], atol=DIRECTION_ATOL
        ):
            return self._break(f"file {file_index} differs from the first image in size, spacing or orientation")
        elif volume.source.series_instance_uid != reference.source.series_instance_uid:
            return self._break(f"file {file_index} belongs to another series")
        position = float(volume.affine[:3, 3] @ self._normal)
        lateral = volume.affine[:3, 3] - position * self._normal
        first_lateral = reference.affine[:3, 3] - float(reference.affine[:3, 3] @ self._normal) * self._normal
        if np.abs(lateral - first_lateral).max() > LATERAL_ATOL_MM:
            return self._break(f"file {file_index} is displaced in-plane from the first image")
        item = _Slice(file_index, position, number, volume.voxels[:, :, 0], volume.source.images[0].sop_instance_uid)
        self._waiting.append(item)
        if self.grid is None and not self._fix_grid():
            return []
        placed = []
        for waiting in self._waiting:
            k = self._place(waiting)
            if k is None:
                return []
            placed.append(k)
        self._waiting.clear()
        return placed

    def plane(self, k: int) -> np.ndarray:
        return self.placed[k].plane

    @property
    def complete(self) -> bool:
        return self.grid is not None and self.broken is None and len(self.placed) == self.expected_slices

    def agrees_with(self, volume: Volume) -> bool:
        """Whether the series as its reader assembled it is the expected grid, each placed slice where it was put."""
        grid = self.grid
        if grid is None or self.broken is not None or volume.shape != grid.shape or volume.source is None:
            return False
        if not np.allclose(volume.affine, grid.affine, atol=AFFINE_ATOL_MM, rtol=0):
            return False
        images = {image.slice_index: image.sop_instance_uid for image in volume.source.images}
        return all(images.get(k) == item.sop_instance_uid for k, item in self.placed.items())

    def _fix_grid(self) -> bool:
        first = self._waiting[0]
        other = next((s for s in self._waiting[1:] if s.instance_number != first.instance_number), None)
        if other is None:
            return False
        step = (other.position_mm - first.position_mm) / (other.instance_number - first.instance_number)
        if abs(step) < MIN_STEP_MM:
            self._break("two images with different InstanceNumbers lie at the same position")
            return False
        n = self.expected_slices
        ends = [first.position_mm + (number - first.instance_number) * step for number in (1, n)]
        lowest = min(ends)
        reference = self._reference
        affine = np.array(reference.affine, dtype=np.float64)
        affine[:3, 2] = self._normal * abs(step)
        affine[:3, 3] = (
            reference.affine[:3, 3] + (lowest - float(reference.affine[:3, 3] @ self._normal)) * self._normal
        )
        self.grid = ExpectedGrid((reference.shape[0], reference.shape[1], n), affine)
        self._lowest_mm, self._step_mm = lowest, abs(step)
        return True

    def _place(self, item: _Slice) -> int | None:
        index = (item.position_mm - self._lowest_mm) / self._step_mm
        k = round(index)
        if abs(index - k) > ON_GRID_RTOL or not 0 <= k < self.expected_slices:
            self._break(f"file {item.file_index} lies off the expected grid")
            return None
        if k in self.placed:
            self._break(f"file {item.file_index} repeats the position of file {self.placed[k].file_index}")
            return None
        self.placed[k] = item
        return k

    def _break(self, why: str) -> list[int]:
        self.broken = why
        self._waiting.clear()
        return []
