"""Detection: box geometry against hand-computed truth, patch merging, MONAI-equivalent decoding, and the
committed lung_nodule_ct weights on fresh phantoms read through run_direct (the service's code path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from scipy import ndimage

from inference.io.volume import SourceImage, SourceRefs, Volume
from inference.modelrepo.schema import DetectorConfig, ModelConfig, PostprocessConfig
from inference.networks.retinanet import build_retinanet, feature_map_strides
from inference.phantoms.chest_ct import make_chest_ct
from inference.tasks.detection import DetectionTask
from inference.tasks.direct import load_network, run_direct
from inference.tasks.patches import plan_patches
from inference.tasks.postprocess.detection import (
    Detections,
    RetinaNetDecoder,
    boxes_from_centers,
    boxes_to_findings,
    build_anchor_generator,
    merge_patch_detections,
)
from inference.tasks.preprocess import preprocess

ROOT = Path(__file__).resolve().parents[2]
MODEL_YAML = ROOT / "models" / "lung_nodule_ct" / "1" / "model.yaml"

# A preprocessed image in RAS axes (LPS x and y decrease with the index) and an input volume with a
# different, flipped orientation: columns along +x, rows along -y, slices along -z.
PRE_AFFINE = np.array([[-1.5, 0, 0, 100.0], [0, -1.5, 0, 50.0], [0, 0, 1.5, -200.0], [0, 0, 0, 1]])
VOLUME_AFFINE = np.array([[0.7, 0, 0, 60.0], [0, -0.8, 0, 40.0], [0, 0, -2.5, -100.0], [0, 0, 0, 1]])


def _volume(with_source: bool = True) -> Volume:
    source = None
    if with_source:
        images = tuple(SourceImage(f"1.2.3.{k}", "1.2.840.10008.5.1.4.1.1.2", k) for k in range(40))
        source = SourceRefs("1.2", "1.2.1", None, images)
    return Volume(np.zeros((64, 64, 40), np.float32), VOLUME_AFFINE, "CT", source)


def _detections(boxes: list[list[float]], scores: list[float]) -> Detections:
    return Detections(
        np.asarray(boxes, np.float32).reshape(-1, 6), np.asarray(scores, np.float32), np.zeros(len(scores), np.int64)
    )


def test_box_to_finding_matches_hand_computed_truth_for_flipped_affines() -> None:
    # Voxel-edge box [10, 16) x [20, 24) x [30, 40): voxel-center indices 9.5..15.5, 19.5..23.5, 29.5..39.5.
    det = _detections([[10, 20, 30, 16, 24, 40]], [0.9])
    (finding,) = boxes_to_findings(det, PRE_AFFINE, _volume(), ["nodule"])
    # center index (12.5, 21.5, 34.5) -> x = 100 - 1.5 * 12.5, y = 50 - 1.5 * 21.5, z = -200 + 1.5 * 34.5
    np.testing.assert_allclose(finding.center_mm, (81.25, 17.75, -148.25))
    np.testing.assert_allclose(finding.bbox_mm, (76.75, 14.75, -155.75, 85.75, 20.75, -140.75))
    assert finding.diameter_mm == pytest.approx(15.0)  # longest side: 10 voxels of 1.5 mm
    # Into the input volume: ((81.25 - 60) / 0.7, (17.75 - 40) / -0.8, (-148.25 + 100) / -2.5)
    np.testing.assert_allclose(finding.center_voxel, (30.357142857, 27.8125, 19.3), atol=1e-6)
    assert finding.sop_instance_uid == "1.2.3.19"
    assert finding.label == "nodule" and finding.score == pytest.approx(0.9)


def test_findings_drop_small_boxes_sort_by_score_and_work_without_dicom_context() -> None:
    det = _detections([[10, 10, 10, 12, 12, 12], [30, 30, 30, 38, 38, 38], [50, 50, 50, 56, 56, 56]], [0.9, 0.6, 0.8])
    findings = boxes_to_findings(det, PRE_AFFINE, _volume(with_source=False), ["nodule"], min_size_mm=4.0)
    assert [f.score for f in findings] == pytest.approx([0.8, 0.6])  # the 3 mm box is gone
    assert all(f.sop_instance_uid is None for f in findings)


def test_training_boxes_and_findings_agree_on_the_planted_center() -> None:
    """The voxel-edge convention round-trips: a lesion's target box decodes back to its LPS center."""
    center_mm = np.array([81.0, 17.0, -150.0])
    inverse = np.linalg.inv(PRE_AFFINE)
    box = boxes_from_centers(inverse[:3, :3] @ center_mm + inverse[:3, 3], [[8.0, 8.0, 8.0]])
    (finding,) = boxes_to_findings(_detections(box.tolist(), [1.0]), PRE_AFFINE, _volume(), ["nodule"])
    np.testing.assert_allclose(finding.center_mm, center_mm, atol=1e-9)
    assert finding.diameter_mm == pytest.approx(12.0)


