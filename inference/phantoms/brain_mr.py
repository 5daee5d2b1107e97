"""Synthetic T1-like brain MR with planted lesions, for training, tests, the demo and benchmarks.

The anatomy is defined analytically in DICOM patient coordinates (LPS, mm), as for the chest phantom:
nested ellipsoids for the head (scalp), the skull, the CSF around the brain, the cortical grey matter and
the white matter, plus two ventricles. Each lesion is a sphere, optionally lobulated with 1-3 overlapping
bumps (like the chest nodules), brighter or darker than the tissue at its center (white or grey matter) by
a drawn factor, so a dark lesion in white matter can be as dark as grey matter. The affine is
built first; every voxel is the anatomy sampled at the LPS position of its center, so the ground truth is
right for any orientation, flip or origin.

On top of the anatomy: a smooth multiplicative bias field (the exponential of a quadratic polynomial of
the position) and Rician noise (the magnitude of the signal plus complex Gaussian noise), so the
background is not exactly zero, as on a scanner. Intensities are arbitrary MR units, about 0-1100.

:func:`lesion_mask` evaluates the analytic lesions at the voxel centers of any grid: the voxel-level ground
truth for training and Dice, on the phantom's own grid or on a model's resampled grid.
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

__all__ = [
    "BallUnion",
    "BiasField",
    "BrainLesion",
    "BrainMRParams",
    "Ellipsoid",
    "Tissue",
    "lesion_mask",
    "make_brain_mr",
    "render_brain_mr",
    "sample_brain_mr_params",
]

Vec3 = tuple[float, float, float]

LESION_LABEL = "lesion"
CONTRASTS = ("bright", "dark")

# Ranges drawn from when an argument is left None.
FOV_RANGE_MM = (200.0, 250.0)  # in plane; the matrix is the FOV over the pixel spacing, a multiple of 16
COVERAGE_RANGE_MM = (90.0, 170.0)  # along the slice axis; the slice count is the coverage over the slice spacing
PIXEL_SPACING_RANGE_MM = (0.8, 1.5)
SLICE_SPACING_RANGE_MM = (1.0, 5.0)
MAX_LESIONS = 3
LESION_DIAMETER_RANGE_MM = (5.0, 40.0)  # drawn log-uniformly: small lesions are the common ones
HEAD_SEMI_AXES_RANGE_MM = ((66.0, 76.0), (84.0, 96.0), (78.0, 92.0))  # x (L-R), y (A-P), z (S-I)
SCALP_THICKNESS_RANGE_MM = (4.0, 7.0)
SKULL_THICKNESS_RANGE_MM = (4.0, 8.0)
CSF_THICKNESS_RANGE_MM = (1.5, 3.0)
CORTEX_THICKNESS_RANGE_MM = (3.0, 5.0)
WHITE_MATTER_RANGE = (600.0, 720.0)
GREY_TO_WHITE_RANGE = (0.62, 0.72)
CSF_RANGE = (100.0, 200.0)
SKULL_RANGE = (40.0, 110.0)
SCALP_RANGE = (650.0, 850.0)
# Lesion intensity x the tissue at the lesion's center (white matter, else grey matter). Bright lesions in white
# matter are brighter than any brain tissue; dark ones in white matter overlap grey matter: only their shape and
# place tell them from cortex. Dark lesions stay brighter than CSF.
BRIGHT_LESION_TO_LOCAL_RANGE = (1.25, 1.6)
DARK_LESION_TO_LOCAL_RANGE = (0.5, 0.8)
NOISE_SIGMA_TO_WHITE_RANGE = (0.015, 0.04)
BIAS_AMPLITUDE_RANGE = (0.05, 0.2)  # typical relative deviation of the bias field across the head

_PLACEMENT_ATTEMPTS = 400
_MIN_SHAPE = 16  # drawn matrices and slice counts are at least this
_BLOCK_VOXELS = 1 << 22  # voxels per slab when rendering the whole volume
_VOLUME_GRID = 64  # samples per axis when integrating a lobulated lesion
_SUBSAMPLE_MM = 0.4  # supersampling step inside voxels cut by a lesion surface
# Bumps sit at 0.70-0.90 core radii with radii 0.30-0.45: nothing reaches past 0.58 diameters from the core center.
_MAX_REACH_PER_DIAMETER = 0.58


@dataclass(frozen=True)
class Ellipsoid:
    """Axis-aligned ellipsoid in LPS mm."""

    center_mm: Vec3
    semi_axes_mm: Vec3

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Points inside; the per-axis terms broadcast, so axial voxel grids stay cheap."""
        (cx, cy, cz), (ax, ay, az) = self.center_mm, self.semi_axes_mm
        return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 <= 1.0

    def contains_ball(self, center_mm: np.ndarray, radius_mm: float) -> bool:
        """Conservative test that a ball lies inside.

        If the center lies on the ellipsoid scaled by s about its center, the ball of radius
        (1 - s) * min semi-axis around it is inside (convexity): a ball that pokes out is never accepted.
        """
        s = float(np.linalg.norm((np.asarray(center_mm) - self.center_mm) / np.asarray(self.semi_axes_mm)))
        return s < 1.0 and radius_mm <= (1.0 - s) * min(self.semi_axes_mm)


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
            return _vec3(c0), 4.0 / 3.0 * math.pi * self.ball_radii_mm[0] ** 3
        half = self.enclosing_radius_mm
        step = 2.0 * half / _VOLUME_GRID
        ticks = -half + step * (np.arange(_VOLUME_GRID) + 0.5)
        points = np.stack(np.meshgrid(ticks, ticks, ticks, indexing="ij"), axis=-1).reshape(-1, 3) + c0
        inside = self.signed_distance_mm(points) <= 0
        return _vec3(points[inside].mean(axis=0)), float(inside.sum()) * step**3

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
        are wholly in or out; the others are supersampled on a regular grid of about _SUBSAMPLE_MM.
        """
        distance = self.signed_distance_mm(centers_mm)
        fraction = (distance < 0).astype(np.float32)
        edge = np.abs(distance) < 0.5 * float(np.linalg.norm(np.linalg.norm(steps_mm, axis=0)))
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
class Tissue:
    """An ellipsoid filled with one intensity. Tissues are painted in order, so inner ones come last."""

    name: str
    region: Ellipsoid
    intensity: float


@dataclass(frozen=True)
class BrainLesion:
    geometry: BallUnion
    intensity: float
    contrast: str  # "bright" or "dark"


@dataclass(frozen=True)
class BiasField:
    """exp(sum of c_n * monomial_n(u)) with u = (xyz - center) / scale: x, y, z, x², y², z², xy, xz, yz."""

    center_mm: Vec3
    scale_mm: Vec3
    coefficients: tuple[float, ...]  # 9, in the order above

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        u = [(w - c) / s for w, c, s in zip((x, y, z), self.center_mm, self.scale_mm, strict=True)]
        monomials = (u[0], u[1], u[2], u[0] ** 2, u[1] ** 2, u[2] ** 2, u[0] * u[1], u[0] * u[2], u[1] * u[2])
        exponent = sum(c * m for c, m in zip(self.coefficients, monomials, strict=True))
        return np.exp(exponent)


@dataclass(frozen=True)
class BrainMRParams:
    """Everything that determines a brain phantom; ``render_brain_mr`` turns it into voxels."""

    shape: tuple[int, int, int]  # (columns, rows, slices)
    pixel_spacing_mm: tuple[float, float]  # DICOM order: (row spacing, column spacing)
    slice_spacing_mm: float
    row_direction: Vec3  # ImageOrientationPatient[0:3]
    column_direction: Vec3  # ImageOrientationPatient[3:6]
    slice_direction_sign: int  # +1: slices step towards +z (superior), -1: opposite
    origin_mm: Vec3  # ImagePositionPatient of slice 0
    tissues: tuple[Tissue, ...]  # head (scalp), skull, csf, grey matter, white matter, 2 ventricles
    lesions: tuple[BrainLesion, ...]
    bias: BiasField
    noise_sigma: float  # of each of the two Gaussian components of the Rician noise
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

    def tissue(self, name: str) -> Tissue:
        for tissue in self.tissues:
            if tissue.name == name:
                return tissue
        raise KeyError(f"no tissue {name!r}; tissues: {[t.name for t in self.tissues]}")


def make_brain_mr(
    rng: np.random.Generator | int,
    *,
    shape: tuple[int, int, int] | None = None,
    pixel_spacing_mm: float | tuple[float, float] | None = None,
    slice_spacing_mm: float | None = None,
    n_lesions: int | None = None,
    lesion_diameters_mm: Sequence[float] | None = None,
    lesion_contrasts: Sequence[str] | None = None,
    row_direction: Sequence[float] | None = None,
    column_direction: Sequence[float] | None = None,
    origin_mm: Sequence[float] | None = None,
    slice_direction_sign: int | None = None,
    noise_sigma: float | None = None,
    bias_amplitude: float | None = None,
) -> Phantom:
    """A synthetic brain MR with its planted lesions; see ``sample_brain_mr_params`` for the arguments."""
    return render_brain_mr(
        sample_brain_mr_params(
            rng,
            shape=shape,
            pixel_spacing_mm=pixel_spacing_mm,
            slice_spacing_mm=slice_spacing_mm,
            n_lesions=n_lesions,
            lesion_diameters_mm=lesion_diameters_mm,
            lesion_contrasts=lesion_contrasts,
            row_direction=row_direction,
            column_direction=column_direction,
            origin_mm=origin_mm,
            slice_direction_sign=slice_direction_sign,
            noise_sigma=noise_sigma,
            bias_amplitude=bias_amplitude,
        )
    )


def sample_brain_mr_params(
    rng: np.random.Generator | int,
    *,
    shape: tuple[int, int, int] | None = None,
    pixel_spacing_mm: float | tuple[float, float] | None = None,
    slice_spacing_mm: float | None = None,
    n_lesions: int | None = None,
    lesion_diameters_mm: Sequence[float] | None = None,
    lesion_contrasts: Sequence[str] | None = None,
    row_direction: Sequence[float] | None = None,
    column_direction: Sequence[float] | None = None,
    origin_mm: Sequence[float] | None = None,
    slice_direction_sign: int | None = None,
    noise_sigma: float | None = None,
    bias_amplitude: float | None = None,
) -> BrainMRParams:
    """Draw a brain phantom; every argument left None is drawn from ``rng``.

    ``shape`` is (columns, rows, slices); drawn, it covers a 200-250 mm field of view in plane and
    90-170 mm along the slices. A scalar ``pixel_spacing_mm`` means square pixels; a pair is DICOM
    PixelSpacing order (row spacing, column spacing). Drawn orientations are axial with random flips.
    The head keeps realistic sizes when the field of view allows and shrinks to fit otherwise.
    ``lesion_diameters_mm`` fixes the longest extent of each lesion, ``lesion_contrasts`` ("bright" or
    "dark", one per lesion) their contrast. ``noise_sigma`` is in intensity units; ``bias_amplitude`` is
    the typical relative deviation of the bias field (0: none). Raises ValueError when a requested
    lesion cannot be placed inside the brain.
    """
    rng = np.random.default_rng(rng)

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
    if shape is None:
        fov_mm = rng.uniform(*FOV_RANGE_MM)
        coverage_mm = rng.uniform(*COVERAGE_RANGE_MM)
        columns = max(_MIN_SHAPE, 16 * round(fov_mm / pixel_pair[1] / 16))
        rows = max(_MIN_SHAPE, 16 * round(fov_mm / pixel_pair[0] / 16))
        shape = (columns, rows, max(_MIN_SHAPE, round(coverage_mm / slice_spacing_mm)))
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive sizes (columns, rows, slices), got {shape}")
    shape = (int(shape[0]), int(shape[1]), int(shape[2]))
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
        fov_center = np.array([rng.uniform(-10, 10), rng.uniform(-10, 10), rng.uniform(-60, 60)])
        origin = fov_center - steps[:3, :3] @ mid_index
    else:
        origin = np.asarray(origin_mm, dtype=np.float64)
        fov_center = origin + steps[:3, :3] @ mid_index
    affine = steps.copy()
    affine[:3, 3] = origin
    # Half extents of the voxel-center grid along x, y, z; a single slice still has thickness.
    half = 0.5 * np.abs(steps[:3, :3]) @ (np.asarray(shape, dtype=np.float64) - 1.0)
    half = np.maximum(half, 0.5 * np.abs(steps[:3, :3]).sum(axis=1))

    tissues = _draw_anatomy(rng, fov_center, half)
    named = {tissue.name: tissue for tissue in tissues}
    white, grey = named["white matter"].intensity, named["grey matter"].intensity
    lesions = _draw_lesions(
        rng,
        affine,
        shape,
        half,
        named["grey matter"].region,
        named["white matter"].region,
        white,
        grey,
        n_lesions,
        lesion_diameters_mm,
        lesion_contrasts,
    )
    if noise_sigma is None:
        noise_sigma = float(rng.uniform(*NOISE_SIGMA_TO_WHITE_RANGE)) * white
    if noise_sigma < 0:
        raise ValueError(f"noise_sigma must be >= 0, got {noise_sigma}")
    if bias_amplitude is None:
        bias_amplitude = float(rng.uniform(*BIAS_AMPLITUDE_RANGE))
    if bias_amplitude < 0:
        raise ValueError(f"bias_amplitude must be >= 0, got {bias_amplitude}")
    head = named["head"].region
    # Unit-variance-ish monomials over the head: spread the amplitude over the 9 terms.
    bias = BiasField(
        center_mm=head.center_mm,
        scale_mm=head.semi_axes_mm,
        coefficients=tuple(float(c) for c in rng.normal(0.0, bias_amplitude / 3.0, size=9)),
    )
    return BrainMRParams(
        shape=shape,
        pixel_spacing_mm=pixel_pair,
        slice_spacing_mm=float(slice_spacing_mm),
        row_direction=_vec3(row_dir),
        column_direction=_vec3(col_dir),
        slice_direction_sign=int(slice_direction_sign),
        origin_mm=_vec3(origin),
        tissues=tissues,
        lesions=lesions,
        bias=bias,
        noise_sigma=float(noise_sigma),
        noise_seed=int(rng.integers(2**63 - 1)),
    )


def render_brain_mr(params: BrainMRParams) -> Phantom:
    """Voxelise ``params``: float32 intensities sampled at every voxel center's LPS position."""
    affine = params.affine
    steps = affine[:3, :3]
    voxels = np.zeros(params.shape, dtype=np.float32)

    for block in _slabs(params.shape):
        x, y, z = _world_mm(affine, block)
        view = voxels[block]
        for tissue in params.tissues:
            np.copyto(view, np.float32(tissue.intensity), where=tissue.region.contains(x, y, z))

    for lesion in params.lesions:
        block = _lesion_block(lesion.geometry, affine, params.shape)
        if block is None:
            continue
        view = voxels[block]
        centers = np.stack(np.broadcast_arrays(*_world_mm(affine, block)), axis=-1)
        fraction = lesion.geometry.coverage(centers, steps)
        view += fraction * (np.float32(lesion.intensity) - view)

    noise_rng = np.random.default_rng(params.noise_seed)
    sigma = np.float32(params.noise_sigma)
    for block in _slabs(params.shape):
        view = voxels[block]
        view *= params.bias(*_world_mm(affine, block)).astype(np.float32)
        if sigma > 0:
            real = view + sigma * noise_rng.standard_normal(view.shape, dtype=np.float32)
            imaginary = sigma * noise_rng.standard_normal(view.shape, dtype=np.float32)
            np.hypot(real, imaginary, out=view)

    lesions = []
    for lesion in params.lesions:
        centroid, volume_mm3 = lesion.geometry.centroid_and_volume()
        lesions.append(
            PlantedLesion(
                label=LESION_LABEL,
                center_mm=centroid,
                diameter_mm=lesion.geometry.diameter_mm,
                volume_ml=volume_mm3 / 1000.0,
            )
        )
    return Phantom(volume=Volume(voxels=voxels, affine=affine, modality="MR"), lesions=tuple(lesions))


