"""Synthetic chest CT with planted lung nodules, for training, tests, the demo and benchmarks.

The anatomy is defined analytically in DICOM patient coordinates (LPS, mm): the body is an elliptic
cylinder along z, the lungs are two ellipsoids left and right of the midline, and each nodule is a
sphere, optionally with 1-3 overlapping bumps. The affine is built first; every voxel's value is the
anatomy sampled at the LPS position of the voxel center. The ground truth is therefore right for any
orientation, flip or origin, independently of array order.

Sizes are scaled to the scan's field of view so that any scan, however short, shows both lungs.
Nodule edges model partial volume: voxels cut by the surface are supersampled, so each holds the
fraction of it inside the nodule and a 5 mm nodule on 3 mm slices is still visible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from inference.io.volume import Volume
from inference.phantoms.base import Phantom
from inference.phantoms.geometry import (
    SliceGrid,
    Vec3,
    check_shape,
    draw_spacings,
    pair,
    place_grid,
    slabs,
    vec3,
    world_mm,
)
from inference.phantoms.lesions import (
    MAX_REACH_PER_DIAMETER,
    BallUnion,
    LesionNames,
    draw_core_center,
    draw_lobulated,
    fits_inside,
    paint_partial_volume,
    place_by_rejection,
    requested_diameters,
)

AIR_HU = -1000.0

# Ranges drawn from when an argument is left None.
MATRIX_RANGE = (128, 512)  # square, multiples of 32
SLICES_RANGE = (40, 400)
PIXEL_SPACING_RANGE_MM = (0.5, 1.0)
SLICE_SPACING_RANGE_MM = (0.625, 3.0)
MAX_NODULES = 5
NODULE_DIAMETER_RANGE_MM = (5.0, 30.0)
TISSUE_HU_RANGE = (30.0, 60.0)
LUNG_HU_RANGE = (-870.0, -830.0)
NODULE_HU_RANGE = (0.0, 100.0)
NOISE_SIGMA_RANGE_HU = (10.0, 40.0)
FOV_CENTER_RANGES_MM = ((-20, 20), (-20, 20), (-600, 200))  # x, y, z of the field-of-view center, when drawn

NODULE_NAMES = LesionNames("nodule", "nodules", region="lungs", inside="the lungs")


@dataclass(frozen=True)
class EllipticCylinder:
    """Infinite along z; the body."""

    center_mm: tuple[float, float]  # (x, y) LPS
    semi_axes_mm: tuple[float, float]
    hu: float

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        (cx, cy), (ax, ay) = self.center_mm, self.semi_axes_mm
        return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0


@dataclass(frozen=True)
class Ellipsoid:
    """Axis-aligned ellipsoid in LPS; a lung."""

    center_mm: Vec3
    semi_axes_mm: Vec3
    hu: float

    def normalized_radius(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """sqrt of the implicit function: < 1 inside, 1 on the surface."""
        (cx, cy, cz), (ax, ay, az) = self.center_mm, self.semi_axes_mm
        return np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2)

    def contains_ball(self, center_mm: np.ndarray, radius_mm: float) -> bool:
        """Conservative test that a ball lies inside.

        If the point lies on the ellipsoid scaled by s about its center, the ball of radius
        (1 - s) * min semi-axis around it is inside (convexity), so this never accepts a ball that pokes out.
        """
        s = float(self.normalized_radius(*np.asarray(center_mm, dtype=np.float64)))
        return s < 1.0 and radius_mm <= (1.0 - s) * min(self.semi_axes_mm)


@dataclass(frozen=True)
class Nodule(BallUnion):
    """A union of balls: the core sphere first, then the bumps of a lobulated nodule."""

    hu: float

    def _integration_mask(self, points_mm: np.ndarray) -> np.ndarray:
        """Squared distances, ball by ball: the set the signed distance gives, but for rounding at the surface.

        The chest phantom's ground-truth centroids and volumes have always been integrated this way; kept so
        that a seed gives the same truth bit for bit (the committed lung nodule model was trained on it).
        """
        inside = np.zeros(len(points_mm), dtype=bool)
        for center, radius in zip(self.ball_centers_mm, self.ball_radii_mm, strict=True):
            inside |= np.sum((points_mm - center) ** 2, axis=1) <= radius**2
        return inside


@dataclass(frozen=True)
class ChestCTParams(SliceGrid):
    """Everything that determines a chest phantom: its grid, then the anatomy; ``render_chest_ct`` voxelises it."""

    body: EllipticCylinder
    lungs: tuple[Ellipsoid, Ellipsoid]  # patient right (-x), patient left (+x)
    nodules: tuple[Nodule, ...]
    noise_sigma_hu: float
    noise_seed: int


def make_chest_ct(rng: np.random.Generator | int, **options: Any) -> Phantom:
    """A synthetic chest CT in HU with its planted nodules: ``sample_chest_ct_params`` takes the arguments."""
    return render_chest_ct(sample_chest_ct_params(rng, **options))


def sample_chest_ct_params(
    rng: np.random.Generator | int,
    *,
    shape: tuple[int, int, int] | None = None,
    pixel_spacing_mm: float | tuple[float, float] | None = None,
    slice_spacing_mm: float | None = None,
    n_nodules: int | None = None,
    nodule_diameters_mm: Sequence[float] | None = None,
    row_direction: Sequence[float] | None = None,
    column_direction: Sequence[float] | None = None,
    origin_mm: Sequence[float] | None = None,
    slice_direction_sign: int | None = None,
    noise_sigma_hu: float | None = None,
) -> ChestCTParams:
    """Draw a chest phantom; every argument left None is drawn from ``rng``.

    ``shape`` is (columns, rows, slices). A scalar ``pixel_spacing_mm`` means square pixels; a pair is
    DICOM PixelSpacing order (row spacing, column spacing). Row and column directions are the two halves
    of ImageOrientationPatient (normalised here); drawn ones are axial with random flips. ``origin_mm`` is the
    ImagePositionPatient of slice 0. ``nodule_diameters_mm`` fixes the longest extent of each nodule;
    raises ValueError when a requested nodule cannot be placed inside a lung.
    """
    rng = np.random.default_rng(rng)

    if shape is None:
        matrix = 32 * int(rng.integers(MATRIX_RANGE[0] // 32, MATRIX_RANGE[1] // 32 + 1))
        shape = (matrix, matrix, int(rng.integers(SLICES_RANGE[0], SLICES_RANGE[1] + 1)))
    shape = check_shape(shape)
    pixel_pair, slice_spacing_mm = draw_spacings(
        rng, pixel_spacing_mm, slice_spacing_mm, PIXEL_SPACING_RANGE_MM, SLICE_SPACING_RANGE_MM
    )
    grid, affine, fov_center, half = place_grid(
        rng,
        shape,
        pixel_pair,
        slice_spacing_mm,
        row_direction,
        column_direction,
        slice_direction_sign,
        origin_mm,
        FOV_CENTER_RANGES_MM,
    )

    body, lungs = _draw_anatomy(rng, fov_center, half)
    nodules = _draw_nodules(rng, affine, shape, lungs, n_nodules, nodule_diameters_mm)
    if noise_sigma_hu is None:
        noise_sigma_hu = float(rng.uniform(*NOISE_SIGMA_RANGE_HU))

    return ChestCTParams(
        **grid.grid_fields(),
        body=body,
        lungs=lungs,
        nodules=nodules,
        noise_sigma_hu=float(noise_sigma_hu),
        noise_seed=int(rng.integers(2**63 - 1)),
    )


def render_chest_ct(params: ChestCTParams) -> Phantom:
    """Voxelise ``params``: float32 HU sampled at every voxel center's LPS position."""
    affine = params.affine
    voxels = np.empty(params.shape, dtype=np.float32)
    in_body = np.empty(params.shape, dtype=bool)

    for block in slabs(params.shape):
        x, y, z = world_mm(affine, block)
        view = voxels[block]
        body = np.broadcast_to(params.body.contains(x, y), view.shape)
        in_body[block] = body
        view[...] = np.where(body, np.float32(params.body.hu), np.float32(AIR_HU))
        for lung in params.lungs:
            np.copyto(view, np.float32(lung.hu), where=(lung.normalized_radius(x, y, z) <= 1.0) & body)

    half_diagonal_mm = 0.5 * float(np.linalg.norm(np.linalg.norm(affine[:3, :3], axis=0)))
    for nodule in params.nodules:
        paint_partial_volume(voxels, affine, nodule, nodule.hu, pad_mm=half_diagonal_mm)

    if params.noise_sigma_hu > 0:
        noise_rng = np.random.default_rng(params.noise_seed)
        for block in slabs(params.shape):
            view = voxels[block]
            noise = noise_rng.standard_normal(view.shape, dtype=np.float32)
            noise *= np.float32(params.noise_sigma_hu)
            np.add(view, noise, out=view, where=in_body[block])

    lesions = tuple(nodule.planted(NODULE_NAMES.singular) for nodule in params.nodules)
    return Phantom(volume=Volume(voxels=voxels, affine=affine, modality="CT"), lesions=lesions)


