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

import itertools
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from inference.io.volume import Volume
from inference.phantoms.base import Phantom, PlantedLesion

logger = logging.getLogger(__name__)

Vec3 = tuple[float, float, float]

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

_PLACEMENT_ATTEMPTS = 400
_BLOCK_VOXELS = 1 << 22  # voxels per slab when rendering the whole volume
_VOLUME_GRID = 64  # samples per axis when integrating a lobulated nodule
_SUBSAMPLE_MM = 0.4  # supersampling step inside voxels cut by a nodule surface
# Bumps sit at 0.70-0.90 core radii, radii 0.30-0.45: no ball reaches past 1.35 / 2.35 diameters from the core center.
_MAX_REACH_PER_DIAMETER = 0.58


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
class Nodule:
    """A union of balls: the core sphere first, then the bumps of a lobulated nodule."""

    ball_centers_mm: tuple[Vec3, ...]
    ball_radii_mm: tuple[float, ...]
    hu: float

    @property
    def diameter_mm(self) -> float:
        """Longest extent of the union: max over ball pairs of center distance plus both radii."""
        c = np.asarray(self.ball_centers_mm)
        r = np.asarray(self.ball_radii_mm)
        dist = np.linalg.norm(c[:, None, :] - c[None, :, :], axis=-1)
        return float(np.max(dist + r[:, None] + r[None, :]))

    @property
    def enclosing_radius_mm(self) -> float:
        """Radius about the core center that holds the whole nodule."""
        c = np.asarray(self.ball_centers_mm)
        return float(np.max(np.linalg.norm(c - c[0], axis=1) + np.asarray(self.ball_radii_mm)))

    def centroid_and_volume(self) -> tuple[Vec3, float]:
        """Centroid (LPS mm) and volume (mm^3): exact for a sphere, midpoint-rule integration otherwise."""
        c0 = np.asarray(self.ball_centers_mm[0])
        if len(self.ball_radii_mm) == 1:
            return _vec3(c0), 4.0 / 3.0 * math.pi * self.ball_radii_mm[0] ** 3
        half = self.enclosing_radius_mm
        step = 2.0 * half / _VOLUME_GRID
        ticks = -half + step * (np.arange(_VOLUME_GRID) + 0.5)
        pts = np.stack(np.meshgrid(ticks, ticks, ticks, indexing="ij"), axis=-1).reshape(-1, 3) + c0
        inside = np.zeros(len(pts), dtype=bool)
        for center, radius in zip(self.ball_centers_mm, self.ball_radii_mm, strict=True):
            inside |= np.sum((pts - center) ** 2, axis=1) <= radius**2
        return _vec3(pts[inside].mean(axis=0)), float(inside.sum()) * step**3

    def signed_distance_mm(self, points: np.ndarray) -> np.ndarray:
        """Distance from each (..., 3) LPS point to the nodule surface; negative inside. 1-Lipschitz."""
        return np.min(
            [
                np.sqrt(np.sum((points - center) ** 2, axis=-1)) - radius
                for center, radius in zip(self.ball_centers_mm, self.ball_radii_mm, strict=True)
            ],
            axis=0,
        )

    def coverage(self, centers_mm: np.ndarray, steps_mm: np.ndarray) -> np.ndarray:
        """Fraction of each voxel inside the nodule, for (..., 3) voxel centers.

        ``steps_mm`` holds the voxel step vectors as columns (the affine's 3x3). A voxel lies within half
        its diagonal of its center, so voxels farther than that from the surface are wholly in or out;
        the others are supersampled on a regular grid of about _SUBSAMPLE_MM.
        """
        distance = self.signed_distance_mm(centers_mm)
        half_diagonal = 0.5 * float(np.linalg.norm(np.linalg.norm(steps_mm, axis=0)))
        fraction = (distance < 0).astype(np.float32)
        edge = np.abs(distance) < half_diagonal
        counts = np.maximum(2, np.ceil(np.linalg.norm(steps_mm, axis=0) / _SUBSAMPLE_MM)).astype(int)
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