def lesion_mask(
    params: BrainMRParams, *, affine: np.ndarray | None = None, shape: Sequence[int] | None = None
) -> np.ndarray:
    """Boolean mask of the voxels whose center lies inside a planted lesion.

    The grid defaults to the phantom's own; pass ``affine`` (voxel index -> LPS mm) and ``shape`` for any
    other, e.g. a model's preprocessed grid. A voxel center inside a lesion is a voxel the rendering
    covers at least half (the partial-volume ramp is centered on the surface).
    """
    if (affine is None) != (shape is None):
        raise ValueError("pass both affine and shape, or neither")
    affine = params.affine if affine is None else np.asarray(affine, dtype=np.float64)
    grid = params.shape if shape is None else tuple(int(s) for s in shape)
    if len(grid) != 3 or affine.shape != (4, 4):
        raise ValueError(f"need a 3-D shape and a 4x4 affine, got {grid} and {affine.shape}")
    mask = np.zeros(grid, dtype=bool)
    for lesion in params.lesions:
        block = _lesion_block(lesion.geometry, affine, grid)  # type: ignore[arg-type]
        if block is None:
            continue
        centers = np.stack(np.broadcast_arrays(*_world_mm(affine, block)), axis=-1)
        mask[block] |= lesion.geometry.signed_distance_mm(centers) <= 0
    return mask


