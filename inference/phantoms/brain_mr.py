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

import math
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
    place_grid,
    slabs,
    vec3,
    voxel_centers_mm,
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

__all__ = [
    "BallUnion",
    "BiasField",
    "BrainLesion",
    "BrainMRParams",
    "Ellipsoid",
    "Tissue",
    "lesion_labels",
    "lesion_mask",
    "make_brain_mr",
    "render_brain_mr",
    "sample_brain_mr_params",
]

LESION_LABEL = "lesion"
LESION_NAMES = LesionNames("lesion", "lesions", region="brain", inside="the brain")
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
FOV_CENTER_RANGES_MM = ((-10, 10), (-10, 10), (-60, 60))  # x, y, z of the field-of-view center, when drawn

_MIN_SHAPE = 16  # drawn matrices and slice counts are at least this


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
class BrainMRParams(SliceGrid):
    """Everything that determines a brain phantom: its grid, then the anatomy; ``render_brain_mr`` voxelises it."""

    tissues: tuple[Tissue, ...]  # head (scalp), skull, csf, grey matter, white matter, 2 ventricles
    lesions: tuple[BrainLesion, ...]
    bias: BiasField
    noise_sigma: float  # of each of the two Gaussian components of the Rician noise
    noise_seed: int

    def tissue(self, name: str) -> Tissue:
        for tissue in self.tissues:
            if tissue.name == name:
                return tissue
        raise KeyError(f"no tissue {name!r}; tissues: {[t.name for t in self.tissues]}")


def make_brain_mr(rng: np.random.Generator | int, **options: Any) -> Phantom:
    """A synthetic brain MR with its planted lesions: ``sample_brain_mr_params`` takes the arguments."""
    return render_brain_mr(sample_brain_mr_params(rng, **options))


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

    pixel_pair, slice_spacing_mm = draw_spacings(
        rng, pixel_spacing_mm, slice_spacing_mm, PIXEL_SPACING_RANGE_MM, SLICE_SPACING_RANGE_MM
    )
    if shape is None:
        fov_mm = rng.uniform(*FOV_RANGE_MM)
        coverage_mm = rng.uniform(*COVERAGE_RANGE_MM)
        columns = max(_MIN_SHAPE, 16 * round(fov_mm / pixel_pair[1] / 16))
        rows = max(_MIN_SHAPE, 16 * round(fov_mm / pixel_pair[0] / 16))
        shape = (columns, rows, max(_MIN_SHAPE, round(coverage_mm / slice_spacing_mm)))
    shape = check_shape(shape)
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
        **grid.grid_fields(),
        tissues=tissues,
        lesions=lesions,
        bias=bias,
        noise_sigma=float(noise_sigma),
        noise_seed=int(rng.integers(2**63 - 1)),
    )


def render_brain_mr(params: BrainMRParams) -> Phantom:
    """Voxelise ``params``: float32 intensities sampled at every voxel center's LPS position."""
    affine = params.affine
    voxels = np.zeros(params.shape, dtype=np.float32)

    for block in slabs(params.shape):
        x, y, z = world_mm(affine, block)
        view = voxels[block]
        for tissue in params.tissues:
            np.copyto(view, np.float32(tissue.intensity), where=tissue.region.contains(x, y, z))

    for lesion in params.lesions:
        paint_partial_volume(voxels, affine, lesion.geometry, lesion.intensity, pad_mm=_lesion_pad_mm(affine))

    noise_rng = np.random.default_rng(params.noise_seed)
    sigma = np.float32(params.noise_sigma)
    for block in slabs(params.shape):
        view = voxels[block]
        view *= params.bias(*world_mm(affine, block)).astype(np.float32)
        if sigma > 0:
            real = view + sigma * noise_rng.standard_normal(view.shape, dtype=np.float32)
            imaginary = sigma * noise_rng.standard_normal(view.shape, dtype=np.float32)
            np.hypot(real, imaginary, out=view)

    lesions = tuple(lesion.geometry.planted(LESION_LABEL) for lesion in params.lesions)
    return Phantom(volume=Volume(voxels=voxels, affine=affine, modality="MR"), lesions=lesions)


def lesion_mask(
    params: BrainMRParams, *, affine: np.ndarray | None = None, shape: Sequence[int] | None = None
) -> np.ndarray:
    """Boolean mask of the voxels whose center lies inside a planted lesion.

    The grid defaults to the phantom's own; pass ``affine`` (voxel index -> LPS mm) and ``shape`` for any
    other, e.g. a model's preprocessed grid. A voxel center inside a lesion is a voxel the rendering
    covers at least half (the partial-volume ramp is centered on the surface).
    """
    return lesion_labels(params, affine=affine, shape=shape) > 0


