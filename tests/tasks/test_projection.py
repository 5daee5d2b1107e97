"""Projection X-ray detection: input-grid geometry, boxes -> image-plane mm, MONOCHROME1, and the committed model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from inference.errors import InvalidInputError
from inference.io.volume import SourceImage, SourceRefs, Volume
from inference.modelrepo.schema import ModelConfig
from inference.phantoms import make_chest_xray, render_chest_xray, sample_chest_xray_params, write_xray_dicom
from inference.tasks import task_class
from inference.tasks.direct import load_network, run_direct
from inference.tasks.postprocess.detection import Detections
from inference.tasks.postprocess.projection import ProjectionGeometry, projection_findings
from inference.tasks.projection import ProjectionDetectionTask

ROOT = Path(__file__).resolve().parents[2]
MODEL_YAML = ROOT / "models" / "chest_xray" / "1" / "model.yaml"
MATCH_MM = 5.0


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    return ModelConfig.from_yaml(MODEL_YAML)


@pytest.fixture(scope="module")
def task(config) -> ProjectionDetectionTask:
    return ProjectionDetectionTask(config, torch.device("cpu"))


def one_box(box: list[float], score: float = 0.9) -> Detections:
    return Detections(np.array([box], np.float32), np.array([score], np.float32), np.array([0], np.int64))


def test_geometry_plan_keeps_mm_isotropic_and_fits_the_input():
    # 1000 columns of 0.3 mm (300 mm) by 2400 rows of 0.1 mm (240 mm), to 1.2 mm pixels: 250 x 200, padded to 384.
    geometry = ProjectionGeometry.plan((1000, 2400), (0.3, 0.1), (384, 384), (1.2, 1.2))
    assert geometry.resized_shape == (250, 200)
    assert geometry.scale == (4.0, 12.0)
    assert geometry.input_spacing_mm == pytest.approx((1.2, 1.2))
    assert geometry.input_origin_mm == pytest.approx((1.5 * 0.3, 5.5 * 0.1))  # center of input pixel 0
    # A 600 x 480 mm field of view does not fit 384 x 1.2 mm: one common factor, 1.5625 mm pixels.
    large = ProjectionGeometry.plan((3000, 2400), (0.2, 0.2), (384, 384), (1.2, 1.2))
    assert large.resized_shape == (384, 307)
    assert large.input_spacing_mm[0] == pytest.approx(large.input_spacing_mm[1], rel=2e-3)


def test_boxes_map_to_image_plane_mm_by_hand():
    """Box [10, 20, 30, 40] (input edges) on the 4 x 12 grid above, worked out by hand.

    Input column edges 10..30 are source column edges 40..120, i.e. pixel indices 39.5..119.5 (the center
    of source pixel c is index c), i.e. x = 39.5 * 0.3 .. 119.5 * 0.3 = 11.85 .. 35.85 mm. Rows: edges
    20..40 -> 240..480 -> indices 239.5..479.5 -> y = 23.95 .. 47.95 mm.
    """
    geometry = ProjectionGeometry.plan((1000, 2400), (0.3, 0.1), (384, 384), (1.2, 1.2))
    [finding] = projection_findings(one_box([10.0, 20.0, 30.0, 40.0]), geometry, ["opacity"], sop_instance_uid="1.2.3")
    assert finding.label == "opacity" and finding.score == pytest.approx(0.9)
    assert finding.bbox_mm == pytest.approx((11.85, 23.95, 35.85, 47.95))
    assert finding.center_mm == pytest.approx((23.85, 35.95))
    assert finding.center_voxel == pytest.approx((79.5, 359.5))  # center_px: (column, row)
    assert finding.diameter_mm == pytest.approx(24.0)
    assert finding.sop_instance_uid == "1.2.3"
    assert finding.to_json()["center_mm"] == [23.85, 35.95]


def test_boxes_are_clipped_to_the_image_and_padding_holds_nothing():
    geometry = ProjectionGeometry.plan((1000, 2400), (0.3, 0.1), (384, 384), (1.2, 1.2))  # image: 250 x 200
    detections = Detections(
        np.array([[240.0, 190.0, 260.0, 210.0], [300.0, 300.0, 320.0, 320.0]], np.float32),
        np.array([0.8, 0.9], np.float32),
        np.array([0, 0], np.int64),
    )
    [finding] = projection_findings(detections, geometry, ["opacity"])
    assert finding.bbox_mm[2] == pytest.approx((250 * 4 - 0.5) * 0.3)  # the right edge of the last column
    assert finding.bbox_mm[3] == pytest.approx((200 * 12 - 0.5) * 0.1)
    assert projection_findings(one_box([10.0, 10.0, 14.0, 12.0]), geometry, ["opacity"], min_size_mm=5.0) == []


def test_mm_to_input_edges_inverts_the_map():
    geometry = ProjectionGeometry.plan((1987, 2311), (0.143, 0.139), (384, 384), (1.2, 1.2))
    points = np.array([[10.0, 20.0], [150.0, 301.7]])
    edges = geometry.mm_to_input_edges(points)
    boxes = np.concatenate([edges - 3, edges + 3], axis=1)
    back = geometry.pixels_to_mm(geometry.input_edges_to_pixels(boxes))
    assert (back[:, :2] + back[:, 2:]) / 2 == pytest.approx(points)


def test_prepare_puts_an_opacity_where_the_geometry_says(task):
    """Resampling follows the pixel-center convention: the opacity's input-grid centroid is its mapped center."""
    params = replace(
        sample_chest_xray_params(3, size_px=(1500, 1400), pixel_spacing_mm=(0.17, 0.19), opacity_diameters_mm=[24.0]),
        noise_sigma=0.0,
    )
    with_opacity = task.prepare(render_chest_xray(params).volume)
    without = task.prepare(render_chest_xray(replace(params, opacities=())).volume)
    difference = (with_opacity.items[0] - without.items[0])[0].numpy().astype(np.float64)
    weights = np.where(difference > 0.1 * difference.max(), difference, 0.0)  # the opacity, not the renormalisation
    index = np.indices(weights.shape)
    centroid = np.array([(weights * index[0]).sum(), (weights * index[1]).sum()]) / weights.sum()
    geometry = with_opacity.context.geometry
    expected = geometry.mm_to_input_edges([params.opacities[0].center_mm])[0] - 0.5  # edges -> indices
    assert centroid == pytest.approx(expected, abs=0.15)
    item = with_opacity.items[0]
    assert tuple(item.shape) == task.item_shape == (1, 384, 384)
    assert float(item.min()) >= 0.0 and float(item.max()) <= 1.0
    assert torch.all(item[:, geometry.resized_shape[0] :, :] == 0.0)  # padding


