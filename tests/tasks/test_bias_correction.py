"""MR bias-field correction of ``preprocess`` against a field planted in a phantom whose true intensities are known."""

from __future__ import annotations

import numpy as np
import pytest

from inference.io.volume import Volume
from inference.modelrepo.schema import ModelConfig, PreprocessConfig
from inference.tasks.preprocess import correct_bias, preprocess

N = 72  # voxels a side, 2 mm: identity resampling, so voxel (i, j, k) of the output is voxel (i, j, k) of the input
AFFINE = np.diag([-2.0, -2.0, 2.0, 1.0])  # already RAS-ordered: no reorientation
IDENTITY = PreprocessConfig(
    spacing_mm=(2.0, 2.0, 2.0), normalize="window", a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=False
)
WHITE, GREY, SCALP, BRIGHT, DARK = 700.0, 450.0, 550.0, 1000.0, 420.0


def world_mm() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    i, j, k = np.meshgrid(*[np.arange(N, dtype=np.float64)] * 3, indexing="ij")
    return -2.0 * i, -2.0 * j, 2.0 * k


def head(noise: float, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A head of scalp, grey and white matter with a bright and a dark lesion, in noisy air: voxels and masks."""
    x, y, z = world_mm()
    c = np.array([-71.0, -71.0, 71.0])  # the grid's center in mm
    r = np.sqrt(((x - c[0]) / 62) ** 2 + ((y - c[1]) / 66) ** 2 + ((z - c[2]) / 58) ** 2)
    masks = {"head": r < 1.0, "brain": r < 0.9, "white": r < 0.72}
    bright = (x - c[0] - 15) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 < 8**2
    dark = (x - c[0] + 15) ** 2 + (y - c[1] - 10) ** 2 + (z - c[2]) ** 2 < 6**2
    masks["bright"], masks["dark"] = bright, dark
    masks["white only"] = masks["white"] & ~bright & ~dark
    voxels = np.zeros((N, N, N))
    voxels[masks["head"]] = SCALP
    voxels[masks["brain"]] = GREY
    voxels[masks["white"]] = WHITE
    voxels[bright], voxels[dark] = BRIGHT, DARK
    rng = np.random.default_rng(seed)
    voxels = np.abs(voxels + rng.normal(0.0, noise, voxels.shape) + 1j * rng.normal(0.0, noise, voxels.shape))
    return voxels, masks


def exp_quadratic_field() -> np.ndarray:
    """A bias field of the polynomial family the correction fits: about -25 % to +30 % across the head."""
    x, y, z = world_mm()
    u, v, w = (x + 71) / 70, (y + 71) / 70, (z - 71) / 70
    return np.exp(0.18 * u - 0.1 * v + 0.08 * w - 0.12 * u * u + 0.06 * v * w + 0.05 * w * w)


def linear_field() -> np.ndarray:
    """A field outside that family, ``1 + a.x``: about -30 % to +30 % across the head."""
    x, _, z = world_mm()
    return 1.0 + 0.3 * ((x + 71) / 70 * 0.6 + (z - 71) / 70 * 0.8)


def corrected(voxels: np.ndarray) -> np.ndarray:
    pre = preprocess(Volume(voxels=voxels.astype(np.float32), affine=AFFINE, modality="MR"), IDENTITY)
    assert np.allclose(pre.affine, AFFINE)
    return correct_bias(pre.image, 2, IDENTITY.foreground_fraction, IDENTITY.percentile_high)[0].numpy()


def spread(values: np.ndarray) -> float:
    return float(values.std() / values.mean())


@pytest.mark.parametrize("field", [exp_quadratic_field, linear_field], ids=["exp-quadratic", "linear"])
def test_the_planted_field_is_divided_out_of_every_tissue(field):
    clean, masks = head(noise=5.0)
    bias = field()
    out = corrected(clean * bias)
    inside = masks["head"]
    ratio = out[inside] / clean[inside]  # a constant where the field is gone
    assert spread((clean * bias)[inside] / clean[inside]) > 0.08  # the premise: a strong field was planted
    assert spread(ratio) < 0.02
    white = masks["white only"]
    assert spread(out[white]) < 0.02  # white matter is one intensity again (noise is 0.7 %)
    scale = np.median(out[white]) / WHITE
    assert abs(scale - 1.0) < 0.15  # the image keeps its intensity scale


def test_lesion_and_tissue_contrasts_are_kept():
    clean, masks = head(noise=5.0)
    out = corrected(clean * exp_quadratic_field())
    white = np.median(out[masks["white only"]])
    assert np.median(out[masks["bright"]]) / white == pytest.approx(BRIGHT / WHITE, rel=0.02)
    assert np.median(out[masks["dark"]]) / white == pytest.approx(DARK / WHITE, rel=0.02)
    grey = masks["brain"] & ~masks["white"]
    assert np.median(out[grey]) / white == pytest.approx(GREY / WHITE, rel=0.03)


def test_an_image_without_a_field_is_left_as_it_is():
    clean, masks = head(noise=5.0, seed=1)
    out = corrected(clean)
    ratio = out[masks["head"]] / clean[masks["head"]]
    assert spread(ratio) < 0.005


def test_an_image_without_foreground_is_returned_unchanged():
    air = np.zeros((N, N, N))
    air[:2, :2, :2] = 1000.0  # a few bright voxels: far under the fit's minimum sample count
    np.testing.assert_array_equal(corrected(air), air.astype(np.float32))


def test_the_zscored_study_no_longer_depends_on_the_field():
    clean, masks = head(noise=5.0, seed=3)
    cfg = PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0), normalize="zscore_foreground", bias_correction_degree=2)
    plain = PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0), normalize="zscore_foreground")

    def z(voxels: np.ndarray, config: PreprocessConfig) -> np.ndarray:
        return (
            preprocess(Volume(voxels=voxels.astype(np.float32), affine=AFFINE, modality="MR"), config).image[0].numpy()
        )

    brain = masks["brain"]
    reference = z(clean, cfg)[brain]
    assert np.abs(z(clean * exp_quadratic_field(), plain)[brain] - reference).mean() > 0.2  # the premise
    assert np.abs(z(clean * exp_quadratic_field(), cfg)[brain] - reference).mean() < 0.05


@pytest.mark.parametrize("degree", [-1, 4, 2.5])
def test_an_unsupported_degree_is_refused_naming_the_key(degree):
    with pytest.raises(ValueError, match=r"preprocessing\.bias_correction_degree"):
        PreprocessConfig(bias_correction_degree=degree)


def test_model_yaml_takes_the_degree():
    config = ModelConfig.from_dict(
        {
            "name": "m",
            "task": "segmentation",
            "modalities": ["MR"],
            "labels": ["lesion"],
            "preprocessing": {
                "spacing_mm": [1.5, 1.5, 1.5],
                "normalize": "zscore_foreground",
                "bias_correction_degree": 2,
            },
            "network": {"target": "monai.networks.nets.UNet", "args": {}},
            "inferer": {"roi_size": [32, 32, 32]},
        },
        version="1",
    )
    assert config.preprocessing.bias_correction_degree == 2