@dataclass(frozen=True)
class ChestCTParams:
    """Everything that determines a chest phantom; ``render_chest_ct`` turns it into voxels."""

    shape: tuple[int, int, int]  # (columns, rows, slices)
    pixel_spacing_mm: tuple[float, float]  # DICOM order: (row spacing, column spacing)
    slice_spacing_mm: float
    row_direction: Vec3  # ImageOrientationPatient[0:3]: direction of increasing column index
    column_direction: Vec3  # ImageOrientationPatient[3:6]: direction of increasing row index
    slice_direction_sign: int  # +1: slices step along the plane normal taken towards +z (superior), -1: opposite
    origin_mm: Vec3  # ImagePositionPatient of slice 0
    body: EllipticCylinder
    lungs: tuple[Ellipsoid, Ellipsoid]  # patient right (-x), patient left (+x)
    nodules: tuple[Nodule, ...]
    noise_sigma_hu: float
    noise_seed: int

    @property
    def affine(self) -> np.ndarray:
        return _build_affine(
            self.pixel_spacing_mm,
            self.slice_spacing_mm,
            self.row_direction,
            self.column_direction,
            self.slice_direction_sign,
            self.origin_mm,
        )


def make_chest_ct(
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
) -> Phantom:
    """A synthetic chest CT in HU with its planted nodules; see ``sample_chest_ct_params`` for the arguments."""
    params = sample_chest_ct_params(
        rng,
        shape=shape,
        pixel_spacing_mm=pixel_spacing_mm,
        slice_spacing_mm=slice_spacing_mm,
        n_nodules=n_nodules,
        nodule_diameters_mm=nodule_diameters_mm,
        row_direction=row_direction,
        column_direction=column_direction,
        origin_mm=origin_mm,
        slice_direction_sign=slice_direction_sign,
        noise_sigma_hu=noise_sigma_hu,
    )
    return render_chest_ct(params)


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
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive sizes (columns, rows, slices), got {shape}")
    shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    if pixel_spacing_mm is None:
        pixel_spacing_mm = float(rng.uniform(*PIXEL_SPACING_RANGE_MM))
    pixel_pair = (
        (float(pixel_spacing_mm), float(pixel_spacing_mm))
        if np.isscalar(pixel_spacing_mm)
        else (float(pixel_spacing_mm[0]), float(pixel_spacing_mm[1]))  # type: ignore[index]
    )
    if slice_spacing_mm is None:
        slice_spacing_mm = float(rng.uniform(*SLICE_SPACING_RANGE_MM))
    if min(pixel_pair) <= 0 or slice_spacing_mm <= 0:
        raise ValueError("pixel and slice spacings must be positive")
    if row_direction is None:
        row_direction = (float(rng.choice([1.0, -1.0])), 0.0, 0.0)
    if column_direction is None:
        column_direction = (0.0, float(rng.choice([1.0, -1.0])), 0.0)
    if slice_direction_sign is None:
        slice_direction_sign = int(rng.choice([1, -1]))
    if slice_direction_sign not in (1, -1):
        raise ValueError(f"slice_direction_sign must be +1 or -1, got {slice_direction_sign}")
    row_dir, col_dir = _unit(row_direction, "row_direction"), _unit(column_direction, "column_direction")
    if abs(float(np.dot(row_dir, col_dir))) > 1e-6:
        raise ValueError("row_direction and column_direction must be orthogonal")

    steps = _build_affine(pixel_pair, slice_spacing_mm, row_dir, col_dir, slice_direction_sign, (0.0, 0.0, 0.0))
    mid_index = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    if origin_mm is None:
        fov_center = np.array([rng.uniform(-20, 20), rng.uniform(-20, 20), rng.uniform(-600, 200)])
        origin = fov_center - steps[:3, :3] @ mid_index
    else:
        origin = np.asarray(origin_mm, dtype=np.float64)
        fov_center = origin + steps[:3, :3] @ mid_index
    affine = steps.copy()
    affine[:3, 3] = origin
    # Half extents of the voxel-center grid along x, y, z.
    half = 0.5 * np.abs(steps[:3, :3]) @ (np.asarray(shape, dtype=np.float64) - 1.0)
    half = np.maximum(half, 0.5 * np.abs(steps[:3, :3]).sum(axis=1))  # a single slice still has thickness

    body, lungs = _draw_anatomy(rng, fov_center, half)
    nodules = _draw_nodules(rng, affine, shape, lungs, n_nodules, nodule_diameters_mm)
    if noise_sigma_hu is None:
        noise_sigma_hu = float(rng.uniform(*NOISE_SIGMA_RANGE_HU))

    return ChestCTParams(
        shape=shape,
        pixel_spacing_mm=pixel_pair,
        slice_spacing_mm=float(slice_spacing_mm),
        row_direction=_vec3(row_dir),
        column_direction=_vec3(col_dir),
        slice_direction_sign=int(slice_direction_sign),
        origin_mm=_vec3(origin),
        body=body,
        lungs=lungs,
        nodules=nodules,
        noise_sigma_hu=float(noise_sigma_hu),
        noise_seed=int(rng.integers(2**63 - 1)),
    )


