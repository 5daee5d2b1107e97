"""The brain MR phantom against its planted ground truth, for any orientation, flip and origin."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from inference.io.dicom import read_dicom_series
from inference.phantoms import make_brain_mr, write_dicom_series
from inference.phantoms.brain_mr import BrainMRParams, lesion_mask, render_brain_mr, sample_brain_mr_params

ORIENTATIONS = list(
    itertools.product([(1.0, 0.0, 0.0), (-1.0, 0.0, 0.0)], [(0.0, 1.0, 0.0), (0.0, -1.0, 0.0)], [1, -1])
)


def params_for(seed: int, row, column, sign, **overrides) -> BrainMRParams:
    rng = np.random.default_rng(seed)
    kwargs = dict(
        shape=(112, 128, 40),
        pixel_spacing_mm=(1.7, 1.5),  # rows 1.7 mm apart, columns 1.5 mm: a swapped axis shows
        slice_spacing_mm=3.0,
        lesion_diameters_mm=[8.0, 14.0, 22.0],
        lesion_contrasts=["bright", "dark", "dark"],
        row_direction=row,
        column_direction=column,
        slice_direction_sign=sign,
        origin_mm=rng.uniform(-300, 300, size=3),
        noise_sigma=0.0,
        bias_amplitude=0.0,
    )
    kwargs.update(overrides)
    return sample_brain_mr_params(rng, **kwargs)


def voxel_at(volume, xyz_mm) -> float:
    index = np.rint(volume.lps_to_voxel(xyz_mm)[0]).astype(int)
    assert np.all(index >= 0) and np.all(index < volume.shape), f"{xyz_mm} is outside the volume"
    return float(volume.voxels[tuple(index)])


@pytest.mark.parametrize(("seed", "orientation"), enumerate(ORIENTATIONS))
def test_planted_lesions_are_where_the_truth_says(seed, orientation):
    params = params_for(seed, *orientation)
    phantom = render_brain_mr(params)
    volume = phantom.volume
    white, grey = params.tissue("white matter").intensity, params.tissue("grey matter").intensity
    mask = lesion_mask(params)
    labels = np.zeros(volume.shape, dtype=int)
    for n, lesion in enumerate(params.lesions, start=1):  # each lesion's own voxels, for per-lesion checks
        one = lesion_mask(BrainMRParams(**{**params.__dict__, "lesions": (lesion,)}))
        labels[one] = n
    assert np.array_equal(mask, labels > 0)
    voxel_ml = abs(np.linalg.det(volume.affine[:3, :3])) / 1000

    assert [round(lesion.diameter_mm, 6) for lesion in phantom.lesions] == [8.0, 14.0, 22.0]
    for n, (truth, lesion) in enumerate(zip(phantom.lesions, params.lesions, strict=True), start=1):
        assert truth.label == "lesion"
        center = np.asarray(truth.center_mm)
        value = voxel_at(volume, center)
        # The tissue the lesion sits in (its center): the reference of its contrast.
        local = white if params.tissue("white matter").region.contains(*center) else grey
        if lesion.contrast == "bright":
            assert value > 1.2 * local, truth
        else:
            assert value < 0.85 * local, truth
        # The voxels whose centers lie in the lesion: centroid and volume as planted, through the affine.
        ijk = np.argwhere(labels == n)
        centroid_mm = volume.voxel_to_lps(ijk.mean(axis=0))[0]
        assert np.linalg.norm(centroid_mm - center) < 0.5, (truth, centroid_mm)
        assert len(ijk) * voxel_ml == pytest.approx(truth.volume_ml, rel=0.15)
        # Outside the lesion, along each in-plane axis and both ways: brain tissue, not lesion.
        for axis, sign in itertools.product((0, 1), (1, -1)):
            direction = sign * volume.affine[:3, axis] / np.linalg.norm(volume.affine[:3, axis])
            point = center + (0.5 * truth.diameter_mm + 3.0) * direction
            index = np.rint(volume.lps_to_voxel(point)[0]).astype(int)
            inside = np.all(index >= 0) and np.all(index < volume.shape) and not mask[tuple(index)]
            if inside and params.tissue("white matter").region.contains(*point) == (local == white):
                assert abs(voxel_at(volume, point) - lesion.intensity) > 0.15 * local  # the same tissue around it


def test_bias_and_noise_are_smooth_and_bounded():
    params = params_for(0, *ORIENTATIONS[5], noise_sigma=None, bias_amplitude=None)
    clean = render_brain_mr(params_for(0, *ORIENTATIONS[5]))
    noisy = render_brain_mr(params)
    assert params.noise_sigma > 0
    white_region = params.tissue("white matter").region
    x, y, z = (
        noisy.volume.voxel_to_lps(np.argwhere(np.ones(noisy.volume.shape, dtype=bool)))
        .T.reshape(3, *noisy.volume.shape)
        .astype(np.float64)
    )
    inside = white_region.contains(x, y, z) & ~lesion_mask(params)
    ratio = noisy.volume.voxels[inside] / clean.volume.voxels[inside]
    assert 0.5 < np.median(ratio) < 1.5 and np.all(ratio > 0.3)
    # The background is Rician: positive, about sigma * sqrt(pi / 2).
    background = noisy.volume.voxels[0, 0, :]
    assert np.all(background >= 0) and 0.5 * params.noise_sigma < background.mean() < 2.5 * params.noise_sigma


def test_drawn_phantoms_cover_the_ranges_and_both_contrasts():
    contrasts = set()
    for seed in range(12):
        params = sample_brain_mr_params(seed)
        spacing = np.linalg.norm(params.affine[:3, :3], axis=0)
        assert 0.8 <= spacing[0] <= 1.5 and 0.8 <= spacing[1] <= 1.5 and 1.0 <= spacing[2] <= 5.0
        assert len(params.lesions) <= 3
        for lesion in params.lesions:
            assert 5.0 <= lesion.geometry.diameter_mm <= 40.0 + 1e-9
            contrasts.add(lesion.contrast)
    assert contrasts == {"bright", "dark"}


def test_lesion_mask_on_another_grid_matches_the_planted_volume():
    params = params_for(3, *ORIENTATIONS[3])
    grid = np.diag([-0.5, -0.5, 0.5, 1.0])  # a fine RAS-like grid around the first lesion
    truth = render_brain_mr(params).lesions[0]
    grid[:3, 3] = np.asarray(truth.center_mm) - grid[:3, :3] @ np.full(3, 15.5)
    mask = lesion_mask(params, affine=grid, shape=(32, 32, 32))
    assert mask.sum() * 0.125 / 1000 == pytest.approx(truth.volume_ml, rel=0.05)


def test_mr_dicom_round_trip_keeps_voxels_and_geometry(tmp_path):
    phantom = make_brain_mr(7, shape=(64, 80, 12), pixel_spacing_mm=1.2, slice_spacing_mm=4.0, n_lesions=1)
    files = write_dicom_series(phantom, tmp_path, shuffle=np.random.default_rng(0))
    volume = read_dicom_series(files)
    assert volume.modality == "MR"
    # The reader orders slices by geometry, so compare voxel by voxel at the same LPS position.
    read_to_planted = np.linalg.inv(phantom.volume.affine) @ volume.affine
    index = np.argwhere(np.ones(volume.shape, dtype=bool))
    planted_index = index @ read_to_planted[:3, :3].T + read_to_planted[:3, 3]
    assert np.allclose(planted_index, np.rint(planted_index), atol=1e-3)
    planted = phantom.volume.voxels[tuple(np.rint(planted_index).astype(int).T)]
    assert np.max(np.abs(volume.voxels[tuple(index.T)] - planted)) <= 0.5 + 1e-3