def lesion_labels(
    params: BrainMRParams, *, affine: np.ndarray | None = None, shape: Sequence[int] | None = None
) -> np.ndarray:
    """:func:`lesion_mask` with each lesion's own value: uint8, 0 outside, n + 1 inside ``params.lesions[n]``
    (lesions do not overlap). The voxel truth of a labelled study (``inference.evaluation.dataset``)."""
    if (affine is None) != (shape is None):
        raise ValueError("pass both affine and shape, or neither")
    affine = params.affine if affine is None else np.asarray(affine, dtype=np.float64)
    grid = params.shape if shape is None else tuple(int(s) for s in shape)
    if len(grid) != 3 or affine.shape != (4, 4):
        raise ValueError(f"need a 3-D shape and a 4x4 affine, got {grid} and {affine.shape}")
    if len(params.lesions) > 255:
        raise ValueError(f"at most 255 lesions fit a uint8 label map, got {len(params.lesions)}")
    labels = np.zeros(grid, dtype=np.uint8)
    for number, lesion in enumerate(params.lesions, start=1):
        block = lesion.geometry.index_block(affine, grid, _lesion_pad_mm(affine))
        if block is None:
            continue
        inside = lesion.geometry.signed_distance_mm(voxel_centers_mm(affine, block)) <= 0
        labels[block][inside] = number
    return labels


def _lesion_pad_mm(affine: np.ndarray) -> float:
    """Margin around a lesion's enclosing ball that holds its partial-volume ramp: the largest voxel extent."""
    return float(np.abs(affine[:3, :3]).sum(axis=1).max())


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
        tissues.append(Tissue(name, Ellipsoid(vec3(center), vec3(semi)), intensity))
    ventricle_semi = scale * np.array([rng.uniform(3.5, 6.0), rng.uniform(14.0, 22.0), rng.uniform(7.0, 12.0)])
    offset = scale * np.array([rng.uniform(5.0, 8.0), rng.uniform(-8.0, 4.0), rng.uniform(0.0, 12.0)])
    for side in (-1.0, 1.0):
        ventricle_center = center + offset * np.array([side, 1.0, 1.0])
        tissues.append(Tissue("ventricle", Ellipsoid(vec3(ventricle_center), vec3(ventricle_semi)), csf))
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
    d_cap = min(LESION_DIAMETER_RANGE_MM[1], 0.9 * largest_fit / MAX_REACH_PER_DIAMETER)
    diameters = requested_diameters(
        rng,
        LESION_NAMES,
        n_lesions,
        diameters_mm,
        max_count=MAX_LESIONS,
        min_diameter_mm=LESION_DIAMETER_RANGE_MM[0],
        cap_mm=d_cap,
    )
    if contrasts is not None and (len(contrasts) != len(diameters) or any(c not in CONTRASTS for c in contrasts)):
        raise ValueError(f"lesion_contrasts must hold one of {CONTRASTS} per lesion, got {list(contrasts)}")
    log_range = (math.log(LESION_DIAMETER_RANGE_MM[0]), math.log(max(d_cap, LESION_DIAMETER_RANGE_MM[0])))
    inverse = np.linalg.inv(affine)

    def propose(index: int, diameter: float, placed: list[BrainLesion]) -> BrainLesion | None:
        offsets, radii = draw_lobulated(rng, diameter)
        center = draw_core_center(rng, brain, radii[0] + margin)
        if center is None:
            return None
        geometry = BallUnion(tuple(vec3(center + o) for o in offsets), tuple(float(r) for r in radii))
        if not fits_inside(geometry, brain, [p.geometry for p in placed], margin, inverse, spacing, shape):
            return None
        contrast = contrasts[index] if contrasts is not None else str(rng.choice(CONTRASTS))
        local = white if white_matter.contains(*center) else grey
        intensity = local * rng.uniform(
            *(BRIGHT_LESION_TO_LOCAL_RANGE if contrast == "bright" else DARK_LESION_TO_LOCAL_RANGE)
        )
        return BrainLesion(geometry, float(intensity), contrast)

    return place_by_rejection(
        LESION_NAMES,
        diameters,
        lambda: math.exp(rng.uniform(*log_range)),
        propose,
        give_up_quietly=diameters_mm is None and n_lesions is None,
    )