def _lesion_block(geometry: BallUnion, affine: np.ndarray, shape: tuple[int, int, int]) -> tuple[slice, ...] | None:
    """Index block holding the lesion and its partial-volume ramp."""
    reach = geometry.enclosing_radius_mm + float(np.abs(affine[:3, :3]).sum(axis=1).max())
    center = np.asarray(geometry.ball_centers_mm[0])
    return _index_box(affine, shape, center - reach, center + reach)


def _draw_anatomy(rng: np.random.Generator, fov_center: np.ndarray, half: np.ndarray) -> tuple[Tissue, ...]:
    """Nested head layers and ventricles, at realistic sizes shrunk to fit the in-plane field of view."""
    head_semi = np.array([rng.uniform(*r) for r in HEAD_SEMI_AXES_RANGE_MM])
    scale = min(1.0, 0.92 * half[0] / head_semi[0], 0.92 * half[1] / head_semi[1])
    head_semi *= scale
    center = fov_center + np.array(
        [rng.uniform(-0.03, 0.03) * half[0], rng.uniform(-0.03, 0.03) * half[1], rng.uniform(-0.15, 0.15) * half[2]]
    )
    white = float(rng.uniform(*WHITE_MATTER_RANGE))
    grey = white * float(rng.uniform(*GREY_TO_WHITE_RANGE))
    csf = float(rng.uniform(*CSF_RANGE))
    layers = [
        ("head", 0.0, float(rng.uniform(*SCALP_RANGE))),
        ("skull", rng.uniform(*SCALP_THICKNESS_RANGE_MM), float(rng.uniform(*SKULL_RANGE))),
        ("csf", rng.uniform(*SKULL_THICKNESS_RANGE_MM), csf),
        ("grey matter", rng.uniform(*CSF_THICKNESS_RANGE_MM), grey),
        ("white matter", rng.uniform(*CORTEX_THICKNESS_RANGE_MM), white),
    ]
    tissues = []
    semi = head_semi.copy()
    for name, depth_mm, intensity in layers:  # each layer starts ``depth_mm`` inside the previous one
        semi = semi - scale * depth_mm
        tissues.append(Tissue(name, Ellipsoid(_vec3(center), _vec3(semi)), intensity))
    ventricle_semi = scale * np.array([rng.uniform(3.5, 6.0), rng.uniform(14.0, 22.0), rng.uniform(7.0, 12.0)])
    offset = scale * np.array([rng.uniform(5.0, 8.0), rng.uniform(-8.0, 4.0), rng.uniform(0.0, 12.0)])
    for side in (-1.0, 1.0):
        ventricle_center = center + offset * np.array([side, 1.0, 1.0])
        tissues.append(Tissue("ventricle", Ellipsoid(_vec3(ventricle_center), _vec3(ventricle_semi)), csf))
    return tuple(tissues)


