"""Each finding's region: its voxels (the SEG's segment) and the image geometry a viewer draws (the SR's SCOORDs).

Voxels, on the input volume's grid (:func:`finding_masks`):

* a segmentation model: the mask the model produced for the finding (``TaskResult.masks``), unchanged, so that
  the SEG's voxels are the finding's ``volume_ml``;
* a detection model, which reports boxes only, rendered (:func:`render_box`): on a 3-D study the ellipsoid
  inscribed in the LPS-aligned ``bbox_mm``, on a projection X-ray the ellipse inscribed in the box on the image
  plane; a voxel belongs when its center lies inside (semi-axes at least half a voxel), and the voxel nearest the
  box center always belongs, so even a box thinner than a voxel marks one.

Image geometry (:func:`image_geometry`), in SCOORD image coordinates: (column, row) from the top-left *corner* of
the top-left pixel, whose center is therefore (0.5, 0.5) (PS3.3 C.18.6.1.2):

* center: a POINT at the finding's center, (column + 0.5, row + 0.5), on the source image nearest the center
  (the image ``Finding.sop_instance_uid`` names);
* outline: on that image when the finding's voxels reach it, else on the nearest image they reach: the boundary
  of the voxels in that slice, a closed POLYLINE along pixel edges around their largest 4-connected part with
  its holes filled (:func:`outline_polygon`; the area it encloses is that part's pixel count); for a box on a
  projection image, the inscribed ELLIPSE itself (4 points: the ends of the major axis, then of the minor axis),
  which the rendered pixels sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from inference.io.volume import SourceImage, Volume
from inference.outputs.finding import Finding, FindingMask

POLYLINE = "POLYLINE"
ELLIPSE = "ELLIPSE"


@dataclass(frozen=True)
class ImageGeometry:
    """Where a viewer draws a finding on the source images (SCOORD image coordinates, see the module docstring)."""

    center_image: SourceImage
    center: np.ndarray  # (2,): column, row of the POINT
    outline_image: SourceImage
    outline: np.ndarray  # (N, 2): a closed POLYLINE (first point repeated last) or an ELLIPSE's 4 points
    outline_type: str  # POLYLINE | ELLIPSE


def is_projection(volume: Volume) -> bool:
    """A projection X-ray: one image, findings on its plane (DESIGN.md contract)."""
    return volume.shape[2] == 1 and volume.modality.upper() in ("CR", "DX")


def finding_masks(
    volume: Volume, findings: Sequence[Finding], masks: Sequence[FindingMask] | None
) -> tuple[list[FindingMask], bool]:
    """(one mask per finding, whether they were rendered from boxes). ``masks`` are the model's, checked to fit."""
    if masks is not None:
        if len(masks) != len(findings):
            raise ValueError(f"{len(masks)} masks for {len(findings)} findings")
        for number, mask in enumerate(masks, start=1):
            if not mask.fits(volume.shape):
                raise ValueError(f"the mask of finding {number} does not fit the volume {volume.shape}")
        return list(masks), False
    return [render_box(volume, finding, number) for number, finding in enumerate(findings, start=1)], True


def render_box(volume: Volume, finding: Finding, number: int = 1) -> FindingMask:
    """A detection's voxels: the ellipsoid (3-D) or ellipse (projection X-ray) inscribed in its box."""
    bbox = np.asarray(finding.bbox_mm, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(bbox)):
        raise ValueError(f"finding {number} bbox_mm must be finite")
    if bbox.size == 6:
        return _ellipsoid(volume, bbox[:3], bbox[3:])
    if bbox.size == 4:
        return _plane_ellipse(volume, bbox[:2], bbox[2:])
    raise ValueError(f"finding {number} bbox_mm must have 4 or 6 values, got {bbox.size}")


