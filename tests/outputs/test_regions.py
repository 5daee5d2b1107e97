"""Findings' regions: rendered boxes, outlines along pixel edges, and where the center and outline are drawn."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from inference.io.volume import SourceImage, SourceRefs, Volume
from inference.outputs.finding import Finding, FindingMask
from inference.outputs.regions import (
    ELLIPSE,
    POLYLINE,
    finding_masks,
    image_geometry,
    outline_polygon,
    polygon_area,
    render_box,
)


def _inside(polygon: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Even-odd rule: which (N, 2) points lie inside a closed polygon (none of them on an edge here)."""
    x, y = points[:, 0][:, None], points[:, 1][:, None]
    x0, y0, x1, y1 = polygon[:-1, 0], polygon[:-1, 1], polygon[1:, 0], polygon[1:, 1]
    crosses = (y0 > y) != (y1 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    return np.sum(crosses & (x < at), axis=1) % 2 == 1


@pytest.mark.parametrize("seed", range(6))
def test_the_outline_encloses_exactly_the_largest_part_with_its_holes(seed):
    rng = np.random.default_rng(seed)
    plane = ndimage.binary_opening(rng.random((40, 30)) < 0.55)  # blobs, some with holes, some apart
    polygon = outline_polygon(plane)

    labels, count = ndimage.label(plane)
    sizes = ndimage.sum_labels(plane, labels, index=np.arange(1, count + 1))
    largest = ndimage.binary_fill_holes(labels == int(np.argmax(sizes)) + 1)
    assert np.array_equal(polygon[0], polygon[-1])  # closed
    assert np.all(polygon == np.round(polygon))  # pixel corners
    steps = np.diff(polygon, axis=0)
    assert np.all((steps[:, 0] == 0) != (steps[:, 1] == 0))  # along pixel edges, no zero-length step
    assert polygon_area(polygon) == largest.sum()
    # Pixel centers inside the polygon (column + 0.5, row + 0.5) are exactly that part's pixels.
    columns, rows = np.meshgrid(np.arange(40), np.arange(30), indexing="ij")
    centers = np.stack([columns.ravel() + 0.5, rows.ravel() + 0.5], axis=1)
    assert np.array_equal(_inside(polygon, centers).reshape(40, 30), largest)


def test_outline_of_one_pixel_and_of_nothing():
    plane = np.zeros((5, 4), dtype=bool)
    plane[2, 1] = True
    np.testing.assert_array_equal(outline_polygon(plane), [[2, 1], [3, 1], [3, 2], [2, 2], [2, 1]])
    with pytest.raises(ValueError, match="empty"):
        outline_polygon(np.zeros((3, 3), dtype=bool))


def _ct(shape=(40, 36, 12), spacing=(0.8, 0.7, 2.5)) -> Volume:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-10.0, 20.0, -300.0)
    images = tuple(SourceImage(f"1.2.3.{k}", "1.2.840.10008.5.1.4.1.1.2", k) for k in range(shape[2]))
    source = SourceRefs("1.2.3", "1.2.3.100", "1.2.3.200", images)
    return Volume(np.zeros(shape, np.float32), affine, "CT", source=source)


def test_a_box_renders_as_its_inscribed_ellipsoid_with_the_center_voxel():
    volume = _ct()
    center = volume.voxel_to_lps([20.2, 17.6, 5.3])[0]
    half = np.array([6.0, 4.0, 5.0])
    finding = Finding("nodule", 0.9, tuple(center), (*(center - half), *(center + half)), 12.0)
    mask = render_box(volume, finding)
    dense = mask.dense(volume.shape)
    inside = (((volume.voxel_to_lps(np.argwhere(np.ones(volume.shape))) - center) / half) ** 2).sum(axis=1) <= 1
    np.testing.assert_array_equal(dense, inside.reshape(volume.shape))
    assert mask.voxel_count * np.prod(volume.spacing_mm) == pytest.approx(4 / 3 * np.pi * np.prod(half), rel=0.15)

    tiny = Finding("nodule", 0.9, tuple(center), (*(center - 0.01), *(center + 0.01)), 0.02)
    assert render_box(volume, tiny).voxel_count == 1  # thinner than a voxel: still marks the nearest one
    outside = Finding("nodule", 0.9, (500.0, 0.0, 0.0), (499.0, -1.0, -1.0, 501.0, 1.0, 1.0), 2.0)
    assert render_box(volume, outside).fits(volume.shape)  # clipped into the volume, never out of it
    with pytest.raises(ValueError, match="finding 3 bbox_mm must have 4 or 6 values"):
        render_box(volume, Finding("nodule", 0.9, (0.0, 0.0, 0.0), (1.0, 2.0), 1.0), 3)