def _draw_lesions(
    rng: np.random.Generator,
    affine: np.ndarray,
    shape: tuple[int, int, int],
    half: np.ndarray,
    brain: Ellipsoid,
    white_matter: Ellipsoid,
    white: float,
    grey: float,
    n_lesions: int | None,
    diameters_mm: Sequence[float] | None,
    contrasts: Sequence[str] | None,
) -> tuple[BrainLesion, ...]:
    """Place non-overlapping lesions inside the brain (they may cover ventricles) by rejection sampling."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    # The soft edge reaches at most half a voxel diagonal outwards; the margin keeps it in the brain.
    margin = 0.5 * float(np.linalg.norm(spacing)) + 0.5
    largest_fit = min(*brain.semi_axes_mm, *half) - margin
    d_cap = min(LESION_DIAMETER_RANGE_MM[1], 0.9 * largest_fit / _MAX_REACH_PER_DIAMETER)

    if diameters_mm is not None:
        diameters: list[float | None] = [float(d) for d in diameters_mm]
        if n_lesions is not None and n_lesions != len(diameters):
            raise ValueError(f"n_lesions={n_lesions} but {len(diameters)} lesion diameters given")
        if any(d <= 0 for d in diameters):  # type: ignore[operator]
            raise ValueError(f"lesion diameters must be positive, got {list(diameters_mm)}")
    else:
        drawn_count = n_lesions is None
        count = int(rng.integers(0, MAX_LESIONS + 1)) if drawn_count else int(n_lesions)  # type: ignore[arg-type]
        if count < 0:
            raise ValueError(f"n_lesions must be >= 0, got {n_lesions}")
        if count and d_cap < LESION_DIAMETER_RANGE_MM[0]:
            if not drawn_count:
                raise ValueError(f"brain too small for a {LESION_DIAMETER_RANGE_MM[0]} mm lesion in this field of view")
            logger.debug("brain too small for lesions (largest fitting diameter %.1f mm); planting none", d_cap)
            count = 0
        diameters = [None] * count
    if contrasts is not None and (len(contrasts) != len(diameters) or any(c not in CONTRASTS for c in contrasts)):
        raise ValueError(f"lesion_contrasts must hold one of {CONTRASTS} per lesion, got {list(contrasts)}")
    log_range = (math.log(LESION_DIAMETER_RANGE_MM[0]), math.log(max(d_cap, LESION_DIAMETER_RANGE_MM[0])))

    inverse = np.linalg.inv(affine)
    placed: list[BrainLesion] = []
    for index, requested in enumerate(diameters):
        for _ in range(_PLACEMENT_ATTEMPTS):
            diameter = requested if requested is not None else math.exp(rng.uniform(*log_range))
            offsets, radii = _lesion_shape(rng, diameter)
            scale = 1.0 - (radii[0] + margin) / min(brain.semi_axes_mm)
            if scale <= 0:
                continue
            center = np.asarray(brain.center_mm) + np.asarray(brain.semi_axes_mm) * scale * _in_unit_ball(rng)
            geometry = BallUnion(tuple(_vec3(center + o) for o in offsets), tuple(float(r) for r in radii))
            if _fits(geometry, brain, [p.geometry for p in placed], margin, inverse, spacing, shape):
                contrast = contrasts[index] if contrasts is not None else str(rng.choice(CONTRASTS))
                local = white if white_matter.contains(*center) else grey
                intensity = local * rng.uniform(
                    *(BRIGHT_LESION_TO_LOCAL_RANGE if contrast == "bright" else DARK_LESION_TO_LOCAL_RANGE)
                )
                placed.append(BrainLesion(geometry, float(intensity), contrast))
                break
        else:
            if diameters_mm is None and n_lesions is None:
                logger.debug("no room for more lesions in this field of view; planting %d", len(placed))
                break
            raise ValueError(
                f"could not place a {diameter:.1f} mm lesion inside the brain of this field of view "
                f"next to {len(placed)} others"
            )
    return tuple(placed)


def _lesion_shape(rng: np.random.Generator, diameter_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Ball offsets from the core center and radii; half the time 1-3 bumps. Longest extent = ``diameter_mm``."""
    offsets, radii = [np.zeros(3)], [1.0]
    if rng.random() < 0.5:
        for _ in range(int(rng.integers(1, 4))):
            offsets.append(_unit(rng.standard_normal(3), "bump direction") * rng.uniform(0.70, 0.90))
            radii.append(float(rng.uniform(0.30, 0.45)))
    unit = BallUnion(tuple(_vec3(o) for o in offsets), tuple(radii))
    scale = diameter_mm / unit.diameter_mm
    return np.asarray(offsets) * scale, np.asarray(radii) * scale


