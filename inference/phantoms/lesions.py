"""Planted lesions shared by the phantoms: how many and how large, where (rejection sampling), and their shape.

Every phantom plants its lesions the same way: the count and diameters are asked for or drawn
(:func:`requested_diameters`), then each is proposed at random places until one fits (:func:`place_by_rejection`);
what a proposal draws and what "fits" means is the phantom's own. The 3-D phantoms (chest CT nodules, brain MR
lesions) share the shape too: a :class:`BallUnion`, a sphere optionally lobulated with 1-3 overlapping bumps, drawn
by :func:`draw_lobulated` and voxelised with partial volume by :func:`paint_partial_volume`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from inference.phantoms.base import PlantedLesion
from inference.phantoms.geometry import Block, Vec3, in_unit_ball, index_box, unit, vec3, voxel_centers_mm

logger = logging.getLogger(__name__)

T = TypeVar("T")

PLACEMENT_ATTEMPTS = 400  # proposals per lesion before giving up
VOLUME_GRID = 64  # samples per axis when integrating a lobulated lesion
SUBSAMPLE_MM = 0.4  # supersampling step inside voxels cut by a lesion surface
# Bumps sit at 0.70-0.90 core radii with radii 0.30-0.45: nothing reaches past 0.58 diameters from the core center.
MAX_REACH_PER_DIAMETER = 0.58


@dataclass(frozen=True)
class LesionNames:
    """How a phantom's messages name what it plants and where; ``n_<plural>`` is its count argument."""

    singular: str  # "nodule"
    plural: str  # "nodules"
    region: str  # "lungs" in "lungs too small for a 5.0 mm nodule in this field of view"
    inside: str  # "the lungs" in "could not place a 9.0 mm nodule inside the lungs of this field of view"


def requested_diameters(
    rng: np.random.Generator,
    names: LesionNames,
    count: int | None,
    diameters_mm: Sequence[float] | None,
    *,
    max_count: int,
    min_diameter_mm: float,
    cap_mm: float,
) -> list[float | None]:
    """One entry per lesion to plant: its requested diameter, or None where it is to be drawn.

    Given diameters fix the count (``count``, if also given, must agree). Otherwise the count is ``count`` or
    drawn in 0..``max_count``; where no lesion of ``min_diameter_mm`` fits (``cap_mm`` is the largest drawn
    diameter that does), a drawn count becomes 0 and a requested one raises ValueError.
    """
    if diameters_mm is not None:
        diameters: list[float | None] = [float(d) for d in diameters_mm]
        if count is not None and count != len(diameters):
            raise ValueError(f"n_{names.plural}={count} but {len(diameters)} {names.singular} diameters given")
        if any(d <= 0 for d in diameters):  # type: ignore[operator]
            raise ValueError(f"{names.singular} diameters must be positive, got {diameters}")
        return diameters
    if count is not None and count < 0:
        raise ValueError(f"n_{names.plural} must be >= 0, got {count}")
    drawn_count = count is None
    n = int(rng.integers(0, max_count + 1)) if drawn_count else int(count)  # type: ignore[arg-type]
    if n and cap_mm < min_diameter_mm:
        if not drawn_count:
            raise ValueError(
                f"{names.region} too small for a {min_diameter_mm} mm {names.singular} in this field of view"
            )
        logger.debug(
            "%s too small for %s (largest fitting diameter %.1f mm); planting none", names.region, names.plural, cap_mm
        )
        n = 0
    return [None] * n


def place_by_rejection(
    names: LesionNames,
    diameters: Sequence[float | None],
    draw_diameter: Callable[[], float],
    propose: Callable[[int, float, list[T]], T | None],
    *,
    give_up_quietly: bool,
) -> tuple[T, ...]:
    """Plant one lesion per entry of ``diameters``, each the first of up to PLACEMENT_ATTEMPTS proposals that fits.

    Each attempt takes the requested diameter or ``draw_diameter()``, then ``propose(index, diameter, placed)``:
    a lesion that fits next to those already placed, or None. When a lesion finds no room, planting stops there
    if ``give_up_quietly`` (everything was drawn), else ValueError.
    """
    placed: list[T] = []
    for index, requested in enumerate(diameters):
        for _ in range(PLACEMENT_ATTEMPTS):
            diameter = requested if requested is not None else draw_diameter()
            candidate = propose(index, diameter, placed)
            if candidate is not None:
                placed.append(candidate)
                break
        else:
            if give_up_quietly:
                logger.debug("no room for more %s in this field of view; planting %d", names.plural, len(placed))
                break
            raise ValueError(
                f"could not place a {diameter:.1f} mm {names.singular} inside {names.inside} of this field of view "
                f"next to {len(placed)} others"
            )
    return tuple(placed)


