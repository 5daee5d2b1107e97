"""The DICOM SEG: valid DICOM, references the source, and reads back as the masks that made it."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from inference.errors import UnsupportedError
from inference.io.dicom import read_dicom_series
from inference.io.volume import Volume
from inference.outputs import build_measurement_report, build_segmentation, detections_to_masks, encode_dataset
from inference.phantoms import make_chest_ct, write_dicom_multiframe
from inference.postprocess.finding import Finding

MODEL = {"model_name": "lung_nodule_ct", "model_version": "1.2.0"}


def _masks(volume: Volume, findings) -> dict[str, np.ndarray]:
    masks = detections_to_masks(volume, findings)
    masks["lung"] = volume.voxels < -500.0
    return masks


def test_seg_reads_back_as_its_masks(ct_study, dciodvfy_errors, tmp_path: Path) -> None:
    volume = ct_study.volume
    masks = _masks(volume, ct_study.findings)
    assert set(masks) == {"nodule", "lung"} and all(m.any() for m in masks.values())
    shuffled = list(reversed(ct_study.datasets))  # any order: frames are matched by SOPInstanceUID
    path = tmp_path / "seg.dcm"
    path.write_bytes(encode_dataset(build_segmentation(volume, masks, source_datasets=shuffled, **MODEL)))
    assert dciodvfy_errors(path) == []

    seg = hd.seg.segread(path)
    assert seg.StudyInstanceUID == volume.source.study_instance_uid
    assert seg.SeriesInstanceUID != volume.source.series_instance_uid
    assert (seg.SeriesNumber, seg.SegmentationType) == (901, "BINARY")
    assert seg.PatientID == volume.source.header.PatientID
    referenced = {
        ref.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for ref in s.ReferencedInstanceSequence
    }
    assert referenced == {ds.SOPInstanceUID for ds in ct_study.datasets}

    labels = list(masks)
    for number, label in enumerate(labels, start=1):
        description = seg.get_segment_description(number)
        assert description.segment_label == label
        assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        assert description.algorithm_identification[0].AlgorithmName == MODEL["model_name"]
        assert description.algorithm_identification[0].AlgorithmVersion == MODEL["model_version"]
    assert seg.get_segment_description(1).segmented_property_type == codes.SCT.Nodule
    assert seg.get_segment_description(1).segmented_property_category == codes.SCT.MorphologicallyAbnormalStructure
    assert seg.get_segment_description(2).segmented_property_type == codes.SCT.Lung

    uids = [image.sop_instance_uid for image in sorted(volume.source.images, key=lambda im: im.slice_index)]
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2], assert_missing_frames_are_empty=True)
    for number, label in enumerate(labels):
        # (slices, rows, columns) -> (columns, rows, slices) = the volume's voxel grid
        np.testing.assert_array_equal(pixels[..., number].transpose(2, 1, 0).astype(bool), masks[label])

    # The SEG's own geometry puts every nodule voxel where the volume has it.
    seg_volume = seg.get_volume(segment_numbers=[1])
    ijk = np.argwhere(masks["nodule"])
    lps = volume.voxel_to_lps(ijk)
    index = np.rint((np.c_[lps, np.ones(len(lps))] @ np.linalg.inv(seg_volume.affine).T)[:, :3]).astype(int)
    assert seg_volume.array[..., 0][tuple(index.T)].all()
    assert int(seg_volume.array.sum()) == len(ijk)


def test_detection_masks_fill_the_inscribed_ellipsoid(ct_study) -> None:
    volume = ct_study.volume
    masks = detections_to_masks(volume, ct_study.findings)
    voxel_ml = float(np.prod(volume.spacing_mm)) / 1000.0
    labelled = masks["nodule"]
    for finding in ct_study.findings:
        center = np.rint(volume.lps_to_voxel(finding.center_mm)[0]).astype(int)
        assert labelled[tuple(center)]
    inside = volume.voxel_to_lps(np.argwhere(labelled))
    boxes = np.array([f.bbox_mm for f in ct_study.findings])
    assert np.all(
        np.any(
            np.all(
                (inside[:, None, :] >= boxes[None, :, :3] - 1e-6) & (inside[:, None, :] <= boxes[None, :, 3:] + 1e-6),
                axis=2,
            ),
            axis=1,
        )
    )
    # A sphere of the box's diameter: the voxelised volume is close to pi/6 d^3 on this coarse grid.
    expected_ml = sum(np.pi / 6 * f.diameter_mm**3 for f in ct_study.findings) / 1000.0
    assert labelled.sum() * voxel_ml == pytest.approx(expected_ml, rel=0.35)


def test_seg_refuses_what_it_cannot_encode(ct_study) -> None:
    volume = ct_study.volume
    masks = _masks(volume, ct_study.findings)
    nifti = Volume(volume.voxels, volume.affine, "CT")
    with pytest.raises(UnsupportedError, match="NIfTI"):
        build_segmentation(nifti, masks, source_datasets=None, **MODEL)
    with pytest.raises(ValueError, match="source datasets"):
        build_segmentation(volume, masks, source_datasets=None, **MODEL)
    with pytest.raises(ValueError, match="1 of the volume's 16 source images"):
        build_segmentation(volume, masks, source_datasets=ct_study.datasets[1:], **MODEL)
    with pytest.raises(ValueError, match="shape"):
        build_segmentation(volume, {"nodule": masks["nodule"][:, :, :3]}, source_datasets=ct_study.datasets, **MODEL)
    with pytest.raises(ValueError, match="empty"):
        build_segmentation(volume, {}, source_datasets=ct_study.datasets, **MODEL)


def test_enhanced_ct_source_seg_and_sr(dciodvfy_errors, tmp_path: Path) -> None:
    """A multi-frame source: frames are matched by frame number, and the SR references frames."""
    phantom = make_chest_ct(5, shape=(48, 48, 12), pixel_spacing_mm=0.8, slice_spacing_mm=2.5, n_nodules=1)
    path = write_dicom_multiframe(phantom, tmp_path / "enhanced.dcm")
    volume = read_dicom_series([path])
    assert {image.frame_number for image in volume.source.images} == set(range(1, 13))
    source = pydicom.dcmread(path, stop_before_pixels=True)
    masks = {"nodule": np.zeros(volume.shape, dtype=bool)}
    masks["nodule"][10:20, 5:9, 3] = True
    masks["nodule"][30:33, 40:41, 7] = True

    seg_path = tmp_path / "seg.dcm"
    seg_path.write_bytes(encode_dataset(build_segmentation(volume, masks, source_datasets=[source], **MODEL)))
    assert dciodvfy_errors(seg_path) == []
    seg = hd.seg.segread(seg_path)
    by_frame = {image.frame_number: image.slice_index for image in volume.source.images}
    frames = sorted(by_frame)
    pixels = seg.get_pixels_by_source_frame(
        source.SOPInstanceUID, frames, segment_numbers=[1], assert_missing_frames_are_empty=True
    )
    for frame, plane in zip(frames, pixels[..., 0], strict=True):
        np.testing.assert_array_equal(plane.T.astype(bool), masks["nodule"][:, :, by_frame[frame]])

    lesion = phantom.lesions[0]
    half = lesion.diameter_mm / 2
    finding = Finding(
        "nodule",
        0.8,
        lesion.center_mm,
        tuple(np.r_[lesion.center_mm] - half) + tuple(np.r_[lesion.center_mm] + half),
        lesion.diameter_mm,
        lesion.volume_ml,
    )
    sr_path = tmp_path / "sr.dcm"
    sr_path.write_bytes(encode_dataset(build_measurement_report(volume, [finding], **MODEL)))
    assert dciodvfy_errors(sr_path) == []
    (group,) = hd.sr.srread(sr_path).content.get_planar_roi_measurement_groups()
    (ref,) = group.get_measurements(name=codes.SCT.Diameter)[0].referenced_images
    expected = volume.nearest_source_image(np.asarray(lesion.center_mm))
    assert ref.referenced_sop_instance_uid == source.SOPInstanceUID
    assert ref.referenced_frame_numbers == [expected.frame_number]


def test_encoded_seg_is_part10(ct_study) -> None:
    masks = _masks(ct_study.volume, ct_study.findings)
    data = encode_dataset(build_segmentation(ct_study.volume, masks, source_datasets=ct_study.datasets, **MODEL))
    back = pydicom.dcmread(io.BytesIO(data))
    assert back.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert back.SOPClassUID == pydicom.uid.SegmentationStorage