def _fits(
    lesion: BallUnion,
    brain: Ellipsoid,
    placed: Sequence[BallUnion],
    margin: float,
    inverse: np.ndarray,
    spacing: np.ndarray,
    shape: tuple[int, int, int],
) -> bool:
    """Inside the brain with ``margin``, ``2 * margin`` clear of the other lesions, wholly inside the grid."""
    for center, radius in zip(lesion.ball_centers_mm, lesion.ball_radii_mm, strict=True):
        if not brain.contains_ball(np.asarray(center), radius + margin):
            return False
    core, reach = np.asarray(lesion.ball_centers_mm[0]), lesion.enclosing_radius_mm
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
    """Voxel-center index (column, row, slice) -> LPS mm, per the Volume convention (as the chest phantom)."""
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


def _slabs(shape: tuple[int, int, int]) -> Iterator[tuple[slice, slice, slice]]:
    """Blocks of whole (j, k) planes along i, about _BLOCK_VOXELS each, to bound temporary memory."""
    step = max(1, _BLOCK_VOXELS // (shape[1] * shape[2]))
    for start in range(0, shape[0], step):
        yield (slice(start, min(start + step, shape[0])), slice(0, shape[1]), slice(0, shape[2]))


def _index_box(
    affine: np.ndarray, shape: Sequence[int], lo_mm: np.ndarray, hi_mm: np.ndarray
) -> tuple[slice, slice, slice] | None:
    """Index block holding every voxel center inside the LPS box [lo_mm, hi_mm], or None if empty."""
    corners = np.array(list(itertools.product(*zip(lo_mm, hi_mm, strict=True))))
    inverse = np.linalg.inv(affine)
    index = corners @ inverse[:3, :3].T + inverse[:3, 3]
    start = np.maximum(np.floor(index.min(axis=0)).astype(int), 0)
    stop = np.minimum(np.ceil(index.max(axis=0)).astype(int) + 1, np.asarray(shape))
    if np.any(stop <= start):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))  # type: ignore[return-value]


def _world_mm(affine: np.ndarray, block: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def _in_unit_ball(rng: np.random.Generator) -> np.ndarray:
    direction = _unit(rng.standard_normal(3), "direction")
    return direction * rng.random() ** (1.0 / 3.0)


def _unit(vector: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float64)
    norm = float(np.linalg.norm(v))
    if v.shape != (3,) or not math.isfinite(norm) or norm < 1e-9:
        raise ValueError(f"{name} must be a non-zero 3-vector, got {vector}")
    return v / norm


def _vec3(v: Sequence[float] | np.ndarray) -> Vec3:
    return (float(v[0]), float(v[1]), float(v[2]))