def render_chest_ct(params: ChestCTParams) -> Phantom:
    """Voxelise ``params``: float32 HU sampled at every voxel center's LPS position."""
    affine = params.affine
    steps = affine[:3, :3]
    spacing = np.linalg.norm(steps, axis=0)
    voxels = np.empty(params.shape, dtype=np.float32)
    in_body = np.empty(params.shape, dtype=bool)

    for block in _slabs(params.shape):
        x, y, z = _world_mm(affine, block)
        view = voxels[block]
        body = np.broadcast_to(params.body.contains(x, y), view.shape)
        in_body[block] = body
        view[...] = np.where(body, np.float32(params.body.hu), np.float32(AIR_HU))
        for lung in params.lungs:
            np.copyto(view, np.float32(lung.hu), where=(lung.normalized_radius(x, y, z) <= 1.0) & body)

    for nodule in params.nodules:
        reach = nodule.enclosing_radius_mm + 0.5 * float(np.linalg.norm(spacing))  # + half voxel diagonal
        center = np.asarray(nodule.ball_centers_mm[0])
        block = _index_box(affine, params.shape, center - reach, center + reach)
        if block is None:
            continue
        view = voxels[block]
        x, y, z = np.broadcast_arrays(*_world_mm(affine, block))
        fraction = nodule.coverage(np.stack([x, y, z], axis=-1), steps)
        view += fraction * (np.float32(nodule.hu) - view)

    if params.noise_sigma_hu > 0:
        noise_rng = np.random.default_rng(params.noise_seed)
        for block in _slabs(params.shape):
            view = voxels[block]
            noise = noise_rng.standard_normal(view.shape, dtype=np.float32)
            noise *= np.float32(params.noise_sigma_hu)
            np.add(view, noise, out=view, where=in_body[block])

    lesions = []
    for nodule in params.nodules:
        centroid, volume_mm3 = nodule.centroid_and_volume()
        lesions.append(
            PlantedLesion(
                label="nodule", center_mm=centroid, diameter_mm=nodule.diameter_mm, volume_ml=volume_mm3 / 1000
            )
        )
    return Phantom(volume=Volume(voxels=voxels, affine=affine, modality="CT"), lesions=tuple(lesions))


