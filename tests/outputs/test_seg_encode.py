"""The DICOM SEG: one segment per finding holding its voxels, valid, referencing the source, naming the model."""

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
from inference.outputs import Algorithm, build_segmentation, encode_dataset
from inference.outputs.finding import Finding, FindingMask
from inference.outputs.regions import finding_masks
from inference.outputs.uids import SEG, DerivedUids
from inference.phantoms import make_chest_ct, write_dicom_multiframe
from inference.tasks.postprocess.segmentation import mask_to_findings

ALGORITHM = Algorithm("lung_nodule_ct", "1.2.0", "c0" * 32)


def _seg_pixels(seg: hd.seg.Segmentation, volume: Volume, numbers: list[int]) -> np.ndarray:
    """The SEG's segments on the volume's grid, (X, Y, Z, segments), read through highdicom by source instance."""
    uids = [image.sop_instance_uid for image in sorted(volume.source.images, key=lambda im: im.slice_index)]
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=numbers, assert_missing_frames_are_empty=True)
    return pixels.transpose(2, 1, 0, 3).astype(bool)  # (slices, rows, columns, n) -> (columns, rows, slices, n)


def test_a_detection_seg_holds_each_rendered_box_as_its_segment(ct_study, dciodvfy_errors, tmp_path: Path) -> None:
    volume, findings = ct_study.volume, ct_study.findings
    masks, rendered = finding_masks(volume, findings, None)
    shuffled = list(reversed(ct_study.datasets))  # any order: frames are matched by SOPInstanceUID
    path = tmp_path / "seg.dcm"
    path.write_bytes(
        encode_dataset(
            build_segmentation(
                volume, findings, masks, algorithm=ALGORITHM, source_datasets=shuffled, rendered=rendered
            )
        )
    )
    assert dciodvfy_errors(path) == []

    seg = hd.seg.segread(path)
    uids = DerivedUids.for_volume(volume, model_name="lung_nodule_ct", model_version="1.2.0", weights_sha256="c0" * 32)
    assert (seg.SOPInstanceUID, seg.SeriesInstanceUID) == (uids.instance(SEG), uids.series(SEG))
    assert seg.StudyInstanceUID == volume.source.study_instance_uid
    assert (seg.SeriesNumber, seg.SegmentationType) == (901, "BINARY")
    assert seg.PatientID == volume.source.header.PatientID
    referenced = {
        ref.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for ref in s.ReferencedInstanceSequence
    }
    assert referenced == {ds.SOPInstanceUID for ds in ct_study.datasets}  # every source image, not only those drawn

    numbers = list(range(1, len(findings) + 1))
    assert [d.segment_number for d in seg.SegmentSequence] == numbers
    for number in numbers:
        description = seg.get_segment_description(number)
        assert description.segment_label == f"nodule {number}"
        assert (description.tracking_id, description.tracking_uid) == (f"finding {number}", uids.tracking(number))
        assert description.segmented_property_type == codes.SCT.Nodule
        assert description.segmented_property_category == codes.SCT.MorphologicallyAbnormalStructure
        assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        assert description.SegmentDescription == "ellipsoid inscribed in the detected box"
        algorithm = description.algorithm_identification[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("lung_nodule_ct", "1.2.0")
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
        assert algorithm.AlgorithmSource.startswith("radserve ")
        assert algorithm.AlgorithmParameters == f"weights_sha256={'c0' * 32}"

    # Voxel for voxel: segment N is the rendering of finding N, read back through the SEG's own frame references.
    pixels = _seg_pixels(seg, volume, numbers)
    for number, mask in enumerate(masks, start=1):
        np.testing.assert_array_equal(pixels[..., number - 1], mask.dense(volume.shape))
    # ...and through the SEG's own geometry: every voxel where the volume has it.
    seg_volume = seg.get_volume(segment_numbers=[1])
    ijk = np.argwhere(masks[0].dense(volume.shape))
    lps = volume.voxel_to_lps(ijk)
    index = np.rint((np.c_[lps, np.ones(len(lps))] @ np.linalg.inv(seg_volume.affine).T)[:, :3]).astype(int)
    assert seg_volume.array[..., 0][tuple(index.T)].all()
    assert int(seg_volume.array.sum()) == len(ijk)

    (equipment,) = [
        item
        for item in seg.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"
    ]
    assert equipment.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "99IHE"
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Algorithm"
    assert (equipment.Manufacturer, equipment.ManufacturerModelName) == ("radserve", "lung_nodule_ct")
    assert list(equipment.SoftwareVersions) == ALGORITHM.software_versions
    assert equipment.DeviceUID == ALGORITHM.device_uid
    assert "99IHE" in {item.CodingSchemeDesignator for item in seg.CodingSchemeIdentificationSequence}


def test_a_segmentation_seg_is_the_models_masks_and_their_volumes(ct_study, tmp_path: Path) -> None:
    """Masks made the way SegmentationTask makes them; overlapping ones too (stacked segments, not a label map)."""
    volume = ct_study.volume
    blobs = np.zeros(volume.shape, dtype=bool)
    blobs[10:20, 12:19, 3:7] = True
    blobs[30:41, 30:38, 9:12] = True
    blobs[35:37, 30:31, 12] = True  # touches the second one diagonally: one 26-connected component
    probability = np.where(blobs, 0.9, 0.0).astype(np.float32)
    findings, components = mask_to_findings(blobs, probability, (0, 0, 0), volume, "lesion")
    masks = [FindingMask(tuple(s.start for s in box), mask) for box, mask in components]
    assert len(findings) == 2
    overlapping = [*masks, FindingMask((12, 12, 3), np.ones((4, 4, 2), dtype=bool))]
    overlapping_findings = [*findings, findings[0]]

    voxel_ml = float(np.prod(volume.spacing_mm)) / 1000.0
    for these_findings, these_masks in ((findings, masks), (overlapping_findings, overlapping)):
        seg = build_segmentation(
            volume, these_findings, these_masks, algorithm=ALGORITHM, source_datasets=ct_study.datasets
        )
        seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(encode_dataset(seg))))
        numbers = list(range(1, len(these_masks) + 1))
        pixels = _seg_pixels(seg, volume, numbers)
        for number, (finding, mask) in enumerate(zip(these_findings, these_masks, strict=True), start=1):
            np.testing.assert_array_equal(pixels[..., number - 1], mask.dense(volume.shape))
            assert "SegmentDescription" not in seg.get_segment_description(number)  # the model's own mask
            if mask in masks:  # the SEG's volume is the finding's volume_ml
                assert pixels[..., number - 1].sum() * voxel_ml == pytest.approx(finding.volume_ml, rel=1e-9)


