"""SegmentationTask: mask -> Finding geometry, patch stitching, the input-grid mask, and the committed weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from inference.io.volume import SourceImage, SourceRefs, Volume
from inference.modelrepo.schema import ModelConfig
from inference.phantoms import make_brain_mr
from inference.phantoms.brain_mr import BallUnion
from inference.tasks import task_class
from inference.tasks.direct import load_network, run_direct
from inference.tasks.patches import extract_patches, plan_patches
from inference.tasks.postprocess.segmentation import mask_to_findings, stitch_patches
from inference.tasks.segmentation import SegmentationTask

ROOT = Path(__file__).resolve().parents[2]
MODEL_YAML = ROOT / "models" / "brain_lesion_mr" / "1" / "model.yaml"
VERSIONS = sorted(p.name for p in (ROOT / "models" / "brain_lesion_mr").iterdir() if (p / "model.yaml").is_file())

# Sagittal-like and flipped: i runs to -y (0.8 mm), j to -z (0.9 mm), k to -x (3 mm).
SAGITTAL_FLIPPED = np.array(
    [
        [0.0, 0.0, -3.0, 100.0],
        [-0.8, 0.0, 0.0, -50.0],
        [0.0, -0.9, 0.0, 20.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def tiny_config(inferer: dict | None = None, **postprocessing) -> ModelConfig:
    """A segmentation model.yaml whose network is never built: the tests bring their own."""
    return ModelConfig.from_dict(
        {
            "name": "test_seg",
            "task": "segmentation",
            "modalities": ["MR"],
            "labels": ["lesion"],
            # A window, so that a 0/1000 phantom maps to [0, 1] and a threshold network finds its mid-contour.
            "preprocessing": {"spacing_mm": [1.5, 1.5, 1.5], "a_min": 0.0, "a_max": 1000.0},
            "network": {"target": "monai.networks.nets.UNet", "args": {"in_channels": 1, "out_channels": 2}},
            "inferer": {"roi_size": [32, 32, 24], "overlap": 0.25, **(inferer or {})},
            "postprocessing": {"score_threshold": 0.5, **postprocessing},
        },
        version="1",
    )


def test_mask_to_findings_geometry_on_a_flipped_permuted_affine():
    shape = (30, 40, 10)
    refs = SourceRefs(
        study_instance_uid="1.2",
        series_instance_uid="1.2.3",
        frame_of_reference_uid=None,
        images=tuple(SourceImage(f"1.2.3.{k}", "1.2.840.10008.5.1.4.1.1.4", k) for k in range(shape[2])),
    )
    volume = Volume(np.zeros(shape, np.float32), SAGITTAL_FLIPPED, "MR", source=refs)
    mask = np.zeros(shape, dtype=bool)
    probability = np.zeros(shape, dtype=np.float32)
    mask[10:15, 20:28, 3:6] = True  # 5 x 8 x 3 voxels
    probability[10:15, 20:28, 3:6] = 0.8
    mask[25, 2, 8] = True  # one voxel of 2.16 mm3: under the minimum volume
    probability[25, 2, 8] = 0.9

    findings, components = mask_to_findings(mask, probability, (0, 0, 0), volume, "lesion", min_volume_ml=0.005)

    assert len(findings) == 1 and len(components) == 1
    f = findings[0]
    assert f.label == "lesion"
    assert f.score == pytest.approx(0.8)
    # Centroid index (12, 23.5, 4): x = 100 - 3 * 4, y = -50 - 0.8 * 12, z = 20 - 0.9 * 23.5.
    assert f.center_voxel == pytest.approx((12.0, 23.5, 4.0))
    assert f.center_mm == pytest.approx((88.0, -59.6, -1.15))
    # Voxel edges: k 2.5..5.5 -> x 83.5..92.5, i 9.5..14.5 -> y -61.6..-57.6, j 19.5..27.5 -> z -4.75..2.45.
    assert f.bbox_mm == pytest.approx((83.5, -61.6, -4.75, 92.5, -57.6, 2.45))
    assert f.volume_ml == pytest.approx(120 * 0.8 * 0.9 * 3.0 / 1000)
    # Farthest voxel centers: opposite corners, (4 x 0.8, 7 x 0.9, 2 x 3) mm apart.
    assert f.diameter_mm == pytest.approx(np.linalg.norm([4 * 0.8, 7 * 0.9, 2 * 3.0]))
    assert f.sop_instance_uid == "1.2.3.4"  # the slice of the centroid, k = 4
    box, component = components[0]
    assert box == (slice(10, 15), slice(20, 28), slice(3, 6)) and component.all()


def test_components_under_the_minimum_score_are_not_findings():
    volume = Volume(np.zeros((30, 30, 10), np.float32), SAGITTAL_FLIPPED, "MR")
    probability = np.zeros(volume.shape, dtype=np.float32)
    probability[2:8, 2:8, 2:5] = 0.95  # a confident component
    probability[20:26, 20:26, 2:5] = 0.6  # a weak one, just over a 0.55 voxel threshold
    mask = probability >= 0.55

    for min_score, expected in ((0.0, [0.95, 0.6]), (0.55, [0.95, 0.6]), (0.75, [0.95])):
        findings, components = mask_to_findings(mask, probability, (0, 0, 0), volume, "lesion", min_score=min_score)
        assert sorted((f.score for f in findings), reverse=True) == pytest.approx(expected)
        assert len(components) == len(findings)
    with pytest.raises(ValueError, match=r"postprocessing\.min_score must be in \[0, 1\), got 1\.0"):
        tiny_config(min_score=1.0)


def test_diameter_runs_between_voxel_centers_and_never_under_one_voxel():
    volume = Volume(np.zeros((20, 5, 5), np.float32), SAGITTAL_FLIPPED, "MR")
    mask = np.zeros(volume.shape, dtype=bool)
    mask[3:10, 2, 2] = True  # 7 voxels along i, 0.8 mm apart
    mask[15, 2, 2] = True  # a single voxel: its largest side, 3 mm
    findings, _ = mask_to_findings(mask, mask.astype(np.float32), (0, 0, 0), volume, "lesion")
    assert sorted(f.diameter_mm for f in findings) == pytest.approx([3.0, 6 * 0.8])


@pytest.mark.parametrize("blend_mode", ["gaussian", "constant"])
def test_stitching_reproduces_constant_and_smooth_maps(blend_mode):
    task = SegmentationTask(tiny_config(), torch.device("cpu"), blend_mode=blend_mode)
    shape = (70, 37, 20)  # overlapping patches along x and y; shorter than the ROI along z: padded there
    plan = plan_patches(shape, task.roi_size, overlap=0.25)
    assert len(plan) == 6 and plan.padded_shape == (70, 37, 24)

    constant = [torch.full((1, *task.roi_size), 0.75, dtype=torch.float16) for _ in range(len(plan))]
    stitched = stitch_patches(plan, constant, task.importance_map)
    assert stitched.shape == (1, *shape)
    assert torch.allclose(stitched, torch.full_like(stitched, 0.75), atol=1e-6)

    grid = torch.meshgrid(*[torch.linspace(0, 1, s) for s in shape], indexing="ij")
    smooth = (torch.sin(3 * grid[0]) * torch.cos(2 * grid[1]) + grid[2])[None]
    patches = extract_patches(smooth, plan, pad_value=-7.0)
    assert torch.allclose(stitch_patches(plan, patches, task.importance_map), smooth, atol=1e-5)


class ThresholdNetwork(torch.nn.Module):
    """Two-channel logits whose softmax is 0.5 where the windowed image is 0.5: the planted contour."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), 40.0 * (x - 0.5)], dim=1)