def test_monochrome1_read_back_and_inverted_prepares_like_monochrome2(task, tmp_path):
    """The reader inverts MONOCHROME1; our part: the stored values are inverted and, once inverted back
    as the reader does (2**BitsStored - 1 - stored), the task sees the same image as from MONOCHROME2."""
    phantom = make_chest_xray(21, size_px=(1200, 1100), pixel_spacing_mm=0.15, bits_stored=12, n_opacities=1)
    prepared = {}
    for photometric in ("MONOCHROME1", "MONOCHROME2"):
        path = write_xray_dicom(phantom, tmp_path / f"{photometric}.dcm", photometric=photometric)
        ds = pydicom.dcmread(path)
        stored = ds.pixel_array.astype(np.float32)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            assert np.corrcoef(stored.ravel(), phantom.volume.voxels[:, :, 0].T.ravel())[0, 1] < -0.99
            stored = (2**ds.BitsStored - 1) - stored
        row_spacing, col_spacing = (float(v) for v in ds.ImagerPixelSpacing)
        volume = Volume(stored.T[:, :, None], np.diag([col_spacing, row_spacing, 1.0, 1.0]), ds.Modality)
        prepared[photometric] = task.prepare(volume)
    direct = task.prepare(phantom.volume)
    for result in prepared.values():
        assert torch.equal(result.items[0], direct.items[0])
        assert result.context == direct.context


def test_the_dicom_reader_gives_the_phantom_volume(tmp_path):
    """When inference.io.dicom is present: CR/DX single images, MONOCHROME1 inverted, either spacing tag."""
    dicom = pytest.importorskip("inference.io.dicom")
    from inference.io.limits import InputLimits

    phantom = make_chest_xray(22, size_px=(1100, 1050), bits_stored=16, modality="CR", n_opacities=1)
    for photometric, tag in (("MONOCHROME1", "PixelSpacing"), ("MONOCHROME2", "ImagerPixelSpacing")):
        path = write_xray_dicom(phantom, tmp_path / f"{photometric}.dcm", photometric=photometric, spacing_tag=tag)
        volume = dicom.read_dicom_series([path.read_bytes()], series_instance_uid=None, limits=InputLimits())
        assert volume.shape == phantom.volume.shape and volume.modality == "CR"
        assert volume.spacing_mm[:2] == pytest.approx(phantom.volume.spacing_mm[:2])
        assert np.array_equal(np.asarray(volume.voxels), phantom.volume.voxels), photometric


def test_registry_picks_the_projection_task_and_rejects_stacks(config, task):
    assert task_class(config) is ProjectionDetectionTask
    volume = Volume(np.zeros((64, 64, 2), np.float32), np.diag([0.2, 0.2, 1.0, 1.0]), "DX")
    with pytest.raises(InvalidInputError, match="one frame"):
        task.prepare(volume)


def test_finding_carries_the_source_image_uid(task):
    phantom = make_chest_xray(5, size_px=(1024, 1024), n_opacities=0)
    refs = SourceRefs("1.2", "1.2.3", None, (SourceImage("1.2.3.4", "1.2.840.10008.5.1.4.1.1.1.1", 0),))
    volume = replace(phantom.volume, source=refs)
    prepared = task.prepare(volume)
    output = task.finalize(volume, prepared, [one_box([50.0, 60.0, 70.0, 80.0])])
    [finding] = output.findings
    assert output.masks is None  # a detection model: the SEG renders its boxes
    assert finding.sop_instance_uid == "1.2.3.4"


def test_committed_weights_find_planted_opacities(config):
    """Two fresh full-size phantoms (not drawn by train.py's seeds) through prepare -> network -> finalize."""
    torch.set_num_threads(1)
    task = ProjectionDetectionTask(config, torch.device("cpu"))
    network = load_network(task)
    cases = [
        make_chest_xray(
            901,
            size_px=(2300, 2100),
            modality="DX",
            photometric="MONOCHROME1",
            bits_stored=12,
            opacity_diameters_mm=[12.0, 22.0],
        ),
        make_chest_xray(902, size_px=(1800, 2000), modality="CR", bits_stored=16, opacity_diameters_mm=[15.0, 30.0]),
    ]
    for phantom in cases:
        findings = run_direct(task, network, phantom.volume)
        centers = np.array([f.center_mm for f in findings]).reshape(-1, 2)
        for lesion in phantom.lesions:
            distance = np.linalg.norm(centers - lesion.center_mm, axis=1) if len(centers) else [np.inf]
            assert np.min(distance) <= MATCH_MM, (lesion, findings)
        false_positives = [
            f
            for f in findings
            if all(
                np.hypot(*np.subtract(f.center_mm, lesion.center_mm)) > lesion.diameter_mm / 2
                for lesion in phantom.lesions
            )
        ]
        assert len(false_positives) <= 1, false_positives