def test_preprocessed_phantom_puts_the_nodule_where_the_affine_says() -> None:
    """Spacing/orientation of preprocess() and its affine agree: the nodule's intensity centroid is at the truth."""
    phantom = make_chest_ct(11, shape=(160, 160, 60), nodule_diameters_mm=[12.0], noise_sigma_hu=0.0)
    (lesion,) = phantom.lesions
    config = ModelConfig.from_yaml(MODEL_YAML)
    pre = preprocess(phantom.volume, config.preprocessing)
    inverse = np.linalg.inv(pre.affine)
    center = inverse[:3, :3] @ np.asarray(lesion.center_mm) + inverse[:3, 3]
    lo = np.floor(center - 6).astype(int)
    block = pre.image[0, lo[0] : lo[0] + 13, lo[1] : lo[1] + 13, lo[2] : lo[2] + 13].numpy()
    # Nodule (~0.7) above lung (~0.1); keep only the bright component at the center (not the nearby chest wall).
    components, _ = ndimage.label(block > 0.5)
    inside = components == components[tuple(np.round(center - lo).astype(int))]
    weights = np.where(inside, block - 0.5, 0.0)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in block.shape], indexing="ij"), axis=-1) + lo
    centroid = (grid * weights[..., None]).reshape(-1, 3).sum(0) / weights.sum()
    spacing_mm = np.linalg.norm(pre.affine[:3, :3], axis=0)
    assert np.linalg.norm((centroid - center) * spacing_mm) < 0.5


def test_merge_drops_cut_boxes_and_duplicates_across_overlapping_patches() -> None:
    plan = plan_patches((120, 96, 96), (96, 96, 96), overlap=0.25)
    assert [o[0] for o in plan.origins] == [0, 24]  # two patches along x, overlapping on [24, 96)
    nodule = [50, 40, 40, 60, 50, 50]
    patch0 = _detections([nodule, [88, 10, 10, 96, 18, 18]], [0.9, 0.7])  # 2nd: cut by patch 0's interior face
    patch1 = _detections(
        [[26, 40, 40, 36, 50, 50], [64, 10, 10, 74, 18, 18], [86, 70, 70, 96, 80, 80]], [0.8, 0.85, 0.6]
    )  # 1st: the same nodule; 2nd: the cut one, whole; 3rd: touches the image's own border (x = 120)
    merged = merge_patch_detections(plan, [patch0, patch1], nms_iou=0.1, max_detections=10)
    order = np.argsort(-merged.scores)
    np.testing.assert_allclose(merged.scores[order], [0.9, 0.85, 0.6])
    np.testing.assert_allclose(merged.boxes[order], [nodule, [88, 10, 10, 98, 18, 18], [110, 70, 70, 120, 80, 80]])


def test_merge_keeps_a_cut_box_that_no_other_patch_holds_and_clips_padding() -> None:
    plan = plan_patches((80, 96, 96), (96, 96, 96), overlap=0.25)  # one patch, padded along x
    det = _detections([[70, 10, 10, 90, 20, 20], [85, 30, 30, 95, 40, 40]], [0.9, 0.8])  # 2nd: all padding
    merged = merge_patch_detections(plan, [det], nms_iou=0.1, max_detections=10)
    np.testing.assert_allclose(merged.boxes, [[70, 10, 10, 80, 20, 20]])
    assert len(merge_patch_detections(plan, [Detections.empty()], nms_iou=0.1, max_detections=10)) == 0


def test_merge_keeps_max_detections_best() -> None:
    plan = plan_patches((96, 96, 96), (96, 96, 96), overlap=0.25)
    boxes = [[10 * i, 0, 0, 10 * i + 5, 5, 5] for i in range(1, 8)]
    merged = merge_patch_detections(
        plan, [_detections(boxes, [0.1 * i for i in range(1, 8)])], nms_iou=0.1, max_detections=3
    )
    np.testing.assert_allclose(sorted(merged.scores), [0.5, 0.6, 0.7], rtol=1e-6)