def test_finalize_puts_the_mask_and_findings_on_the_input_grid():
    shape = (70, 60, 24)
    affine = SAGITTAL_FLIPPED.copy()
    center_index = np.array([31.3, 28.6, 11.4])
    center_mm = affine[:3, :3] @ center_index + affine[:3, 3]
    sphere = BallUnion((tuple(center_mm),), (12.0,))
    ijk = np.argwhere(np.ones(shape, dtype=bool))
    centers = (ijk @ affine[:3, :3].T + affine[:3, 3]).reshape(*shape, 3)
    voxels = 1000.0 * sphere.coverage(centers, affine[:3, :3])
    volume = Volume(voxels.astype(np.float32), affine, "MR")
    task = SegmentationTask(tiny_config(), torch.device("cpu"))

    prepared = task.prepare(volume)
    results = task.split_outputs(ThresholdNetwork()(torch.stack(prepared.items)), len(prepared.items))
    output = task.finalize(volume, prepared, results)

    assert len(output.findings) == len(output.masks) == 1
    f, finding_mask = output.findings[0], output.masks[0]
    volume_ml = 4 / 3 * np.pi * 12.0**3 / 1000
    assert np.linalg.norm(np.subtract(f.center_mm, center_mm)) < 0.5
    assert f.volume_ml == pytest.approx(volume_ml, rel=0.1)
    assert f.diameter_mm == pytest.approx(24.0, abs=2.0)
    lo, hi = np.array(f.bbox_mm[:3]), np.array(f.bbox_mm[3:])
    assert np.all(np.abs(lo - (center_mm - 12.0)) < 2.0) and np.all(np.abs(hi - (center_mm + 12.0)) < 2.0)
    mask = finding_mask.dense(shape)
    truth = sphere.signed_distance_mm(centers) <= 0
    assert mask.dtype == bool
    assert 2 * np.sum(mask & truth) / (mask.sum() + truth.sum()) > 0.9
    assert f.score > 0.9
    # The mask is the finding: its voxels are the volume reported, its centroid the center.
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    assert finding_mask.voxel_count * voxel_ml == pytest.approx(f.volume_ml, rel=1e-9)
    np.testing.assert_allclose(np.argwhere(mask).mean(axis=0), f.center_voxel, atol=1e-9)


