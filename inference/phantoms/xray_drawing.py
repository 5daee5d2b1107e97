"""Drawing a chest radiograph's anatomy and opacities on a pixel grid, in attenuation units: ribs, clavicles, soft
bars, texture, an opacity's smooth disc; and the block of the grid a shape touches."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from inference.phantoms.chest_xray import ChestXrayParams, Opacity, PixelGrid, Ribs


def draw_ribs(ribs: Ribs, lateral: np.ndarray, y: np.ndarray, edge_mm: float) -> np.ndarray:
    """Rounded bands, one per rib, fading out beyond the lateral extent."""
    u = lateral / np.float32(ribs.lateral_extent_mm)
    phase = (y - np.float32(ribs.top_mm) - np.float32(ribs.sag_mm) * u * u + np.float32(ribs.rise_mm) * u) / np.float32(
        ribs.pitch_mm
    )
    threshold = math.cos(math.pi * ribs.width_fraction)
    band = np.clip((np.cos(np.float32(2.0 * np.pi) * phase) - threshold) / (1.0 - threshold), 0.0, 1.0)
    band = np.sqrt(band)  # a rib's cross-section: thickest along its middle
    in_cage = smoothstep(phase + 0.5) * smoothstep(ribs.count - 0.5 - phase)
    lateral_fade = smoothstep((1.0 - u) * ribs.lateral_extent_mm / (4 * edge_mm))
    return band * in_cage * lateral_fade


def clavicle_segments(params: ChestXrayParams) -> list[tuple[np.ndarray, np.ndarray]]:
    """Two bars rising from the sternal ends (near the midline) to the shoulders, as (start, end) in mm."""
    width, _ = params.field_of_view_mm
    segments = []
    for side in (-1.0, 1.0):
        start = np.array([params.midline_mm + side * 0.04 * width, params.clavicle_y_mm])
        end = np.array([params.midline_mm + side * 0.32 * width, params.clavicle_y_mm - 0.05 * width])
        segments.append((start, end))
    return segments


def draw_bar(
    a: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray, half_thickness_mm: float, edge_mm: float
) -> np.ndarray:
    """Smooth indicator of the points within ``half_thickness_mm`` of the segment ``a``-``b``."""
    (ax, ay), (dx, dy) = (float(v) for v in a), (float(v) for v in b - a)
    t = np.clip(((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    distance = np.sqrt((x - ax - t * dx) ** 2 + (y - ay - t * dy) ** 2)
    return smoothstep(0.5 + (half_thickness_mm - distance) / edge_mm)


def texture(
    params: ChestXrayParams, grid: PixelGrid, box: tuple[slice, slice], width_mm: float, height_mm: float
) -> np.ndarray:
    """Smooth unit-variance random field on a fixed mm lattice, bilinearly interpolated at the pixel centers of ``box``.

    The lattice depends only on the parameters, so every grid sees the same texture. Interpolation is
    separable: ``Wy @ lattice @ Wx.T``.
    """
    cell = params.texture_cell_mm
    nx, ny = math.ceil(width_mm / cell) + 3, math.ceil(height_mm / cell) + 3
    lattice = np.random.default_rng(params.texture_seed).standard_normal((ny, nx)).astype(np.float32)
    wy = linear_weights(grid.y_mm()[box[0]], -cell, cell, ny)
    wx = linear_weights(grid.x_mm()[box[1]], -cell, cell, nx)
    return (wy @ lattice) @ wx.T


def linear_weights(coords_mm: np.ndarray, start_mm: float, step_mm: float, n: int) -> np.ndarray:
    """(len(coords), n) linear-interpolation weights of lattice nodes ``start + k * step``."""
    position = np.clip((coords_mm - start_mm) / step_mm, 0.0, n - 1.000001)
    below = np.floor(position).astype(np.int64)
    frac = (position - below).astype(np.float32)
    weights = np.zeros((len(coords_mm), n), dtype=np.float32)
    rows = np.arange(len(coords_mm))
    weights[rows, below] = 1.0 - frac
    weights[rows, below + 1] = frac
    return weights


def add_opacity(attenuation: np.ndarray, opacity: Opacity, grid: PixelGrid) -> None:
    """Add one opacity in place, computing only the pixels of its bounding box."""
    center, radius = np.asarray(opacity.center_mm), opacity.diameter_mm / 2.0
    box = grid_block(grid, center - radius, center + radius)
    if box is None:
        return
    rows, cols = box
    x = grid.x_mm()[None, cols]
    y = grid.y_mm()[rows, None]
    inside = np.clip(1.0 - ((x - center[0]) ** 2 + (y - center[1]) ** 2) / radius**2, 0.0, None)
    attenuation[rows, cols] += (opacity.contrast * inside**opacity.profile_power).astype(np.float32)


def grid_block(grid: PixelGrid, lo_mm: np.ndarray, hi_mm: np.ndarray) -> tuple[slice, slice] | None:
    """(rows, columns) slices of the pixels whose centers lie in the mm box [lo, hi] ((x, y) corners), or None."""
    (spacing_row, spacing_col), (x0, y0) = grid.spacing_mm, grid.origin_mm
    c_lo, c_hi = math.ceil((lo_mm[0] - x0) / spacing_col), math.floor((hi_mm[0] - x0) / spacing_col) + 1
    r_lo, r_hi = math.ceil((lo_mm[1] - y0) / spacing_row), math.floor((hi_mm[1] - y0) / spacing_row) + 1
    c_lo, r_lo = max(c_lo, 0), max(r_lo, 0)
    c_hi, r_hi = min(c_hi, grid.shape[1]), min(r_hi, grid.shape[0])
    if c_hi <= c_lo or r_hi <= r_lo:
        return None
    return slice(r_lo, r_hi), slice(c_lo, c_hi)


def smoothstep(t: np.ndarray | float) -> np.ndarray:
    t = np.clip(np.asarray(t, dtype=np.float32), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)