def _ellipsoid(volume: Volume, lo_mm: np.ndarray, hi_mm: np.ndarray) -> FindingMask:
    lo, hi = np.minimum(lo_mm, hi_mm), np.maximum(lo_mm, hi_mm)
    center = (lo + hi) / 2.0
    semi = np.maximum((hi - lo) / 2.0, 0.5 * min(volume.spacing_mm))
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    nearest = _nearest_index(volume.lps_to_voxel(center)[0], volume.shape)
    ijk = volume.lps_to_voxel(corners)
    shape = np.array(volume.shape)
    start = np.minimum(np.clip(np.floor(ijk.min(axis=0)).astype(int), 0, shape - 1), nearest)
    stop = np.maximum(np.clip(np.ceil(ijk.max(axis=0)).astype(int) + 1, 1, shape), nearest + 1)
    grids = np.meshgrid(*(np.arange(a, b) for a, b in zip(start, stop, strict=True)), indexing="ij")
    points = np.stack([g.ravel() for g in grids], axis=1)
    inside = np.sum(((volume.voxel_to_lps(points) - center) / semi) ** 2, axis=1) <= 1.0
    block = inside.reshape(tuple(stop - start))
    block[tuple(nearest - start)] = True
    return FindingMask(tuple(int(s) for s in start), block)


def _plane_ellipse(volume: Volume, lo_mm: np.ndarray, hi_mm: np.ndarray) -> FindingMask:
    spacing = np.array(volume.spacing_mm[:2])  # column, row spacing
    lo, hi = np.minimum(lo_mm, hi_mm) / spacing, np.maximum(lo_mm, hi_mm) / spacing  # pixel-center indices
    center = (lo + hi) / 2.0
    semi = np.maximum((hi - lo) / 2.0, 0.5)
    shape = np.array(volume.shape[:2])
    nearest = _nearest_index(center, shape)
    start = np.minimum(np.clip(np.floor(center - semi).astype(int), 0, shape - 1), nearest)
    stop = np.maximum(np.clip(np.ceil(center + semi).astype(int) + 1, 1, shape), nearest + 1)
    columns, rows = np.meshgrid(np.arange(start[0], stop[0]), np.arange(start[1], stop[1]), indexing="ij")
    block = ((columns - center[0]) / semi[0]) ** 2 + ((rows - center[1]) / semi[1]) ** 2 <= 1.0
    block[tuple(nearest - start)] = True
    return FindingMask((int(start[0]), int(start[1]), 0), block[:, :, None])