def test_no_finding_gives_no_mask():
    volume = Volume(np.full((40, 40, 12), 100.0, np.float32), SAGITTAL_FLIPPED, "MR")
    task = SegmentationTask(tiny_config(), torch.device("cpu"))
    prepared = task.prepare(volume)
    results = task.split_outputs(ThresholdNetwork()(torch.stack(prepared.items)), len(prepared.items))
    output = task.finalize(volume, prepared, results)
    assert output.findings == [] and output.masks == []


def test_the_blend_mode_comes_from_the_model_yaml_and_unknown_modes_are_refused():
    config = tiny_config()
    assert config.inferer.mode == "gaussian"
    weights = SegmentationTask(config, torch.device("cpu")).importance_map
    assert weights.max() > 10 * weights.min()  # gaussian: a patch's center outweighs its corners
    constant = tiny_config(inferer={"mode": "constant"})
    assert SegmentationTask(constant, torch.device("cpu")).importance_map.unique().tolist() == [1.0]
    with pytest.raises(ValueError, match=r"inferer\.mode must be one of \('gaussian', 'constant'\), got 'median'"):
        tiny_config(inferer={"mode": "median"})


@pytest.mark.parametrize("version", VERSIONS)
def test_the_bundled_model_is_a_segmentation_task(version):
    config = ModelConfig.from_yaml(MODEL_YAML.parents[1] / version / "model.yaml")
    assert config.name == "brain_lesion_mr" and config.modalities == ("MR",) and config.labels == ("lesion",)
    assert config.preprocessing.normalize == "zscore_foreground"
    assert task_class(config) is SegmentationTask
    assert config.weights_path.stat().st_size < 20e6


# What each version's weights are good for (its MODEL_CARD.md): version 1, lesions of 10 mm and more, bright or dark
# (it finds about half of those under 10 mm); version 2 also lesions of 5-10 mm (about 85 % of them).
LESIONS_BY_VERSION = {"1": ([12.0, 24.0], ["dark", "bright"]), "2": ([7.0, 12.0, 24.0], ["dark", "dark", "bright"])}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("seed", [9001, 9002])
def test_committed_weights_find_the_planted_lesions(seed, version):
    torch.set_num_threads(2)
    config = ModelConfig.from_yaml(MODEL_YAML.parents[1] / version / "model.yaml")
    task = SegmentationTask(config, torch.device("cpu"))
    network = load_network(task)
    diameters, contrasts = LESIONS_BY_VERSION[version]
    phantom = make_brain_mr(seed, lesion_diameters_mm=diameters, lesion_contrasts=contrasts)

    findings = run_direct(task, network, phantom.volume, batch_size=config.batching.max_batch_size)

    unmatched = list(findings)
    for lesion in phantom.lesions:
        distances = [np.linalg.norm(np.subtract(f.center_mm, lesion.center_mm)) for f in unmatched]
        assert distances and min(distances) <= 3.0, (lesion, findings)
        unmatched.pop(int(np.argmin(distances)))
    assert len(unmatched) <= 1, unmatched
