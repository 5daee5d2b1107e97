"""Intensity normalisation of ``preprocess``: the foreground z-score against values planted in the voxels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.io.volume import Volume
from inference.modelrepo.schema import PreprocessConfig
from inference.tasks.preprocess import preprocess

FOREGROUND = PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0), normalize="zscore_foreground")


def head_in_air(fov_voxels: int, seed: int, scale: float = 1.0) -> tuple[Volume, np.ndarray]:
    """A 40^3-voxel "head" of two tissues (300 and 700, half each) centred in Rician-like air of ``fov_voxels``^3.

    Returns the volume (2 mm voxels, so resampling is the identity) and the boolean head mask.
    """
    rng = np.random.default_rng(seed)
    voxels = np.abs(rng.normal(0.0, 15.0, (fov_voxels,) * 3))  # the air: noise magnitude, never zero
    lo = (fov_voxels - 40) // 2
    head = np.zeros(voxels.shape, dtype=bool)
    head[lo : lo + 40, lo : lo + 40, lo : lo + 40] = True
    tissue = np.where(np.arange(40) < 20, 300.0, 700.0)[:, None, None] * np.ones((40, 40, 40))
    voxels[head] = tissue.ravel()
    affine = np.diag([-2.0, -2.0, 2.0, 1.0])  # R->L, A->P, I->S: already RAS, so no reorientation
    return Volume(voxels=(voxels * scale).astype(np.float32), affine=affine, modality="MR"), head


def normalised(volume: Volume, cfg: PreprocessConfig) -> np.ndarray:
    out = preprocess(volume, cfg)
    assert np.allclose(out.affine, volume.affine, atol=1e-6)  # 2 mm RAS-ordered in, the same grid out
    return out.image[0].numpy()


def test_the_head_gets_zero_mean_and_unit_deviation_whatever_the_air_around_it():
    # The head's two tissues in equal parts: mean 500, population std 200 -> -1 and +1 exactly.
    for fov in (48, 80):
        volume, head = head_in_air(fov, seed=fov)
        image = normalised(volume, FOREGROUND)
        np.testing.assert_allclose(np.unique(image[head].round(3)), [-1.0, 1.0], atol=2e-3)
        assert image[~head].max() < -1.5  # the air stays well under the darker tissue


def test_nonzero_zscore_depends_on_the_field_of_view_and_the_foreground_one_does_not():
    small, small_head = head_in_air(48, seed=1)
    large, large_head = head_in_air(80, seed=2)
    nonzero = PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0), normalize="zscore")
    assert abs(normalised(small, nonzero)[small_head].max() - normalised(large, nonzero)[large_head].max()) > 0.5
    np.testing.assert_allclose(
        normalised(small, FOREGROUND)[small_head].max(), normalised(large, FOREGROUND)[large_head].max(), atol=2e-3
    )


def test_the_foreground_zscore_ignores_the_intensity_scale():
    volume, _ = head_in_air(48, seed=3)
    scaled, _ = head_in_air(48, seed=3, scale=7.5)
    np.testing.assert_allclose(normalised(volume, FOREGROUND), normalised(scaled, FOREGROUND), atol=1e-4)


def test_a_blank_image_is_centred_not_divided_by_zero():
    voxels = np.zeros((16, 16, 16), dtype=np.float32)
    blank = Volume(voxels=voxels, affine=np.diag([-2.0, -2.0, 2.0, 1.0]), modality="MR")
    image = normalised(blank, FOREGROUND)
    assert torch.isfinite(torch.from_numpy(image)).all() and np.all(image == 0.0)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_a_foreground_fraction_outside_0_1_is_refused(fraction):
    with pytest.raises(ValueError, match=r"preprocessing.foreground_fraction must be in \(0, 1\)"):
        PreprocessConfig(normalize="zscore_foreground", foreground_fraction=fraction)


def test_an_unknown_normalisation_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"preprocessing\.normalize must be one of .*zscore_foreground.*got 'minmax'"):
        PreprocessConfig(normalize="minmax")


@pytest.mark.parametrize("mode", ["window", "zscore", "zscore_foreground"])
def test_preprocessing_never_writes_to_the_callers_voxels(mode):
    # On its own grid (2 mm, RAS order) the resampling is the identity and MONAI hands back the input's memory.
    volume, _ = head_in_air(48, seed=4)
    before = volume.voxels.copy()
    preprocess(volume, PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0), normalize=mode))
    np.testing.assert_array_equal(volume.voxels, before)