def _draw_anatomy(
    rng: np.random.Generator, fov_center: np.ndarray, half: np.ndarray
) -> tuple[EllipticCylinder, tuple[Ellipsoid, Ellipsoid]]:
    """Body and lungs scaled to the field of view (half extents ``half`` around ``fov_center``)."""
    body_center = fov_center[:2] + rng.uniform(-0.04, 0.04, size=2) * half[:2]
    ax, ay = rng.uniform(0.80, 0.90) * half[0], rng.uniform(0.60, 0.80) * half[1]
    body = EllipticCylinder(pair(body_center), (float(ax), float(ay)), float(rng.uniform(*TISSUE_HU_RANGE)))
    lungs = []
    for side in (-1.0, 1.0):  # patient right is -x in LPS
        center = (
            body_center[0] + side * rng.uniform(0.44, 0.50) * ax,
            body_center[1] + rng.uniform(-0.05, 0.05) * ay,
            fov_center[2] + rng.uniform(-0.10, 0.10) * half[2],
        )
        semi_axes = (rng.uniform(0.32, 0.38) * ax, rng.uniform(0.55, 0.68) * ay, rng.uniform(0.60, 0.85) * half[2])
        lungs.append(Ellipsoid(vec3(center), vec3(semi_axes), float(rng.uniform(*LUNG_HU_RANGE))))
    return body, (lungs[0], lungs[1])