def _draw_anatomy(
    rng: np.random.Generator, fov_center: np.ndarray, half: np.ndarray
) -> tuple[EllipticCylinder, tuple[Ellipsoid, Ellipsoid]]:
    """Body and lungs scaled to the field of view (half extents ``half`` around ``fov_center``)."""
    body_center = fov_center[:2] + rng.uniform(-0.04, 0.04, size=2) * half[:2]
    ax, ay = rng.uniform(0.80, 0.90) * half[0], rng.uniform(0.60, 0.80) * half[1]
    body = EllipticCylinder(_pair(body_center), (float(ax), float(ay)), float(rng.uniform(*TISSUE_HU_RANGE)))
    lungs = []
    for side in (-1.0, 1.0):  # patient right is -x in LPS
        center = (
            body_center[0] + side * rng.uniform(0.44, 0.50) * ax,
            body_center[1] + rng.uniform(-0.05, 0.05) * ay,
            fov_center[2] + rng.uniform(-0.10, 0.10) * half[2],
        )
        semi_axes = (rng.uniform(0.32, 0.38) * ax, rng.uniform(0.55, 0.68) * ay, rng.uniform(0.60, 0.85) * half[2])
        lungs.append(Ellipsoid(_vec3(center), _vec3(semi_axes), float(rng.uniform(*LUNG_HU_RANGE))))
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
    d_cap = min(NODULE_DIAMETER_RANGE_MM[1], 0.9 * largest_fit / _MAX_REACH_PER_DIAMETER)

    if diameters_mm is not None:
        diameters: list[float | None] = [float(d) for d in diameters_mm]
        if n_nodules is not None and n_nodules != len(diameters):
            raise ValueError(f"n_nodules={n_nodules} but {len(diameters)} nodule diameters given")
        if any(d <= 0 for d in diameters):  # type: ignore[operator]
            raise ValueError(f"nodule diameters must be positive, got {diameters_mm}")
    else:
        if n_nodules is not None and n_nodules < 0:
            raise ValueError(f"n_nodules must be >= 0, got {n_nodules}")
        drawn_count = n_nodules is None
        count = int(rng.integers(0, MAX_NODULES + 1)) if drawn_count else int(n_nodules)
        if count and d_cap < NODULE_DIAMETER_RANGE_MM[0]:
            if not drawn_count:
                raise ValueError(f"lungs too small for a {NODULE_DIAMETER_RANGE_MM[0]} mm nodule in this field of view")
            logger.debug("lungs too small for nodules (largest fitting diameter %.1f mm); planting none", d_cap)
            count = 0
        diameters = [None] * count

    inverse = np.linalg.inv(affine)
    placed: list[Nodule] = []
    for requested in diameters:
        for _ in range(_PLACEMENT_ATTEMPTS):
            diameter = requested if requested is not None else float(rng.uniform(NODULE_DIAMETER_RANGE_MM[0], d_cap))
            offsets, radii = _nodule_shape(rng, diameter)
            lung = lungs[int(rng.integers(2))]
            # Only core centers within this scaled lung can pass Ellipsoid.contains_ball: draw there directly.
            scale = 1.0 - (radii[0] + margin) / min(lung.semi_axes_mm)
            if scale <= 0:
                continue
            center = np.asarray(lung.center_mm) + np.asarray(lung.semi_axes_mm) * scale * _in_unit_ball(rng)
            candidate = Nodule(
                tuple(_vec3(center + o) for o in offsets),
                tuple(float(r) for r in radii),
                float(rng.uniform(*NODULE_HU_RANGE)),
            )
            if _fits(candidate, lung, placed, margin, inverse, spacing, shape):
                placed.append(candidate)
                break
        else:
            if diameters_mm is None and n_nodules is None:
                logger.debug("no room for more nodules in this field of view; planting %d", len(placed))
                break
            raise ValueError(
                f"could not place a {diameter:.1f} mm nodule inside the lungs of this field of view "
                f"next to {len(placed)} others"
            )
    return tuple(placed)


