"""Synthetic PA chest radiographs with planted round opacities, and a DX / CR DICOM writer for them.

Coordinates are the projection contract's image-plane mm (DESIGN.md): ``x = column index x column
spacing``, ``y = row index x row spacing``, measured from the center of the top-left pixel. The anatomy
is defined analytically in these mm and scaled to the field of view; every pixel's value is the anatomy
sampled at the pixel's center. The ground truth is therefore independent of the pixel grid, and the same
:class:`ChestXrayParams` render at full resolution or straight onto a model's coarser input grid
(:func:`render_chest_xray` with a :class:`PixelGrid`), which is how training makes images fast.

Image model: an attenuation map (soft tissue about 1, the lung fields darker, ribs, clavicles, spine,
mediastinum and heart brighter, air outside the body 0, a faint lung texture, Gaussian noise) mapped
linearly onto unsigned integers of ``bits_stored`` bits. Displayed as usual, a chest is viewed as if
facing the patient: the patient's left (the heart) is on the right of the image, PatientOrientation L\\F.

Photometric convention: ``Phantom.volume.voxels`` always holds values in the MONOCHROME2 sense (higher =
more attenuation = brighter), i.e. what a DICOM reader returns once it has inverted a MONOCHROME1 image.
``ChestXrayPhantom.photometric`` says how :func:`~inference.phantoms.writers.write_xray_dicom` stores them: a
MONOCHROME1 file holds ``2**bits_stored - 1 - value`` (high = dark). The Volume is (X = columns, Y = rows, 1) with an
identity-direction affine: column spacing on axis 0, row spacing on axis 1, origin 0, so
``Volume.voxel_to_lps`` of a pixel index gives its image-plane mm directly.

Ground truth: one :class:`~inference.phantoms.base.PlantedLesion` per opacity, label ``"opacity"``, with
``center_mm`` the 2-tuple ``(x, y)`` in image-plane mm (not the 3-D LPS of the base type) and
``diameter_mm`` the opacity's diameter.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from inference.io.volume import Volume
from inference.phantoms.base import Phantom, PlantedLesion
from inference.phantoms.geometry import spacing_pair
from inference.phantoms.lesions import LesionNames, place_by_rejection, requested_diameters
from inference.phantoms.xray_drawing import (
    add_opacity,
    clavicle_segments,
    draw_bar,
    draw_ribs,
    grid_block,
    smoothstep,
    texture,
)

logger = logging.getLogger(__name__)

XRAY_MODALITIES = ("DX", "CR")
PHOTOMETRICS = ("MONOCHROME2", "MONOCHROME1")
BITS_STORED_CHOICES = (12, 16)
SPACING_TAGS = ("ImagerPixelSpacing", "PixelSpacing", "both")
OPACITY_LABEL = "opacity"
OPACITY_NAMES = LesionNames("opacity", "opacities", region="lungs", inside="the lung fields")

# Ranges drawn from when an argument is left None.
SIZE_RANGE_PX = (1024, 3000)
ASPECT_RANGE = (0.82, 1.22)  # columns / rows
PIXEL_SPACING_RANGE_MM = (0.1, 0.2)
FOV_RANGE_MM = (150.0, 450.0)  # drawn spacings keep the field of view in this range
MAX_OPACITIES = 3
OPACITY_DIAMETER_RANGE_MM = (8.0, 40.0)
OPACITY_CONTRAST_RANGE = (0.2, 0.45)  # peak attenuation added over the lung (lung ~0.45-0.6, tissue ~1)
NOISE_SIGMA_RANGE = (0.02, 0.06)  # attenuation units, per pixel of the native grid

ATTENUATION_REF = 2.0  # attenuation mapped to ``value_high``
CLAVICLE_ATTENUATION = 0.25
_MIN_SIZE_PX = 64
_RIM_SAMPLES = 48  # points on an opacity's rim tested against the anatomy when placing it


@dataclass(frozen=True)
class PixelGrid:
    """Where pixels sit in image-plane mm: pixel (column c, row r) has its center at ``origin + (c, r) * spacing``."""

    shape: tuple[int, int]  # (rows, columns)
    spacing_mm: tuple[float, float]  # DICOM order: (row spacing, column spacing)
    origin_mm: tuple[float, float] = (0.0, 0.0)  # (x, y) of the center of pixel (0, 0)

    def __post_init__(self) -> None:
        if len(self.shape) != 2 or min(self.shape) < 1:
            raise ValueError(f"PixelGrid.shape must be two positive sizes (rows, columns), got {self.shape}")
        if len(self.spacing_mm) != 2 or min(self.spacing_mm) <= 0:
            raise ValueError(f"PixelGrid.spacing_mm must be two positive spacings, got {self.spacing_mm}")

    def x_mm(self) -> np.ndarray:
        return self.origin_mm[0] + np.arange(self.shape[1], dtype=np.float64) * self.spacing_mm[1]

    def y_mm(self) -> np.ndarray:
        return self.origin_mm[1] + np.arange(self.shape[0], dtype=np.float64) * self.spacing_mm[0]


@dataclass(frozen=True)
class Ellipse:
    """Axis-aligned ellipse in image-plane mm; a lung field, the heart, the body outline."""

    center_mm: tuple[float, float]
    semi_axes_mm: tuple[float, float]

    def normalized_radius(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """< 1 inside, 1 on the outline; ``x`` and ``y`` broadcast."""
        (cx, cy), (ax, ay) = self.center_mm, self.semi_axes_mm
        return np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)

    def weight(self, x: np.ndarray, y: np.ndarray, edge_mm: float) -> np.ndarray:
        """Smooth indicator: 1 well inside, 0 well outside, a smoothstep about ``edge_mm`` wide across the outline."""
        depth_mm = (1.0 - self.normalized_radius(x, y)) * math.sqrt(self.semi_axes_mm[0] * self.semi_axes_mm[1])
        return smoothstep(0.5 + depth_mm / edge_mm)


@dataclass(frozen=True)
class Ribs:
    """A family of rib shadows: bands along ``y = top + n * pitch + sag * u**2 - rise * u`` on each side.

    ``u`` is the lateral distance from the midline divided by ``lateral_extent_mm``; posterior ribs sag
    laterally (``sag > 0``), anterior ribs rise laterally (``rise > 0``).
    """

    top_mm: float
    pitch_mm: float
    count: int
    sag_mm: float
    rise_mm: float
    width_fraction: float  # band width / pitch
    lateral_extent_mm: float
    attenuation: float


@dataclass(frozen=True)
class Opacity:
    center_mm: tuple[float, float]  # (x, y) image-plane mm
    diameter_mm: float
    contrast: float  # attenuation added at the center
    profile_power: float  # attenuation = contrast * (1 - (d / r)**2) ** power: 0.5 is a projected ball


@dataclass(frozen=True)
class ChestXrayParams:
    """Everything that determines a chest radiograph; :func:`render_chest_xray` turns it into pixels."""

    size_px: tuple[int, int]  # (rows, columns)
    pixel_spacing_mm: tuple[float, float]  # DICOM order: (row spacing, column spacing)
    modality: str  # DX | CR
    photometric: str  # how the image is stored in DICOM: MONOCHROME2 | MONOCHROME1
    bits_stored: int  # 12 | 16
    midline_mm: float  # x of the spine
    body: Ellipse
    lungs: tuple[Ellipse, Ellipse]  # image left (patient right), image right (patient left)
    heart: Ellipse
    mediastinum_half_width_mm: float
    mediastinum_bottom_mm: float  # y where the mediastinum band fades into the heart and abdomen
    spine_half_width_mm: float
    posterior_ribs: Ribs
    anterior_ribs: Ribs
    clavicle_y_mm: float
    clavicle_half_thickness_mm: float
    opacities: tuple[Opacity, ...]
    edge_mm: float  # width of the soft outlines
    tissue_attenuation: float
    lung_drop: float  # attenuation removed in the lung fields
    mediastinum_attenuation: float
    heart_attenuation: float
    spine_attenuation: float
    texture_amplitude: float
    texture_cell_mm: float
    texture_seed: int
    vertical_gradient: float  # relative attenuation change from top to bottom (beam heel, patient shape)
    value_low: float  # stored value (MONOCHROME2 sense) of zero attenuation
    value_high: float  # stored value of ATTENUATION_REF
    noise_sigma: float  # attenuation units, per native pixel
    noise_seed: int

    @property
    def field_of_view_mm(self) -> tuple[float, float]:
        """(width, height): columns x column spacing, rows x row spacing."""
        return (self.size_px[1] * self.pixel_spacing_mm[1], self.size_px[0] * self.pixel_spacing_mm[0])

    @property
    def native_grid(self) -> PixelGrid:
        return PixelGrid(self.size_px, self.pixel_spacing_mm)

    @property
    def max_value(self) -> int:
        return (1 << self.bits_stored) - 1


@dataclass(frozen=True)
class ChestXrayPhantom(Phantom):
    """A :class:`Phantom` that also knows how its image is stored (see the module docstring)."""

    photometric: str = "MONOCHROME2"
    bits_stored: int = 16


def make_chest_xray(rng: np.random.Generator | int, **options: Any) -> ChestXrayPhantom:
    """A synthetic chest radiograph with its planted opacities: :func:`sample_chest_xray_params` takes the arguments."""
    return render_chest_xray(sample_chest_xray_params(rng, **options))


def sample_chest_xray_params(
    rng: np.random.Generator | int,
    *,
    size_px: tuple[int, int] | None = None,
    pixel_spacing_mm: float | tuple[float, float] | None = None,
    n_opacities: int | None = None,
    opacity_diameters_mm: Sequence[float] | None = None,
    photometric: str | None = None,
    modality: str | None = None,
    bits_stored: int | None = None,
    noise_sigma: float | None = None,
) -> ChestXrayParams:
    """Draw a chest radiograph; every argument left None is drawn from ``rng``.

    ``size_px`` is (rows, columns), drawn in SIZE_RANGE_PX. A scalar ``pixel_spacing_mm`` means square
    pixels, a pair is DICOM order (row spacing, column spacing); drawn spacings are square, in
    PIXEL_SPACING_RANGE_MM, and keep the field of view in FOV_RANGE_MM. ``n_opacities`` is drawn in
    0..MAX_OPACITIES; ``opacity_diameters_mm`` fixes each opacity's diameter. Raises ValueError when a
    requested opacity cannot be placed inside a lung field of this field of view.
    """
    rng = np.random.default_rng(rng)
    if size_px is None:
        rows = int(rng.integers(SIZE_RANGE_PX[0], SIZE_RANGE_PX[1] + 1))
        cols = int(np.clip(round(rows * rng.uniform(*ASPECT_RANGE)), *SIZE_RANGE_PX))
        size_px = (rows, cols)
    if len(size_px) != 2 or min(size_px) < _MIN_SIZE_PX:
        raise ValueError(f"size_px must be (rows, columns), each >= {_MIN_SIZE_PX}, got {size_px}")
    size_px = (int(size_px[0]), int(size_px[1]))
    if pixel_spacing_mm is None:
        low = max(PIXEL_SPACING_RANGE_MM[0], FOV_RANGE_MM[0] / min(size_px))
        high = min(PIXEL_SPACING_RANGE_MM[1], FOV_RANGE_MM[1] / max(size_px))
        pixel_spacing_mm = float(rng.uniform(low, high)) if low < high else float(np.clip(low, *PIXEL_SPACING_RANGE_MM))
    spacing = spacing_pair(pixel_spacing_mm)
    if min(spacing) <= 0:
        raise ValueError(f"pixel_spacing_mm must be positive, got {pixel_spacing_mm}")
    photometric = photometric or str(rng.choice(PHOTOMETRICS))
    if photometric not in PHOTOMETRICS:
        raise ValueError(f"photometric must be one of {PHOTOMETRICS}, got {photometric!r}")
    modality = modality or str(rng.choice(XRAY_MODALITIES))
    if modality not in XRAY_MODALITIES:
        raise ValueError(f"modality must be one of {XRAY_MODALITIES}, got {modality!r}")
    bits_stored = bits_stored or int(rng.choice(BITS_STORED_CHOICES))
    if bits_stored not in BITS_STORED_CHOICES:
        raise ValueError(f"bits_stored must be one of {BITS_STORED_CHOICES}, got {bits_stored!r}")
    if noise_sigma is None:
        noise_sigma = float(rng.uniform(*NOISE_SIGMA_RANGE))
    if noise_sigma < 0:
        raise ValueError(f"noise_sigma must be >= 0, got {noise_sigma}")

    width, height = size_px[1] * spacing[1], size_px[0] * spacing[0]
    midline = width * (0.5 + rng.uniform(-0.03, 0.03))
    body = Ellipse((midline, height * rng.uniform(0.48, 0.56)), (width * rng.uniform(0.44, 0.56), height * 0.75))
    lung_y = height * rng.uniform(0.40, 0.46)
    lung_semi_y = height * rng.uniform(0.26, 0.31)
    lungs = []
    for side in (-1.0, 1.0):
        offset = width * rng.uniform(0.19, 0.23)
        lungs.append(
            Ellipse(
                (midline + side * offset, lung_y + height * rng.uniform(-0.015, 0.015)),
                (width * rng.uniform(0.13, 0.16), lung_semi_y * rng.uniform(0.95, 1.05)),
            )
        )
    heart = Ellipse(
        (midline + width * rng.uniform(0.04, 0.09), lung_y + lung_semi_y * rng.uniform(0.45, 0.65)),
        (width * rng.uniform(0.13, 0.18), height * rng.uniform(0.10, 0.14)),
    )
    lateral_extent = width * 0.38
    posterior = Ribs(
        top_mm=lung_y - lung_semi_y * rng.uniform(0.85, 1.0),
        pitch_mm=lung_semi_y * rng.uniform(0.17, 0.21),
        count=int(rng.integers(9, 11)),
        sag_mm=lung_semi_y * rng.uniform(0.25, 0.40),
        rise_mm=0.0,
        width_fraction=float(rng.uniform(0.35, 0.50)),
        lateral_extent_mm=lateral_extent,
        attenuation=float(rng.uniform(0.10, 0.20)),
    )
    anterior = Ribs(
        top_mm=lung_y - lung_semi_y * rng.uniform(0.55, 0.75),
        pitch_mm=lung_semi_y * rng.uniform(0.22, 0.28),
        count=int(rng.integers(5, 7)),
        sag_mm=0.0,
        rise_mm=lung_semi_y * rng.uniform(0.25, 0.40),
        width_fraction=float(rng.uniform(0.30, 0.45)),
        lateral_extent_mm=lateral_extent,
        attenuation=float(rng.uniform(0.04, 0.09)),
    )
    edge_mm = max(1.0, 0.012 * min(width, height))
    lung_drop = float(rng.uniform(0.40, 0.55))

    params = ChestXrayParams(
        size_px=size_px,
        pixel_spacing_mm=spacing,
        modality=modality,
        photometric=photometric,
        bits_stored=int(bits_stored),
        midline_mm=float(midline),
        body=body,
        lungs=(lungs[0], lungs[1]),
        heart=heart,
        mediastinum_half_width_mm=float(width * rng.uniform(0.055, 0.075)),
        mediastinum_bottom_mm=float(heart.center_mm[1]),
        spine_half_width_mm=float(width * rng.uniform(0.025, 0.035)),
        posterior_ribs=posterior,
        anterior_ribs=anterior,
        clavicle_y_mm=float(lung_y - lung_semi_y * rng.uniform(0.80, 0.95)),
        clavicle_half_thickness_mm=float(height * rng.uniform(0.010, 0.014)),
        opacities=(),
        edge_mm=float(edge_mm),
        tissue_attenuation=float(rng.uniform(0.9, 1.1)),
        lung_drop=lung_drop,
        mediastinum_attenuation=float(rng.uniform(0.35, 0.55)),
        heart_attenuation=float(rng.uniform(0.30, 0.45)),
        spine_attenuation=float(rng.uniform(0.15, 0.30)),
        texture_amplitude=float(rng.uniform(0.01, 0.04)),
        texture_cell_mm=float(rng.uniform(5.0, 10.0)),
        texture_seed=int(rng.integers(2**63 - 1)),
        vertical_gradient=float(rng.uniform(-0.1, 0.1)),
        value_low=float(rng.uniform(0.01, 0.10) * ((1 << bits_stored) - 1)),
        value_high=float(rng.uniform(0.55, 0.95) * ((1 << bits_stored) - 1)),
        noise_sigma=float(noise_sigma),
        noise_seed=int(rng.integers(2**63 - 1)),
    )
    opacities = _draw_opacities(rng, params, n_opacities, opacity_diameters_mm)
    return replace(params, opacities=opacities)


def render_chest_xray(params: ChestXrayParams, grid: PixelGrid | None = None) -> ChestXrayPhantom:
    """Sample ``params`` at the centers of ``grid`` (default: the native grid) into a one-slice Volume.

    On a coarser grid the noise sigma shrinks with the square root of the pixel-area ratio, as when the
    native image is downsampled by averaging. Values are integers in [0, 2**bits_stored - 1], stored as
    float32 in the MONOCHROME2 sense.
    """
    grid = grid or params.native_grid
    x = grid.x_mm().astype(np.float32)[None, :]  # (1, columns)
    y = grid.y_mm().astype(np.float32)[:, None]  # (rows, 1)
    width, height = params.field_of_view_mm
    edge = params.edge_mm

    # Whole-image terms are separable or cheap; the rest is computed in the bounding box it lives in.
    body = params.body.weight(x, y, edge)
    lateral = np.abs(x - params.midline_mm)  # (1, columns)
    mediastinum = smoothstep(0.5 + (params.mediastinum_half_width_mm - lateral) / edge) * smoothstep(
        0.5 + (params.mediastinum_bottom_mm - y) / (4 * edge)
    )
    spine = smoothstep(0.5 + (params.spine_half_width_mm - lateral) / edge)
    attenuation = (params.tissue_attenuation + params.spine_attenuation * spine) * body
    attenuation += params.mediastinum_attenuation * mediastinum

    lo = np.min([np.subtract(lung.center_mm, lung.semi_axes_mm) for lung in params.lungs], axis=0) - 2 * edge
    hi = np.max([np.add(lung.center_mm, lung.semi_axes_mm) for lung in params.lungs], axis=0) + 2 * edge
    thorax_box = grid_block(grid, lo, hi)
    if thorax_box is not None:
        rows, cols = thorax_box
        xb, yb, lateral_b = x[:, cols], y[rows], lateral[:, cols]
        mediastinum_b = mediastinum[rows, cols]
        lungs = np.maximum(params.lungs[0].weight(xb, yb, edge), params.lungs[1].weight(xb, yb, edge))
        lungs *= 1.0 - mediastinum_b
        thorax = np.maximum(lungs, mediastinum_b)
        view = attenuation[rows, cols]
        view -= params.lung_drop * lungs
        for ribs in (params.posterior_ribs, params.anterior_ribs):
            view += ribs.attenuation * draw_ribs(ribs, lateral_b, yb, edge) * thorax
        view += params.texture_amplitude * texture(params, grid, thorax_box, width, height) * lungs

    heart = params.heart
    heart_box = grid_block(
        grid,
        np.subtract(heart.center_mm, heart.semi_axes_mm) - 2 * edge,
        np.add(heart.center_mm, heart.semi_axes_mm) + 2 * edge,
    )
    if heart_box is not None:
        rows, cols = heart_box
        attenuation[rows, cols] += params.heart_attenuation * heart.weight(x[:, cols], y[rows], edge)

    for a, b in clavicle_segments(params):
        reach = params.clavicle_half_thickness_mm + edge
        box = grid_block(grid, np.minimum(a, b) - reach, np.maximum(a, b) + reach)
        if box is not None:
            rows, cols = box
            attenuation[rows, cols] += CLAVICLE_ATTENUATION * draw_bar(
                a, b, x[:, cols], y[rows], params.clavicle_half_thickness_mm, edge
            )

    for opacity in params.opacities:
        add_opacity(attenuation, opacity, grid)
    attenuation *= 1.0 + params.vertical_gradient * (y / height - 0.5)

    if params.noise_sigma > 0:
        area_ratio = (grid.spacing_mm[0] * grid.spacing_mm[1]) / (
            params.pixel_spacing_mm[0] * params.pixel_spacing_mm[1]
        )
        sigma = np.float32(params.noise_sigma / math.sqrt(max(area_ratio, 1.0)))
        noise = np.random.default_rng(params.noise_seed).standard_normal(attenuation.shape, dtype=np.float32)
        noise *= sigma
        attenuation += noise

    scale = np.float32((params.value_high - params.value_low) / ATTENUATION_REF)
    values = attenuation * scale + np.float32(params.value_low)
    np.clip(np.rint(values, out=values), 0, params.max_value, out=values)

    spacing_row, spacing_col = grid.spacing_mm
    affine = np.diag([spacing_col, spacing_row, 1.0, 1.0])
    affine[:2, 3] = grid.origin_mm
    volume = Volume(voxels=values.T[:, :, None], affine=affine, modality=params.modality)
    lesions = tuple(
        PlantedLesion(label=OPACITY_LABEL, center_mm=o.center_mm, diameter_mm=o.diameter_mm)  # type: ignore[arg-type]
        for o in params.opacities
    )
    return ChestXrayPhantom(
        volume=volume, lesions=lesions, photometric=params.photometric, bits_stored=params.bits_stored
    )


def _draw_opacities(
    rng: np.random.Generator,
    params: ChestXrayParams,
    n_opacities: int | None,
    diameters_mm: Sequence[float] | None,
) -> tuple[Opacity, ...]:
    """Place non-overlapping opacities inside the lung fields (clear of heart and mediastinum) by rejection."""
    margin = 2.0 * params.edge_mm
    # Drawn diameters stay below what fits, with room, at the center of the narrower lung.
    largest_fit = min(min(lung.semi_axes_mm) for lung in params.lungs) - margin
    d_cap = min(OPACITY_DIAMETER_RANGE_MM[1], 2.0 * 0.7 * largest_fit)
    diameters = requested_diameters(
        rng,
        OPACITY_NAMES,
        n_opacities,
        diameters_mm,
        max_count=MAX_OPACITIES,
        min_diameter_mm=OPACITY_DIAMETER_RANGE_MM[0],
        cap_mm=d_cap,
    )

    def propose(_: int, diameter: float, placed: list[Opacity]) -> Opacity | None:
        lung = params.lungs[int(rng.integers(2))]
        angle, reach = rng.uniform(0, 2 * np.pi), math.sqrt(rng.random())
        center = np.asarray(lung.center_mm) + np.asarray(lung.semi_axes_mm) * reach * [math.cos(angle), math.sin(angle)]
        candidate = Opacity(
            center_mm=(float(center[0]), float(center[1])),
            diameter_mm=float(diameter),
            contrast=float(rng.uniform(*OPACITY_CONTRAST_RANGE)),
            profile_power=float(rng.uniform(0.5, 1.0)),
        )
        return candidate if _fits(candidate, lung, params, placed, margin) else None

    return place_by_rejection(
        OPACITY_NAMES,
        diameters,
        lambda: float(rng.uniform(OPACITY_DIAMETER_RANGE_MM[0], d_cap)),
        propose,
        give_up_quietly=diameters_mm is None and n_opacities is None,
    )


def _fits(opacity: Opacity, lung: Ellipse, params: ChestXrayParams, placed: list[Opacity], margin: float) -> bool:
    """Disc plus ``margin`` inside the lung ellipse, outside heart and mediastinum, apart from the others."""
    center = np.asarray(opacity.center_mm)
    radius = opacity.diameter_mm / 2.0
    angles = np.linspace(0.0, 2.0 * np.pi, _RIM_SAMPLES, endpoint=False)
    rim = center + (radius + margin) * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    points = np.vstack([center, rim])
    if np.any(lung.normalized_radius(points[:, 0], points[:, 1]) >= 1.0):
        return False
    if np.any(params.heart.normalized_radius(points[:, 0], points[:, 1]) <= 1.0):
        return False
    if np.any(np.abs(points[:, 0] - params.midline_mm) <= params.mediastinum_half_width_mm + params.edge_mm):
        return False
    return all(
        np.linalg.norm(center - np.asarray(other.center_mm)) >= radius + other.diameter_mm / 2.0 + 2.0 * margin
        for other in placed
    )
