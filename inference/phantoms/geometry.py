"""The voxel grid of a 3-D phantom in DICOM patient coordinates (LPS, mm), shared by the chest CT and brain MR.

A grid is what a DICOM series says about its slices: matrix, PixelSpacing, slice spacing, ImageOrientationPatient
and the ImagePositionPatient of slice 0. Its affine maps a voxel-center index (column, row, slice) to LPS mm, per
the Volume convention. The helpers here draw a grid (arguments left None are drawn from the generator, always in
the same order, so a seed keeps giving the same phantom), place it around a field-of-view center, and walk it in
slabs or boxes with the LPS coordinates of the voxel centers, which is how every phantom samples its anatomy.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np

Vec3 = tuple[float, float, float]
Block = tuple[slice, slice, slice]

BLOCK_VOXELS = 1 << 22  # voxels per slab when rendering a whole volume


@dataclass(frozen=True)
class SliceGrid:
    """Where a 3-D phantom's voxels sit in patient space; the first fields of each phantom's parameters."""

    shape: tuple[int, int, int]  # (columns, rows, slices)
    pixel_spacing_mm: tuple[float, float]  # DICOM order: (row spacing, column spacing)
    slice_spacing_mm: float
    row_direction: Vec3  # ImageOrientationPatient[0:3]: direction of increasing column index
    column_direction: Vec3  # ImageOrientationPatient[3:6]: direction of increasing row index
    slice_direction_sign: int  # +1: slices step along the plane normal taken towards +z (superior), -1: opposite
    origin_mm: Vec3  # ImagePositionPatient of slice 0

    @property
    def affine(self) -> np.ndarray:
        return build_affine(
            self.pixel_spacing_mm,
            self.slice_spacing_mm,
            self.row_direction,
            self.column_direction,
            self.slice_direction_sign,
            self.origin_mm,
        )

    def grid_fields(self) -> dict[str, object]:
        """The grid's own fields by name, to build a phantom's parameters (a subclass) around a drawn grid."""
        return {f.name: getattr(self, f.name) for f in fields(SliceGrid)}


class PlacedGrid(NamedTuple):
    """A drawn grid, its affine as used while drawing the anatomy, and the field of view it covers."""

    grid: SliceGrid
    affine: np.ndarray
    center_mm: np.ndarray  # LPS center of the voxel-center grid
    half_extent_mm: np.ndarray  # half extents of the voxel-center grid along x, y, z; at least half a voxel


def spacing_pair(pixel_spacing_mm: float | Sequence[float]) -> tuple[float, float]:
    """PixelSpacing as a (row spacing, column spacing) pair: a scalar means square pixels."""
    if np.isscalar(pixel_spacing_mm):
        return (float(pixel_spacing_mm), float(pixel_spacing_mm))  # type: ignore[arg-type]
    return (float(pixel_spacing_mm[0]), float(pixel_spacing_mm[1]))  # type: ignore[index]


def draw_spacings(
    rng: np.random.Generator,
    pixel_spacing_mm: float | Sequence[float] | None,
    slice_spacing_mm: float | None,
    pixel_range_mm: tuple[float, float],
    slice_range_mm: tuple[float, float],
) -> tuple[tuple[float, float], float]:
    """Pixel spacing pair and slice spacing; one left None is drawn uniformly from its range (pixel first)."""
    if pixel_spacing_mm is None:
        pixel_spacing_mm = float(rng.uniform(*pixel_range_mm))
    pixel_pair = spacing_pair(pixel_spacing_mm)
    if slice_spacing_mm is None:
        slice_spacing_mm = float(rng.uniform(*slice_range_mm))
    if min(pixel_pair) <= 0 or slice_spacing_mm <= 0:
        raise ValueError("pixel and slice spacings must be positive")
    return pixel_pair, float(slice_spacing_mm)


def check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive sizes (columns, rows, slices), got {shape}")
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def place_grid(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    pixel_spacing_mm: tuple[float, float],
    slice_spacing_mm: float,
    row_direction: Sequence[float] | None,
    column_direction: Sequence[float] | None,
    slice_direction_sign: int | None,
    origin_mm: Sequence[float] | None,
    center_ranges_mm: tuple[tuple[float, float], tuple[float, float], tuple[float, float]],
) -> PlacedGrid:
    """Orient and position a grid; what is left None is drawn from ``rng``, in argument order.

    Drawn orientations are axial with random flips of the row and column directions and of the slice order.
    Given directions are normalised and must be orthogonal. Without ``origin_mm`` the field-of-view center is
    drawn per axis from ``center_ranges_mm`` and the origin follows from it.
    """
    if row_direction is None:
        row_direction = (float(rng.choice([1.0, -1.0])), 0.0, 0.0)
    if column_direction is None:
        column_direction = (0.0, float(rng.choice([1.0, -1.0])), 0.0)
    if slice_direction_sign is None:
        slice_direction_sign = int(rng.choice([1, -1]))
    if slice_direction_sign not in (1, -1):
        raise ValueError(f"slice_direction_sign must be +1 or -1, got {slice_direction_sign}")
    row_dir, col_dir = unit(row_direction, "row_direction"), unit(column_direction, "column_direction")
    if abs(float(np.dot(row_dir, col_dir))) > 1e-6:
        raise ValueError("row_direction and column_direction must be orthogonal")

    steps = build_affine(pixel_spacing_mm, slice_spacing_mm, row_dir, col_dir, slice_direction_sign, (0.0, 0.0, 0.0))
    mid_index = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    if origin_mm is None:
        center = np.array([rng.uniform(*center_ranges_mm[axis]) for axis in range(3)])
        origin = center - steps[:3, :3] @ mid_index
    else:
        origin = np.asarray(origin_mm, dtype=np.float64)
        center = origin + steps[:3, :3] @ mid_index
    affine = steps.copy()
    affine[:3, 3] = origin
    half = 0.5 * np.abs(steps[:3, :3]) @ (np.asarray(shape, dtype=np.float64) - 1.0)
    half = np.maximum(half, 0.5 * np.abs(steps[:3, :3]).sum(axis=1))  # a single slice still has thickness
    grid = SliceGrid(
        shape=shape,
        pixel_spacing_mm=pixel_spacing_mm,
        slice_spacing_mm=float(slice_spacing_mm),
        row_direction=vec3(row_dir),
        column_direction=vec3(col_dir),
        slice_direction_sign=int(slice_direction_sign),
        origin_mm=vec3(origin),
    )
    return PlacedGrid(grid, affine, center, half)


def build_affine(
    pixel_spacing_mm: tuple[float, float],
    slice_spacing_mm: float,
    row_direction: Sequence[float],
    column_direction: Sequence[float],
    slice_direction_sign: int,
    origin_mm: Sequence[float],
) -> np.ndarray:
    """Voxel-center index (column, row, slice) -> LPS mm, per the Volume convention."""
    row_dir = np.asarray(row_direction, dtype=np.float64)
    col_dir = np.asarray(column_direction, dtype=np.float64)
    normal = np.cross(row_dir, col_dir)
    if normal[2] < 0:
        normal = -normal
    affine = np.eye(4)
    affine[:3, 0] = row_dir * pixel_spacing_mm[1]  # the column index steps by the column spacing
    affine[:3, 1] = col_dir * pixel_spacing_mm[0]  # the row index steps by the row spacing
    affine[:3, 2] = normal * slice_spacing_mm * slice_direction_sign
    affine[:3, 3] = origin_mm
    return affine + 0.0  # no negative zeros


def slabs(shape: tuple[int, int, int]) -> Iterator[Block]:
    """Blocks of whole (j, k) planes along i, about BLOCK_VOXELS each, to bound temporary memory."""
    step = max(1, BLOCK_VOXELS // (shape[1] * shape[2]))
    for start in range(0, shape[0], step):
        yield (slice(start, min(start + step, shape[0])), slice(0, shape[1]), slice(0, shape[2]))


def index_box(affine: np.ndarray, shape: Sequence[int], lo_mm: np.ndarray, hi_mm: np.ndarray) -> Block | None:
    """Index block holding every voxel center inside the LPS box [lo_mm, hi_mm], or None if empty."""
    corners = np.array(list(itertools.product(*zip(lo_mm, hi_mm, strict=True))))
    inverse = np.linalg.inv(affine)
    index = corners @ inverse[:3, :3].T + inverse[:3, 3]
    start = np.maximum(np.floor(index.min(axis=0)).astype(int), 0)
    stop = np.minimum(np.ceil(index.max(axis=0)).astype(int) + 1, np.asarray(shape))
    if np.any(stop <= start):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))  # type: ignore[return-value]


def world_mm(affine: np.ndarray, block: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LPS x, y, z of the voxel centers in ``block``, as arrays that broadcast to the block's shape.

    Only the affine terms that are non-zero are summed, so an axis-aligned affine gives cheap 1-D coordinates.
    """
    axes = [
        np.arange(s.start, s.stop, dtype=np.float64).reshape([-1 if a == n else 1 for n in range(3)])
        for a, s in enumerate(block)
    ]
    world = []
    for row in affine[:3]:
        coordinate = np.full((1, 1, 1), row[3])
        for a in range(3):
            if row[a] != 0.0:
                coordinate = coordinate + row[a] * axes[a]
        world.append(coordinate)
    return world[0], world[1], world[2]


def voxel_centers_mm(affine: np.ndarray, block: tuple[slice, ...]) -> np.ndarray:
    """LPS positions of the voxel centers in ``block``, as a (*block shape, 3) array."""
    return np.stack(np.broadcast_arrays(*world_mm(affine, block)), axis=-1)


def in_unit_ball(rng: np.random.Generator) -> np.ndarray:
    """A point drawn uniformly in the unit ball."""
    direction = unit(rng.standard_normal(3), "direction")
    return direction * rng.random() ** (1.0 / 3.0)


def unit(vector: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    """``vector`` normalised; ValueError naming ``name`` unless it is a finite, non-zero 3-vector."""
    v = np.asarray(vector, dtype=np.float64)
    norm = float(np.linalg.norm(v))
    if v.shape != (3,) or not math.isfinite(norm) or norm < 1e-9:
        raise ValueError(f"{name} must be a non-zero 3-vector, got {vector}")
    return v / norm


def vec3(v: Sequence[float] | np.ndarray) -> Vec3:
    return (float(v[0]), float(v[1]), float(v[2]))


def pair(v: Sequence[float] | np.ndarray) -> tuple[float, float]:
    return (float(v[0]), float(v[1]))