def _nearest_index(index: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The integer index nearest ``index``, clipped into ``shape``."""
    return np.clip(np.rint(np.asarray(index, dtype=np.float64)).astype(int), 0, np.asarray(shape) - 1)


def outline_polygon(plane: np.ndarray) -> np.ndarray:
    """The boundary of a 2-D bool mask ``plane`` [column, row] along pixel edges, as a closed polygon.

    Of the mask's largest 4-connected part (the first of equal ones), with its holes filled, so the boundary is
    one simple curve. Vertices are pixel corners in SCOORD image coordinates, (column, row) from the top-left
    corner of pixel (0, 0); collinear vertices are dropped and the first vertex is repeated last. Clockwise on the
    screen (rows run down). Raises ValueError for an empty mask.
    """
    plane = np.asarray(plane, dtype=bool)
    labels, count = ndimage.label(plane)
    if count == 0:
        raise ValueError("an empty mask has no outline")
    sizes = ndimage.sum_labels(plane, labels, index=np.arange(1, count + 1))
    region = ndimage.binary_fill_holes(labels == int(np.argmax(sizes)) + 1)
    padded = np.pad(region, 1)
    inner = padded[1:-1, 1:-1]
    c, r = np.nonzero(inner)
    edges: dict[tuple[int, int], tuple[int, int]] = {}
    # Each boundary side of a pixel (c, r), occupying [c, c+1] x [r, r+1], directed with the region on its right.
    for (dc, dr), start, end in (
        ((0, -1), (0, 0), (1, 0)),  # above is outside: top side, left to right
        ((1, 0), (1, 0), (1, 1)),  # right side, downwards
        ((0, 1), (1, 1), (0, 1)),  # bottom side, right to left
        ((-1, 0), (0, 1), (0, 0)),  # left side, upwards
    ):
        outside = ~padded[1 + c + dc, 1 + r + dr]
        for column, row in zip(c[outside].tolist(), r[outside].tolist(), strict=True):
            edges[(column + start[0], row + start[1])] = (column + end[0], row + end[1])
    first = min(edges)
    vertices = [first]
    point = edges[first]
    while point != first:
        vertices.append(point)
        point = edges[point]
    if len(vertices) != len(edges):
        raise AssertionError(f"outline walked {len(vertices)} of {len(edges)} edges")  # a hole-free part: never
    corners = np.array(vertices, dtype=np.float64)
    before, after = np.roll(corners, 1, axis=0), np.roll(corners, -1, axis=0)
    turns = np.any((corners - before) != (after - corners), axis=1)
    kept = corners[turns]
    return np.vstack([kept, kept[:1]])


def polygon_area(points: np.ndarray) -> float:
    """The area enclosed by a closed polygon (shoelace formula)."""
    x, y = np.asarray(points, dtype=np.float64).T
    return float(abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])) / 2.0)


def center_index(volume: Volume, finding: Finding, number: int = 1) -> np.ndarray:
    """The finding's center as fractional (column, row, slice) indices of the volume.

    Projection X-ray: ``center_voxel`` ([column, row]) where given, else ``center_mm`` over the pixel spacing
    (DESIGN.md: x = column index x column spacing, y = row index x row spacing), slice 0.
    """
    if is_projection(volume):
        if finding.center_voxel is not None and len(finding.center_voxel) >= 2:
            column, row = _finite(finding.center_voxel[:2], 2, f"finding {number} center_voxel")
        else:
            x, y = _finite(finding.center_mm[:2], 2, f"finding {number} center_mm")
            column, row = x / volume.spacing_mm[0], y / volume.spacing_mm[1]
        return np.array([column, row, 0.0])
    center = _finite(finding.center_mm, 3, f"finding {number} center_mm")
    return volume.lps_to_voxel(center)[0]


def image_geometry(
    volume: Volume, finding: Finding, mask: FindingMask, *, rendered: bool, number: int = 1
) -> ImageGeometry | None:
    """The finding's center POINT and outline on the source images; None for a volume without DICOM source."""
    if volume.source is None or not volume.source.images:
        return None
    by_slice = {image.slice_index: image for image in volume.source.images}
    index = center_index(volume, finding, number)
    k = int(np.clip(round(float(index[2])), 0, volume.shape[2] - 1))
    if k not in by_slice:
        raise ValueError(f"finding {number}: the volume has no source image for slice {k}")
    center = np.array([index[0] + 0.5, index[1] + 0.5])

    if rendered and is_projection(volume):
        outline = _box_ellipse(volume, finding, number)
        return ImageGeometry(by_slice[k], center, by_slice[k], outline, ELLIPSE)
    planes = np.flatnonzero(mask.mask.any(axis=(0, 1))) + mask.offset[2]
    if planes.size == 0:
        raise ValueError(f"finding {number} has an empty mask")
    k_outline = int(planes[np.argmin(np.abs(planes - k))])  # the center's slice when the voxels reach it
    plane = mask.mask[:, :, k_outline - mask.offset[2]]
    outline = outline_polygon(plane) + np.array(mask.offset[:2], dtype=np.float64)
    return ImageGeometry(by_slice[k], center, by_slice[k_outline], outline, POLYLINE)


def _box_ellipse(volume: Volume, finding: Finding, number: int) -> np.ndarray:
    """The ellipse inscribed in a projection finding's box: major axis ends, then minor axis ends (SCOORD)."""
    bbox = _finite(finding.bbox_mm, 4, f"finding {number} bbox_mm")
    spacing = np.array(volume.spacing_mm[:2])
    lo, hi = np.minimum(bbox[:2], bbox[2:]) / spacing, np.maximum(bbox[:2], bbox[2:]) / spacing
    center = (lo + hi) / 2.0 + 0.5
    semi = np.maximum((hi - lo) / 2.0, 0.5)
    along_columns = np.array([[center[0] - semi[0], center[1]], [center[0] + semi[0], center[1]]])
    along_rows = np.array([[center[0], center[1] - semi[1]], [center[0], center[1] + semi[1]]])
    major, minor = (along_columns, along_rows) if semi[0] >= semi[1] else (along_rows, along_columns)
    return np.vstack([major, minor])


def _finite(values: Sequence[float], n: int, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size != n:
        raise ValueError(f"{what} must have {n} values, got {array.size}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} must be finite")
    return array