def _nodule_shape(rng: np.random.Generator, diameter_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Ball offsets from the core center and radii; half the time 1-3 bumps. Longest extent = ``diameter_mm``."""
    offsets, radii = [np.zeros(3)], [1.0]
    if rng.random() < 0.5:
        for _ in range(int(rng.integers(1, 4))):
            offsets.append(_unit(rng.standard_normal(3), "bump direction") * rng.uniform(0.70, 0.90))
            radii.append(float(rng.uniform(0.30, 0.45)))
    unit = Nodule(tuple(_vec3(o) for o in offsets), tuple(radii), 0.0)
    scale = diameter_mm / unit.diameter_mm
    return np.asarray(offsets) * scale, np.asarray(radii) * scale


def _fits(
    nodule: Nodule,
    lung: Ellipsoid,
    placed: list[Nodule],
    margin: float,
    inverse: np.ndarray,
    spacing: np.ndarray,
    shape: tuple[int, int, int],
) -> bool:
    for center, radius in zip(nodule.ball_centers_mm, nodule.ball_radii_mm, strict=True):
        if not lung.contains_ball(np.asarray(center), radius + margin):
            return False
    core, reach = np.asarray(nodule.ball_centers_mm[0]), nodule.enclosing_radius_mm
    for other in placed:
        gap = np.linalg.norm(core - np.asarray(other.ball_centers_mm[0])) - reach - other.enclosing_radius_mm
        if gap < 2 * margin:
            return False
    index = inverse[:3, :3] @ core + inverse[:3, 3]
    pad = reach / spacing
    return bool(np.all(index - pad >= 0) and np.all(index + pad <= np.asarray(shape) - 1))


def _build_affine(
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
    affine[:3, 0] = row_dir * pixel_spacing_mm[1]  # column index steps by the column spacing
    affine[:3, 1] = col_dir * pixel_spacing_mm[0]  # row index steps by the row spacing
    affine[:3, 2] = normal * slice_spacing_mm * slice_direction_sign
    affine[:3, 3] = origin_mm
    return affine + 0.0  # no negative zeros


def _slabs(shape: tuple[int, int, int]) -> Iterator[tuple[slice, slice, slice]]:
    """Blocks of whole (j, k) planes along i, about _BLOCK_VOXELS each, to bound temporary memory."""
    step = max(1, _BLOCK_VOXELS // (shape[1] * shape[2]))
    for start in range(0, shape[0], step):
        yield (slice(start, min(start + step, shape[0])), slice(0, shape[1]), slice(0, shape[2]))


def _index_box(
    affine: np.ndarray, shape: tuple[int, int, int], lo_mm: np.ndarray, hi_mm: np.ndarray
) -> tuple[slice, slice, slice] | None:
    """Index block holding every voxel center inside the LPS box [lo_mm, hi_mm], or None if empty."""
    corners = np.array(list(itertools.product(*zip(lo_mm, hi_mm, strict=True))))
    inverse = np.linalg.inv(affine)
    index = corners @ inverse[:3, :3].T + inverse[:3, 3]
    start = np.maximum(np.floor(index.min(axis=0)).astype(int), 0)
    stop = np.minimum(np.ceil(index.max(axis=0)).astype(int) + 1, shape)
    if np.any(stop <= start):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))  # type: ignore[return-value]


def _world_mm(affine: np.ndarray, block: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LPS x, y, z of the voxel centers in ``block``, as arrays that broadcast to the block's shape.

    Only the affine terms that are non-zero are summed, so an axial affine gives cheap 1-D coordinates.
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


def _in_unit_ball(rng: np.random.Generator) -> np.ndarray:
    direction = _unit(rng.standard_normal(3), "direction")
    return direction * rng.random() ** (1.0 / 3.0)


def _unit(vector: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float64)
    norm = float(np.linalg.norm(v))
    if v.shape != (3,) or not math.isfinite(norm) or abs(norm) < 1e-9:
        raise ValueError(f"{name} must be a non-zero 3-vector, got {vector}")
    return v / norm


def _vec3(v: Sequence[float] | np.ndarray) -> Vec3:
    return (float(v[0]), float(v[1]), float(v[2]))


def _pair(v: Sequence[float] | np.ndarray) -> tuple[float, float]:
    return (float(v[0]), float(v[1]))