def test_geometry_of_a_segmented_finding_is_drawn_where_its_voxels_are():
    volume = _ct()
    block = np.zeros((6, 5, 3), dtype=bool)
    block[1:5, 1:4, 0] = True  # slices 4 and 6 of the volume have voxels, slice 5 none
    block[2:4, 2:3, 2] = True
    mask = FindingMask((10, 12, 4), block)
    center_voxel = (12.5, 14.0, 5.2)
    finding = Finding("lesion", 0.9, tuple(volume.voxel_to_lps(center_voxel)[0]), (0.0,) * 6, 3.0, 0.1, None)

    geometry = image_geometry(volume, finding, mask, rendered=False)
    assert geometry.center_image.slice_index == 5  # the image nearest the center
    np.testing.assert_allclose(geometry.center, [13.0, 14.5])  # SCOORD: pixel centers at +0.5
    assert geometry.outline_image.slice_index == 4  # the nearest slice the voxels reach (4 and 6 tie: the first)
    assert geometry.outline_type == POLYLINE
    np.testing.assert_array_equal(geometry.outline, [[11, 13], [15, 13], [15, 16], [11, 16], [11, 13]])
    assert image_geometry(Volume(volume.voxels, volume.affine, "CT"), finding, mask, rendered=False) is None


def test_geometry_of_an_xray_box_is_its_inscribed_ellipse():
    spacing = (0.2, 0.25)
    image = SourceImage("1.2.3.1", "1.2.840.10008.5.1.4.1.1.1.1", 0)
    source = SourceRefs("1.2.3", "1.2.3.100", None, (image,))
    volume = Volume(np.zeros((64, 48, 1), np.float32), np.diag([*spacing, 1.0, 1.0]), "DX", source=source)
    column, row = 20.0, 30.0
    box = (3.0, 6.0, 6.0, 9.0)  # x0, y0, x1, y1 on the image plane: columns 15-30, rows 24-36
    finding = Finding("opacity", 0.7, (column * 0.2, row * 0.25), box, 3.0, None, None, (column, row))
    (mask,), rendered = finding_masks(volume, [finding], None)
    assert rendered
    geometry = image_geometry(volume, finding, mask, rendered=True)
    assert geometry.outline_type == ELLIPSE and geometry.outline_image == image == geometry.center_image
    np.testing.assert_allclose(geometry.center, [column + 0.5, row + 0.5])
    # Major axis along the columns (15 pixels), minor along the rows (12 pixels), centered at (23, 30.5).
    np.testing.assert_allclose(geometry.outline, [[15.5, 30.5], [30.5, 30.5], [23.0, 24.5], [23.0, 36.5]])
    # The rendered pixels are those whose centers lie inside that ellipse.
    columns, rows = np.meshgrid(np.arange(64) + 0.5, np.arange(48) + 0.5, indexing="ij")
    inside = ((columns - 23.0) / 7.5) ** 2 + ((rows - 30.5) / 6.0) ** 2 <= 1.0
    np.testing.assert_array_equal(mask.dense(volume.shape)[:, :, 0], inside)


def test_model_masks_are_taken_as_they_are_and_checked():
    volume = _ct()
    finding = Finding("lesion", 0.9, (0.0, 0.0, 0.0), (0.0,) * 6, 1.0)
    mask = FindingMask((0, 0, 0), np.ones((2, 2, 2), dtype=bool))
    assert finding_masks(volume, [finding], [mask]) == ([mask], False)
    with pytest.raises(ValueError, match="2 masks for 1 findings"):
        finding_masks(volume, [finding], [mask, mask])
    with pytest.raises(ValueError, match="does not fit"):
        finding_masks(volume, [finding], [FindingMask((39, 0, 0), np.ones((2, 2, 2), dtype=bool))])
    with pytest.raises(ValueError, match="3-D bool"):
        FindingMask((0, 0, 0), np.ones((2, 2), dtype=bool))