def test_seg_refuses_what_it_cannot_encode(ct_study) -> None:
    volume, findings = ct_study.volume, ct_study.findings
    masks, _ = finding_masks(volume, findings, None)
    nifti = Volume(volume.voxels, volume.affine, "CT")
    sources = ct_study.datasets
    with pytest.raises(UnsupportedError, match="NIfTI"):
        build_segmentation(nifti, findings, masks, algorithm=ALGORITHM, source_datasets=None)
    with pytest.raises(ValueError, match="source datasets"):
        build_segmentation(volume, findings, masks, algorithm=ALGORITHM, source_datasets=None)
    with pytest.raises(ValueError, match="1 of the volume's 16 source images"):
        build_segmentation(volume, findings, masks, algorithm=ALGORITHM, source_datasets=sources[1:])
    with pytest.raises(ValueError, match="1 masks for 2 findings"):
        build_segmentation(volume, findings, masks[:1], algorithm=ALGORITHM, source_datasets=sources)
    with pytest.raises(ValueError, match="mask of finding 2 does not fit"):
        outside = FindingMask((60, 0, 0), np.ones((8, 2, 2), dtype=bool))
        build_segmentation(volume, findings, [masks[0], outside], algorithm=ALGORITHM, source_datasets=sources)
    with pytest.raises(ValueError, match="mask of finding 1 is empty"):
        empty = FindingMask((0, 0, 0), np.zeros((2, 2, 2), dtype=bool))
        build_segmentation(volume, findings, [empty, masks[1]], algorithm=ALGORITHM, source_datasets=sources)
    with pytest.raises(ValueError, match="no findings"):
        build_segmentation(volume, [], [], algorithm=ALGORITHM, source_datasets=sources)


def test_enhanced_ct_source_frames_are_matched_by_frame_number(dciodvfy_errors, tmp_path: Path) -> None:
    phantom = make_chest_ct(5, shape=(48, 48, 12), pixel_spacing_mm=0.8, slice_spacing_mm=2.5, n_nodules=1)
    path = write_dicom_multiframe(phantom, tmp_path / "enhanced.dcm")
    volume = read_dicom_series([path])
    assert {image.frame_number for image in volume.source.images} == set(range(1, 13))
    source = pydicom.dcmread(path, stop_before_pixels=True)
    block = np.zeros((10, 4, 5), dtype=bool)
    block[:, :, 0] = True
    block[3:6, 1:3, 4] = True
    masks = [FindingMask((10, 5, 3), block)]
    finding = Finding("nodule", 0.8, (0.0, 0.0, 0.0), (0.0,) * 6, 5.0)

    seg_path = tmp_path / "seg.dcm"
    seg_path.write_bytes(
        encode_dataset(build_segmentation(volume, [finding], masks, algorithm=ALGORITHM, source_datasets=[source]))
    )
    assert dciodvfy_errors(seg_path) == []
    seg = hd.seg.segread(seg_path)
    by_frame = {image.frame_number: image.slice_index for image in volume.source.images}
    frames = sorted(by_frame)
    pixels = seg.get_pixels_by_source_frame(
        source.SOPInstanceUID, frames, segment_numbers=[1], assert_missing_frames_are_empty=True
    )
    dense = masks[0].dense(volume.shape)
    for frame, plane in zip(frames, pixels[..., 0], strict=True):
        np.testing.assert_array_equal(plane.T.astype(bool), dense[:, :, by_frame[frame]])


def test_encoded_seg_is_part10(ct_study) -> None:
    masks, _ = finding_masks(ct_study.volume, ct_study.findings, None)
    seg = build_segmentation(
        ct_study.volume, ct_study.findings, masks, algorithm=ALGORITHM, source_datasets=ct_study.datasets
    )
    back = pydicom.dcmread(io.BytesIO(encode_dataset(seg)))
    assert back.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert back.SOPClassUID == pydicom.uid.SegmentationStorage