def test_decoder_matches_monai_retinanet_detector() -> None:
    torch.manual_seed(0)
    detector_cfg = DetectorConfig(
        feature_map_scales=(1, 2, 4), base_anchor_shapes=((4, 4, 4), (6, 6, 6), (8, 8, 8)), size_divisible=(16,) * 3
    )
    network = build_retinanet(num_anchors=3, conv1_t_stride=2)
    torch.nn.init.normal_(network.classification_head.cls_logits.weight, std=0.5)  # spread the scores
    detector = RetinaNetDetector(network.eval(), build_anchor_generator(detector_cfg))
    detector.set_box_selector_parameters(
        score_thresh=0.3, topk_candidates_per_level=100, nms_thresh=0.3, detections_per_img=20
    )
    detector.eval()
    images = torch.rand(2, 1, 48, 48, 32)
    with torch.no_grad():
        reference = detector(images)
        outputs = network(images)
    decoder = RetinaNetDecoder(detector_cfg, PostprocessConfig(score_threshold=0.3, nms_iou=0.3, max_detections=20))
    decoded = decoder(outputs, (48, 48, 32))
    for ref, mine in zip(reference, decoded, strict=True):
        assert len(mine) == len(ref["boxes"]) > 0
        np.testing.assert_allclose(mine.boxes, ref["boxes"].numpy(), atol=1e-5)
        np.testing.assert_allclose(mine.scores, ref["labels_scores"].numpy(), atol=1e-6)


def test_build_retinanet_is_small_and_matches_its_strides() -> None:
    network = build_retinanet(num_anchors=3, conv1_t_stride=(2, 2, 2))
    assert sum(p.numel() for p in network.parameters()) < 500_000
    with torch.no_grad():
        out = network(torch.zeros(1, 1, 64, 64, 32))
    strides = feature_map_strides(3, (2, 2, 2), (1, 2))
    assert strides == [(4, 4, 4), (8, 8, 8), (16, 16, 16)]
    assert [tuple(m.shape[2:]) for m in out["classification"]] == [
        tuple(s // st for s, st in zip((64, 64, 32), stride, strict=True)) for stride in strides
    ]
    assert out["box_regression"][0].shape[1] == 3 * 6
    with pytest.raises(ValueError, match="multiple of 8"):
        build_retinanet(fpn_channels=20)


def test_detection_task_shapes_and_model_yaml() -> None:
    config = ModelConfig.from_yaml(MODEL_YAML)
    task = DetectionTask(config, torch.device("cpu"))
    assert config.network.target == "inference.networks.retinanet.build_retinanet"
    assert task.item_shape == (1, *config.inferer.roi_size)
    # The patches must overlap by more than the largest nodule (30 mm) so that each lies whole in one.
    roi = np.asarray(config.inferer.roi_size)
    min_overlap_mm = (roi - (roi * (1 - config.inferer.overlap)).astype(int)) * np.asarray(
        config.preprocessing.spacing_mm
    )
    assert np.all(min_overlap_mm >= 33.0)
    phantom = make_chest_ct(3, shape=(128, 128, 50), n_nodules=0)
    prepared = task.prepare(phantom.volume)
    assert all(tuple(item.shape) == task.item_shape for item in prepared.items)
    assert "preprocess" in prepared.timing_ms
    network = task.build_network().eval()
    with torch.no_grad():
        outputs = network(torch.stack(prepared.items[:2]))
    results = task.split_outputs(outputs, min(2, len(prepared.items)))
    assert all(isinstance(r, Detections) for r in results)


@pytest.fixture(scope="module")
def lung_nodule_model() -> tuple[DetectionTask, torch.nn.Module]:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    task = DetectionTask(ModelConfig.from_yaml(MODEL_YAML), torch.device("cpu"))
    return task, load_network(task)


@pytest.mark.parametrize("seed", [90_001, 90_002])
def test_committed_weights_find_planted_nodules(
    lung_nodule_model: tuple[DetectionTask, torch.nn.Module], seed: int
) -> None:
    task, network = lung_nodule_model
    rng = np.random.default_rng(seed)
    matrix = int(rng.choice([128, 160, 192]))
    phantom = make_chest_ct(rng, shape=(matrix, matrix, int(rng.integers(60, 120))), nodule_diameters_mm=[10.0, 16.0])
    findings = run_direct(task, network, phantom.volume, batch_size=4)
    centers = np.array([f.center_mm for f in findings]).reshape(-1, 3)
    for lesion in phantom.lesions:
        if lesion.diameter_mm >= 8.0:
            distances = np.linalg.norm(centers - np.asarray(lesion.center_mm), axis=1)
            assert distances.size and distances.min() <= 3.0, f"{lesion} missed; findings {findings}"
    false_positives = [
        f
        for f in findings
        if min(np.linalg.norm(np.subtract(f.center_mm, les.center_mm)) for les in phantom.lesions) > 5.0
    ]
    assert len(false_positives) <= 1, false_positives