def _draw_nodules(
    rng: np.random.Generator,
    affine: np.ndarray,
    shape: tuple[int, int, int],
    lungs: tuple[Ellipsoid, Ellipsoid],
    n_nodules: int | None,
    diameters_mm: Sequence[float] | None,
) -> tuple[Nodule, ...]:
    """Place non-overlapping nodules fully inside the lungs by rejection sampling."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    # Partial volume reaches half a voxel diagonal past the surface; the margin keeps it in lung, nodules apart.
    margin = 0.5 * float(np.linalg.norm(spacing)) + 0.5
    # Drawn diameters stay below what fits, with some room, at the center of the larger lung.
    largest_fit = max(min(lung.semi_axes_mm) for lung in lungs) - margin
    d_cap = min(NODULE_DIAMETER_RANGE_MM[1], 0.9 * largest_fit / MAX_REACH_PER_DIAMETER)
    diameters = requested_diameters(
        rng,
        NODULE_NAMES,
        n_nodules,
        diameters_mm,
        max_count=MAX_NODULES,
        min_diameter_mm=NODULE_DIAMETER_RANGE_MM[0],
        cap_mm=d_cap,
    )
    inverse = np.linalg.inv(affine)

    def propose(_: int, diameter: float, placed: list[Nodule]) -> Nodule | None:
        offsets, radii = draw_lobulated(rng, diameter)
        lung = lungs[int(rng.integers(2))]
        center = draw_core_center(rng, lung, radii[0] + margin)
        if center is None:
            return None
        candidate = Nodule(
            tuple(vec3(center + o) for o in offsets),
            tuple(float(r) for r in radii),
            float(rng.uniform(*NODULE_HU_RANGE)),
        )
        return candidate if fits_inside(candidate, lung, placed, margin, inverse, spacing, shape) else None

    return place_by_rejection(
        NODULE_NAMES,
        diameters,
        lambda: float(rng.uniform(NODULE_DIAMETER_RANGE_MM[0], d_cap)),
        propose,
        give_up_quietly=diameters_mm is None and n_nodules is None,
    )
