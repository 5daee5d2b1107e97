"""The chest phantom against its planted ground truth, for any orientation, flip and origin."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from inference.phantoms import Phantom, make_chest_ct, render_chest_ct, sample_chest_ct_params
from inference.phantoms.chest_ct import ChestCTParams

ORIENTATIONS = list(
    itertools.product([(1.0, 0.0, 0.0), (-1.0, 0.0, 0.0)], [(0.0, 1.0, 0.0), (0.0, -1.0, 0.0)], [1, -1])
)


def voxel_at(phantom: Phantom, xyz_mm: np.ndarray) -> float:
    """Value of the voxel whose center is nearest the LPS point, via the inverse affine."""
    inverse = np.linalg.inv(phantom.volume.affine)
    index = np.rint(inverse[:3, :3] @ np.asarray(xyz_mm) + inverse[:3, 3]).astype(int)
    assert np.all(index >= 0) and np.all(index < phantom.volume.shape), f"{xyz_mm} is outside the volume"
    return float(phantom.volume.voxels[tuple(index)])


def fibonacci_sphere(n: int = 200) -> np.ndarray:
    i = np.arange(n) + 0.5
    polar = np.arccos(1 - 2 * i / n)
    azimuth = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], axis=1)


def params_for(seed: int, row, column, sign, **overrides) -> ChestCTParams:
    rng = np.random.default_rng(seed)
    kwargs = dict(
        shape=(128, 128, 48),
        pixel_spacing_mm=0.9,
        slice_spacing_mm=2.5,
        nodule_diameters_mm=[6.0, 10.0, 15.0],
        row_direction=row,
        column_direction=column,
        slice_direction_sign=sign,
        origin_mm=rng.uniform(-400, 400, size=3),
        noise_sigma_hu=15.0,
    )
    kwargs.update(overrides)
    return sample_chest_ct_params(rng, **kwargs)


@pytest.mark.parametrize(("seed", "orientation"), enumerate(ORIENTATIONS))
def test_planted_nodules_are_where_the_truth_says(seed, orientation):
    params = params_for(seed, *orientation)
    phantom = render_chest_ct(params)
    affine = phantom.volume.affine
    assert len(phantom.lesions) == 3
    steps = [s * affine[:3, axis] / np.linalg.norm(affine[:3, axis]) for axis in (0, 1) for s in (1, -1)]
    spacing = max(phantom.volume.spacing_mm)
    centers = [np.asarray(lesion.center_mm) for lesion in phantom.lesions]

    for lesion, center in zip(phantom.lesions, centers, strict=True):
        assert lesion.label == "nodule"
        assert voxel_at(phantom, center) > -200, lesion
        radius = lesion.diameter_mm / 2
        lung = min(params.lungs, key=lambda lung: float(lung.normalized_radius(*center)))
        to_lung_center = np.asarray(lung.center_mm) - center
        directions = [*steps, to_lung_center / max(np.linalg.norm(to_lung_center), 1e-9)]
        checked = 0
        for direction in directions:
            point = center + (1.5 * radius + spacing) * direction
            deep_in_lung = float(lung.normalized_radius(*point)) < 0.9
            clear_of_others = all(
                np.linalg.norm(point - other) > 1.5 * other_lesion.diameter_mm / 2 + spacing
                for other, other_lesion in zip(centers, phantom.lesions, strict=True)
                if other is not center
            )
            if deep_in_lung and clear_of_others:
                assert voxel_at(phantom, point) < -600, (lesion, direction)
                checked += 1
        assert checked >= 1, f"no lung probe around {lesion}"


@pytest.mark.parametrize("seed", range(6))
def test_nodules_fit_inside_lungs_without_overlap(seed):
    params = sample_chest_ct_params(seed, shape=(160, 160, 60), n_nodules=5)
    assert len(params.nodules) == 5
    sphere = fibonacci_sphere()
    balls = []
    for index, nodule in enumerate(params.nodules):
        for center, radius in zip(nodule.ball_centers_mm, nodule.ball_radii_mm, strict=True):
            surface = np.asarray(center) + radius * sphere
            assert any(np.all(lung.normalized_radius(*surface.T) < 1.0) for lung in params.lungs)
            balls.append((index, np.asarray(center), radius))
    for (a, ca, ra), (b, cb, rb) in itertools.combinations(balls, 2):
        if a != b:
            assert np.linalg.norm(ca - cb) > ra + rb


def test_same_seed_same_phantom_and_different_seed_differs():
    first = make_chest_ct(7, shape=(64, 64, 24))
    second = make_chest_ct(np.random.default_rng(7), shape=(64, 64, 24))
    assert np.array_equal(first.volume.voxels, second.volume.voxels)
    assert np.array_equal(first.volume.affine, second.volume.affine)
    assert first.lesions == second.lesions
    other = make_chest_ct(8, shape=(64, 64, 24))
    assert not np.array_equal(first.volume.voxels, other.volume.voxels)


def test_anatomy_is_defined_in_world_coordinates_not_array_order():
    """Flipping rows, columns and slices around the same field of view flips the array and nothing else."""
    reference = None
    for row, column, sign in ORIENTATIONS:
        shape = (96, 80, 30)
        pixel_spacing, slice_spacing = (0.8, 0.7), 2.0  # (row spacing, column spacing)
        steps = np.diag([0.7 * row[0], 0.8 * column[1], slice_spacing * sign])
        origin = np.array([10.0, -20.0, -150.0]) - steps @ ((np.asarray(shape) - 1) / 2)
        phantom = make_chest_ct(
            3,
            shape=shape,
            pixel_spacing_mm=pixel_spacing,
            slice_spacing_mm=slice_spacing,
            n_nodules=2,
            row_direction=row,
            column_direction=column,
            slice_direction_sign=sign,
            origin_mm=origin,
            noise_sigma_hu=0.0,
        )
        assert np.allclose(phantom.volume.affine[:3, :3], steps)
        flips = [axis for axis, step in enumerate(np.diag(steps)) if step < 0]
        canonical = np.flip(phantom.volume.voxels, axis=flips) if flips else phantom.volume.voxels
        if reference is None:
            reference = (canonical, phantom.lesions)
            continue
        assert np.allclose(canonical, reference[0], atol=1e-3)
        for lesion, expected in zip(phantom.lesions, reference[1], strict=True):
            assert np.allclose(lesion.center_mm, expected.center_mm, atol=1e-9)
            assert lesion.diameter_mm == pytest.approx(expected.diameter_mm)


def test_affine_follows_the_dicom_convention():
    phantom = make_chest_ct(
        1,
        shape=(64, 48, 20),
        pixel_spacing_mm=(0.6, 0.8),  # DICOM PixelSpacing: row spacing, column spacing
        slice_spacing_mm=1.25,
        row_direction=(-1, 0, 0),
        column_direction=(0, 1, 0),
        slice_direction_sign=-1,
        origin_mm=(12.5, -30.0, 100.0),
    )
    expected = np.array(
        [[-0.8, 0.0, 0.0, 12.5], [0.0, 0.6, 0.0, -30.0], [0.0, 0.0, -1.25, 100.0], [0.0, 0.0, 0.0, 1.0]]
    )
    assert np.allclose(phantom.volume.affine, expected)
    assert phantom.volume.shape == (64, 48, 20)
    assert phantom.volume.voxels.dtype == np.float32
    assert phantom.volume.modality == "CT"
    assert phantom.volume.source is None


def test_small_nodule_on_thick_slices_is_visible():
    for seed in range(4):
        params = sample_chest_ct_params(
            seed, shape=(128, 128, 40), slice_spacing_mm=3.0, nodule_diameters_mm=[5.0, 5.0], noise_sigma_hu=0.0
        )
        phantom = render_chest_ct(params)
        for lesion, nodule in zip(phantom.lesions, params.nodules, strict=True):
            assert lesion.diameter_mm == pytest.approx(5.0)
            assert voxel_at(phantom, np.asarray(lesion.center_mm)) > -200
            # Partial volume conserves the nodule: summed voxel fractions near it give its true volume.
            lung_hu = next(lung.hu for lung in params.lungs if lung.normalized_radius(*lesion.center_mm) < 1)
            affine, spacing = phantom.volume.affine, np.asarray(phantom.volume.spacing_mm)
            inverse = np.linalg.inv(affine)
            middle = np.rint(inverse[:3, :3] @ np.asarray(lesion.center_mm) + inverse[:3, 3]).astype(int)
            half = np.ceil(lesion.diameter_mm / spacing).astype(int) + 2
            box = tuple(slice(m - h, m + h + 1) for m, h in zip(middle, half, strict=True))
            index = np.indices(phantom.volume.shape)[(slice(None), *box)].reshape(3, -1).T
            world = index @ affine[:3, :3].T + affine[:3, 3]
            distance = np.min(
                [
                    np.linalg.norm(world - center, axis=1) - radius
                    for center, radius in zip(nodule.ball_centers_mm, nodule.ball_radii_mm, strict=True)
                ],
                axis=0,
            )
            near = distance <= np.linalg.norm(spacing) / 2  # partial volume reaches half a voxel diagonal out
            values = phantom.volume.voxels[box].reshape(-1)[near]
            fraction = (values - lung_hu) / (nodule.hu - lung_hu)
            voxel_mm3 = float(np.prod(phantom.volume.spacing_mm))
            assert fraction.sum() * voxel_mm3 / 1000 == pytest.approx(lesion.volume_ml, rel=0.03)


@pytest.mark.parametrize("seed", range(20))
def test_drawn_parameters_respect_the_ranges(seed):
    params = sample_chest_ct_params(seed)
    columns, rows, slices = params.shape
    assert columns == rows and 128 <= columns <= 512
    assert 40 <= slices <= 400
    assert all(0.5 <= s <= 1.0 for s in params.pixel_spacing_mm)
    assert 0.625 <= params.slice_spacing_mm <= 3.0
    assert params.row_direction in [(1.0, 0.0, 0.0), (-1.0, 0.0, 0.0)]
    assert params.column_direction in [(0.0, 1.0, 0.0), (0.0, -1.0, 0.0)]
    assert 0 <= len(params.nodules) <= 5
    assert all(5.0 <= n.diameter_mm <= 30.0 and 0.0 <= n.hu <= 100.0 for n in params.nodules)
    assert 30.0 <= params.body.hu <= 60.0
    assert all(-900.0 <= lung.hu <= -800.0 for lung in params.lungs)
    assert 10.0 <= params.noise_sigma_hu <= 40.0
    right, left = params.lungs
    assert right.center_mm[0] < params.body.center_mm[0] < left.center_mm[0]  # LPS: patient left is +x


def test_voxel_values_and_lung_extent():
    phantom = make_chest_ct(5, shape=(128, 128, 60))
    voxels = phantom.volume.voxels
    for i, j in itertools.product((0, -1), (0, -1)):
        assert np.all(voxels[i, j, :] == -1000.0)  # air outside the body, without noise
    midline = voxels[64, :, 30]  # front to back through the mediastinum
    assert midline[0] == midline[-1] == -1000.0 and np.any(midline > -200)
    lung_fraction_per_slice = np.mean(voxels < -600, axis=(0, 1)) - np.mean(voxels == -1000.0, axis=(0, 1))
    assert np.mean(lung_fraction_per_slice > 0.02) > 0.5  # lungs span most of even a short scan


def test_requested_nodule_that_cannot_fit_raises():
    with pytest.raises(ValueError, match="could not place"):
        make_chest_ct(0, shape=(128, 128, 40), pixel_spacing_mm=0.5, slice_spacing_mm=1.0, nodule_diameters_mm=[30])


def test_typical_phantom_is_fast():
    make_chest_ct(0, shape=(64, 64, 20))  # warm-up
    start = time.process_time()  # CPU time: robust to other jobs on the machine
    make_chest_ct(2, shape=(256, 256, 120), n_nodules=5)
    assert time.process_time() - start < 2.0  # ~0.5 s on one core