class Region(Protocol):
    """An anatomical region lesions are planted in: an axis-aligned ellipsoid that tests balls conservatively."""

    center_mm: Vec3
    semi_axes_mm: Vec3

    def contains_ball(self, center_mm: np.ndarray, radius_mm: float) -> bool: ...


@dataclass(frozen=True)
class BallUnion:
    """A lesion's shape: the core ball first, then the bumps of a lobulated lesion (LPS mm)."""

    ball_centers_mm: tuple[Vec3, ...]
    ball_radii_mm: tuple[float, ...]

    @property
    def diameter_mm(self) -> float:
        """Longest extent: max over ball pairs of center distance plus both radii."""
        c, r = np.asarray(self.ball_centers_mm), np.asarray(self.ball_radii_mm)
        distance = np.linalg.norm(c[:, None, :] - c[None, :, :], axis=-1)
        return float(np.max(distance + r[:, None] + r[None, :]))

    @property
    def enclosing_radius_mm(self) -> float:
        """Radius about the core center that holds the whole lesion."""
        c = np.asarray(self.ball_centers_mm)
        return float(np.max(np.linalg.norm(c - c[0], axis=1) + np.asarray(self.ball_radii_mm)))

    def centroid_and_volume(self) -> tuple[Vec3, float]:
        """Centroid (LPS mm) and volume (mm^3): exact for a sphere, midpoint-rule integration otherwise."""
        c0 = np.asarray(self.ball_centers_mm[0])
        if len(self.ball_radii_mm) == 1:
            return vec3(c0), 4.0 / 3.0 * math.pi * self.ball_radii_mm[0] ** 3
        half = self.enclosing_radius_mm
        step = 2.0 * half / VOLUME_GRID
        ticks = -half + step * (np.arange(VOLUME_GRID) + 0.5)
        points = np.stack(np.meshgrid(ticks, ticks, ticks, indexing="ij"), axis=-1).reshape(-1, 3) + c0
        inside = self._integration_mask(points)
        return vec3(points[inside].mean(axis=0)), float(inside.sum()) * step**3

    def _integration_mask(self, points_mm: np.ndarray) -> np.ndarray:
        """Which (N, 3) points :meth:`centroid_and_volume` counts as inside."""
        return self.signed_distance_mm(points_mm) <= 0

    def signed_distance_mm(self, points_mm: np.ndarray) -> np.ndarray:
        """Distance from each (..., 3) point to the surface; negative inside. 1-Lipschitz."""
        return np.min(
            [
                np.sqrt(np.sum((points_mm - center) ** 2, axis=-1)) - radius
                for center, radius in zip(self.ball_centers_mm, self.ball_radii_mm, strict=True)
            ],
            axis=0,
        )

    def coverage(self, centers_mm: np.ndarray, steps_mm: np.ndarray) -> np.ndarray:
        """Fraction of each voxel inside, for (..., 3) voxel centers; ``steps_mm``: the affine's 3x3.

        A voxel lies within half its diagonal of its center, so voxels farther than that from the surface
        are wholly in or out; the others are supersampled on a regular grid of about SUBSAMPLE_MM.
        """
        distance = self.signed_distance_mm(centers_mm)
        fraction = (distance < 0).astype(np.float32)
        edge = np.abs(distance) < 0.5 * float(np.linalg.norm(np.linalg.norm(steps_mm, axis=0)))
        counts = np.maximum(2, np.ceil(np.linalg.norm(steps_mm, axis=0) / SUBSAMPLE_MM)).astype(int)
        grid = np.meshgrid(*[(np.arange(n) + 0.5) / n - 0.5 for n in counts], indexing="ij")
        offsets = np.stack(grid, axis=-1).reshape(-1, 3) @ steps_mm.T
        edge_centers = centers_mm[edge]
        inside = np.empty(len(edge_centers), dtype=np.float32)
        batch = max(1, (1 << 20) // len(offsets))
        for start in range(0, len(edge_centers), batch):
            samples = edge_centers[start : start + batch, None, :] + offsets
            inside[start : start + batch] = np.mean(self.signed_distance_mm(samples) < 0, axis=1)
        fraction[edge] = inside
        return fraction

    def index_block(self, affine: np.ndarray, shape: Sequence[int], pad_mm: float) -> Block | None:
        """Index block of the voxel centers within ``pad_mm`` of the ball about the core center holding the lesion."""
        reach = self.enclosing_radius_mm + pad_mm
        center = np.asarray(self.ball_centers_mm[0])
        return index_box(affine, shape, center - reach, center + reach)

    def planted(self, label: str) -> PlantedLesion:
        """Ground truth: centroid, longest extent and volume."""
        centroid, volume_mm3 = self.centroid_and_volume()
        return PlantedLesion(label=label, center_mm=centroid, diameter_mm=self.diameter_mm, volume_ml=volume_mm3 / 1000)


def draw_lobulated(rng: np.random.Generator, diameter_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Ball offsets from the core center and radii; half the time 1-3 bumps. Longest extent = ``diameter_mm``."""
    offsets, radii = [np.zeros(3)], [1.0]
    if rng.random() < 0.5:
        for _ in range(int(rng.integers(1, 4))):
            offsets.append(unit(rng.standard_normal(3), "bump direction") * rng.uniform(0.70, 0.90))
            radii.append(float(rng.uniform(0.30, 0.45)))
    scale = diameter_mm / BallUnion(tuple(vec3(o) for o in offsets), tuple(radii)).diameter_mm
    return np.asarray(offsets) * scale, np.asarray(radii) * scale


def draw_core_center(rng: np.random.Generator, region: Region, clearance_mm: float) -> np.ndarray | None:
    """A core center, uniform over where a ball of ``clearance_mm`` can pass ``region.contains_ball``, or None.

    Only centers within the region scaled by 1 - clearance / min semi-axis can pass, so that is where it is drawn.
    """
    scale = 1.0 - clearance_mm / min(region.semi_axes_mm)
    if scale <= 0:
        return None
    return np.asarray(region.center_mm) + np.asarray(region.semi_axes_mm) * scale * in_unit_ball(rng)


def fits_inside(
    lesion: BallUnion,
    region: Region,
    placed: Sequence[BallUnion],
    margin: float,
    inverse: np.ndarray,
    spacing: np.ndarray,
    shape: tuple[int, int, int],
) -> bool:
    """Inside ``region`` with ``margin``, ``2 * margin`` clear of the ``placed`` lesions, wholly inside the grid.

    ``inverse`` is the inverse of the grid's affine, ``spacing`` its voxel spacing along each index axis.
    """
    for center, radius in zip(lesion.ball_centers_mm, lesion.ball_radii_mm, strict=True):
        if not region.contains_ball(np.asarray(center), radius + margin):
            return False
    core, reach = np.asarray(lesion.ball_centers_mm[0]), lesion.enclosing_radius_mm
    for other in placed:
        gap = np.linalg.norm(core - np.asarray(other.ball_centers_mm[0])) - reach - other.enclosing_radius_mm
        if gap < 2 * margin:
            return False
    index = inverse[:3, :3] @ core + inverse[:3, 3]
    pad = reach / spacing
    return bool(np.all(index - pad >= 0) and np.all(index + pad <= np.asarray(shape) - 1))


def paint_partial_volume(
    voxels: np.ndarray, affine: np.ndarray, lesion: BallUnion, intensity: float, pad_mm: float
) -> None:
    """Blend ``intensity`` into ``voxels`` in place, each voxel by the fraction of it inside ``lesion``.

    Only the block within ``pad_mm`` of the lesion's enclosing ball is computed; ``pad_mm`` must reach past the
    partial-volume ramp (half a voxel diagonal).
    """
    block = lesion.index_block(affine, voxels.shape, pad_mm)
    if block is None:
        return
    view = voxels[block]
    fraction = lesion.coverage(voxel_centers_mm(affine, block), affine[:3, :3])
    view += fraction * (np.float32(intensity) - view)
