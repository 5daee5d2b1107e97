"""Slab-by-slab preprocessing (inference.tasks.slabs) against the whole-study path, in-process and small."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from inference.io.volume import Volume
from inference.modelrepo.schema import ModelConfig
from inference.tasks.detection import DetectionTask
from inference.tasks.preprocess import preprocess
from inference.tasks.slabs import SlabImage, SlabPlan

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ct_config() -> ModelConfig:
    return ModelConfig.from_yaml(ROOT / "models" / "lung_nodule_ct" / "1" / "model.yaml")


def test_bundled_models_declare_whether_they_read_progressively():
    configs = {p.parent.parent.name: ModelConfig.from_yaml(p) for p in sorted(ROOT.glob("models/*/*/model.yaml"))}
    assert configs["lung_nodule_ct"].progressive and configs["lung_nodule_ct"].progressive_refusal() is None
    assert "study" in configs["brain_lesion_mr"].progressive_refusal()
    assert "2-D" in configs["chest_xray"].progressive_refusal()
    for name in ("brain_lesion_mr", "chest_xray"):
        assert not configs[name].progressive
        data = {**_yaml(ROOT / "models" / name / "1" / "model.yaml"), "progressive": True}
        with pytest.raises(ValueError, match="cannot be read progressively"):
            ModelConfig.from_dict(data, version="1")


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("flip", [1.0, -1.0])
def test_slab_patches_equal_the_whole_study_patches(ct_config, flip):
    """Every patch, filled plane by plane from the slices in arbitrary chunks, equals prepare's within 1e-4 of the
    window, on noise (the worst case for interpolation differences) and with the axes flipped."""
    rng = np.random.default_rng(0)
    shape = (70, 60, 90)
    affine = np.array(
        [[0.0, 1.1 * flip, 0.0, 30.0], [-1.1, 0.0, 0.0, -20.0], [0.0, 0.0, 2.0 * flip, -300.0], [0, 0, 0, 1.0]]
    )
    voxels = rng.normal(-300.0, 500.0, shape).astype(np.float32)
    volume = Volume(voxels, affine, "CT")
    task = DetectionTask(ct_config, torch.device("cpu"))
    whole = task.prepare(volume)
    plan = SlabPlan.build(shape, affine, ct_config)
    assert plan.plan == whole.context.plan and np.allclose(plan.affine, whole.context.affine, atol=1e-9)
    assert len(plan) > 1 and len({p for p, _ in plan.patch_planes}) > 1  # several rows along the slices
    image = SlabImage(plan)
    planes = np.arange(plan.n_planes)
    for chunk in np.array_split(rng.permutation(planes), 7):
        for p in sorted(chunk):
            image.fill(int(p), int(p), lambda k0, k1: np.moveaxis(voxels[:, :, k0 : k1 + 1], 2, 0))
    assert image.filled.all()
    for index, expected in enumerate(whole.items):
        assert image.ready(index)
        assert float((image.patch(index) - expected).abs().max()) < 1e-4


def test_a_half_voxel_extent_gets_one_grid_whatever_the_float_noise(ct_config):
    """160 slices of 1.25 mm are 132.5 steps of 1.5 mm: the grid must not depend on 1e-14 mm in the affine."""
    affine = np.array(
        [[0.7, 0, 0, -193.08361549], [0, -0.7, 0, 196.79597789], [0, 0, -1.25, -251.15983839], [0, 0, 0, 1]]
    )
    shapes = set()
    for noise in (0.0, 3e-14, -3e-14):
        noisy = affine.copy()
        noisy[2, 2] += noise
        noisy[2, 3] += noise * 100
        shapes.add(SlabPlan.build((16, 16, 160), noisy, ct_config).plan.image_shape)
        volume = Volume(np.zeros((16, 16, 160), np.float32), noisy, "CT")
        shapes.add(tuple(preprocess(volume, ct_config.preprocessing).image.shape[1:]))
    assert len(shapes) == 1, shapes
