"""The TID 1500 SR: valid DICOM, and what it says reads back equal to the findings, their regions and the SEG."""

from __future__ import annotations

import dataclasses
import io
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from inference.errors import UnsupportedError
from inference.io.volume import SourceImage, SourceRefs, Volume
from inference.outputs import Algorithm, build_measurement_report, build_segmentation, conformance, encode_dataset
from inference.outputs.codes import (
    CERTAINTY_OF_FINDING,
    DIAMETER,
    LOCAL_SCHEME,
    VOLUME,
    finding_site_code,
    finding_type_code,
    procedure_code,
)
from inference.outputs.finding import Finding, FindingMask
from inference.outputs.regions import finding_masks, polygon_area
from inference.outputs.uids import SR, DerivedUids

ALGORITHM = Algorithm("lung_nodule_ct", "1.2.0", "ab" * 32)


def _write(ds: Dataset, path: Path) -> Path:
    path.write_bytes(encode_dataset(ds))
    return path


def _round_trip(ds: Dataset) -> hd.sr.Comprehensive3DSR:
    return hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(encode_dataset(ds))))


def _concepts(group) -> dict[str, Dataset]:
    """A measurement group's direct content items by concept code value."""
    return {item.ConceptNameCodeSequence[0].CodeValue: item for item in group[0].ContentSequence}


def _assert_identifies_the_algorithm(group, algorithm: Algorithm) -> None:
    items = _concepts(group)
    assert items["111001"].TextValue == algorithm.name  # TID 4019 Algorithm Name
    assert items["111003"].TextValue == algorithm.version  # Algorithm Version
    assert items["111000"].ConceptCodeSequence[0].CodeValue == "123110"  # family: Artificial Intelligence
    if algorithm.weights_sha256:
        assert items["111002"].TextValue == f"weights_sha256={algorithm.weights_sha256}"


def test_ct_report_is_valid_dicom(ct_study, dciodvfy_errors, tmp_path: Path) -> None:
    path = _write(
        build_measurement_report(ct_study.volume, ct_study.findings, algorithm=ALGORITHM), tmp_path / "sr.dcm"
    )
    assert dciodvfy_errors(path) == []
    if shutil.which("dsrdump") is None:
        pytest.skip("dsrdump (Debian package dcmtk) is not installed")
    assert subprocess.run(["dsrdump", str(path)], capture_output=True, timeout=60).returncode == 0


def test_ct_report_reads_back_as_the_findings_and_their_regions(ct_study, sr_finding_groups, tmp_path: Path) -> None:
    volume, findings = ct_study.volume, ct_study.findings
    sr = hd.sr.srread(_write(build_measurement_report(volume, findings, algorithm=ALGORITHM), tmp_path / "sr.dcm"))
    header = volume.source.header
    input_uids = {ds.SOPInstanceUID for ds in ct_study.datasets}
    by_uid = {image.sop_instance_uid: image for image in volume.source.images}
    uids = DerivedUids.for_volume(volume, model_name="lung_nodule_ct", model_version="1.2.0", weights_sha256="ab" * 32)
    masks, _ = finding_masks(volume, findings, None)

    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert (sr.SOPInstanceUID, sr.SeriesInstanceUID) == (uids.instance(SR), uids.series(SR))
    assert sr.StudyInstanceUID == volume.source.study_instance_uid
    assert (sr.SeriesNumber, sr.InstanceNumber, sr.Modality) == (900, 1, "SR")
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"):
        assert sr.get(keyword) == header.get(keyword), keyword
    procedure = sr.ContentSequence[[i.ConceptNameCodeSequence[0].CodeValue for i in sr.ContentSequence].index("121058")]
    assert procedure.ConceptCodeSequence[0].CodeValue == "25045-6"  # LOINC "CT unspecified body region", CID 100

    per_finding = sr_finding_groups(sr)
    assert len(per_finding) == len(findings)
    for number, (groups, finding, mask) in enumerate(zip(per_finding, findings, masks, strict=True), start=1):
        assert set(groups) == {"outline", "center", "center_3d"}  # no SEG given: no segment group
        for group in groups.values():
            assert (group.tracking_identifier, group.tracking_uid) == (f"finding {number}", uids.tracking(number))
            assert group.finding_type == codes.SCT.Nodule
            assert [site.value for site in group.finding_sites] == [codes.SCT.Lung]
            _assert_identifies_the_algorithm(group, ALGORITHM)

        # The outline: the rendered box's voxels in the slice nearest the center, on that slice's image.
        outline = groups["outline"].roi
        assert outline.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        image = by_uid[outline.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID]
        assert image.sop_instance_uid == finding.sop_instance_uid  # the voxels reach the center's slice
        plane = mask.dense(volume.shape)[:, :, image.slice_index]
        polygon = outline.value
        assert np.array_equal(polygon[0], polygon[-1]) and polygon_area(polygon) == plane.sum()
        lo_corner, hi_corner = np.argwhere(plane).min(axis=0), np.argwhere(plane).max(axis=0) + 1
        np.testing.assert_array_equal(polygon.min(axis=0), lo_corner)
        np.testing.assert_array_equal(polygon.max(axis=0), hi_corner)

        # The center: a POINT at the center voxel + 0.5 (SCOORD pixel centers) on the image nearest the center.
        center = groups["center"].roi
        assert center.graphic_type == hd.sr.GraphicTypeValues.POINT
        assert center.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == finding.sop_instance_uid
        np.testing.assert_allclose(center.value[0], np.asarray(finding.center_voxel[:2]) + 0.5, atol=1e-3)
        surface = groups["center_3d"].roi
        assert surface.graphic_type == hd.sr.GraphicTypeValues3D.POINT
        assert surface.frame_of_reference_uid == volume.source.frame_of_reference_uid
        np.testing.assert_allclose(surface.graphic_data[0], finding.center_mm, atol=1e-3)
        assert surface.source_series_for_segmentation.value == volume.source.series_instance_uid

        # The numbers, once, in the outline group.
        (diameter,) = groups["outline"].get_measurements(name=DIAMETER)
        assert diameter.value == pytest.approx(finding.diameter_mm, abs=1e-6)
        assert diameter.unit == codes.UCUM.Millimeter
        (volume_ml,) = groups["outline"].get_measurements(name=VOLUME)
        assert volume_ml.value == pytest.approx(finding.volume_ml, abs=1e-6)
        assert volume_ml.unit.value == "ml"
        (certainty,) = groups["outline"].get_measurements(name=CERTAINTY_OF_FINDING)
        assert certainty.value / 100.0 == pytest.approx(finding.score, abs=1e-9)
        assert groups["center"].get_measurements() == [] and groups["center_3d"].get_measurements() == []

    evidence = {uid for _, _, uid, _ in sr.get_evidence()}
    assert evidence == input_uids  # every source instance, hence every referenced one
    assert "PertinentOtherEvidenceSequence" not in sr
    assert [item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence] == ["99IHE"]
    (equipment,) = [
        item
        for item in sr.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"
    ]
    assert equipment.DeviceUID == ALGORITHM.device_uid and equipment.ManufacturerModelName == "lung_nodule_ct"
    assert list(equipment.SoftwareVersions) == [f"radserve {ALGORITHM.software_version}", "lung_nodule_ct 1.2.0"]


def test_report_of_a_segmentation_references_each_segment_of_its_seg(ct_study, sr_finding_groups, tmp_path) -> None:
    """Masks from the model: outlines follow them, and finding N's segment group references segment N of the SEG."""
    volume = ct_study.volume
    masks = []
    findings = []
    for finding in ct_study.findings:
        center = np.rint(volume.lps_to_voxel(finding.center_mm)[0]).astype(int)
        block = np.zeros((5, 4, 3), dtype=bool)
        block[1:5, 0:3, :2] = True  # an L-shaped region, off the box: the SR must follow the mask, not the box
        block[0, 0, 1] = True
        masks.append(FindingMask(tuple(int(v) for v in center - [2, 1, 1]), block))
        findings.append(dataclasses.replace(finding, volume_ml=block.sum() * float(np.prod(volume.spacing_mm)) / 1e3))
    seg = build_segmentation(volume, findings, masks, algorithm=ALGORITHM, source_datasets=ct_study.datasets)
    sr = build_measurement_report(volume, findings, algorithm=ALGORITHM, masks=masks, segmentation=seg)
    sr = hd.sr.srread(_write(sr, tmp_path / "sr.dcm"))

    per_finding = sr_finding_groups(sr)
    for number, (groups, mask) in enumerate(zip(per_finding, masks, strict=True), start=1):
        assert set(groups) == {"outline", "center", "center_3d", "segment"}
        reference = groups["segment"].referenced_segment
        assert reference.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert reference.referenced_segment_numbers == [number]
        assert reference.source_series_for_segmentation.value == volume.source.series_instance_uid
        description = seg.SegmentSequence[number - 1]
        assert description.TrackingUID == groups["segment"].tracking_uid == groups["outline"].tracking_uid
        outline = groups["outline"].roi
        slice_index = next(
            im.slice_index
            for im in volume.source.images
            if im.sop_instance_uid == outline.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        )
        plane = mask.dense(volume.shape)[:, :, slice_index]
        assert polygon_area(outline.value) == plane.sum() == 13  # the L, one slice of the mask
    evidence = {uid for _, _, uid, _ in sr.get_evidence()}
    assert seg.SOPInstanceUID in evidence


def test_nifti_report_synthesises_study_and_uses_scoord3d_only(ct_study, dciodvfy_errors, tmp_path: Path) -> None:
    source = ct_study.volume
    volume = Volume(source.voxels, source.affine, "CT")  # as read from NIfTI: no DICOM context
    findings = [dataclasses.replace(f, sop_instance_uid=None) for f in ct_study.findings]
    path = _write(build_measurement_report(volume, findings, algorithm=ALGORITHM), tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []

    sr = hd.sr.srread(path)
    assert sr.StudyInstanceUID != source.source.study_instance_uid
    assert (str(sr.PatientName), sr.PatientID, sr.AccessionNumber) == ("", "", "")
    assert "CurrentRequestedProcedureEvidenceSequence" not in sr
    assert "PertinentOtherEvidenceSequence" not in sr
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == len(findings)
    frames_of_reference = {group.roi.frame_of_reference_uid for group in groups}
    assert len(frames_of_reference) == 1 and source.source.frame_of_reference_uid not in frames_of_reference
    for group, finding in zip(groups, findings, strict=True):
        np.testing.assert_allclose(group.roi.value[0], finding.center_mm, atol=1e-3)
        assert group.get_measurements(name=DIAMETER)[0].value == pytest.approx(finding.diameter_mm)
        _assert_identifies_the_algorithm(group, ALGORITHM)


def _xray_volume(header_changes: dict | None = None) -> Volume:
    header = Dataset()
    header.SOPClassUID = DigitalXRayImageStorageForPresentation
    header.SOPInstanceUID = generate_uid()
    header.StudyInstanceUID = generate_uid()
    header.SeriesInstanceUID = generate_uid()
    header.Modality = "DX"
    header.PatientName, header.PatientID = "XRAY^PHANTOM", "XR-1"
    header.PatientBirthDate, header.PatientSex = "19800101", "F"
    header.StudyDate, header.StudyTime, header.StudyID = "20250101", "120000", "7"
    header.AccessionNumber, header.ReferringPhysicianName = "ACC7", ""
    for keyword, value in (header_changes or {}).items():
        setattr(header, keyword, value)
    image = SourceImage(header.SOPInstanceUID, header.SOPClassUID, 0)
    source = SourceRefs(header.StudyInstanceUID, header.SeriesInstanceUID, None, (image,), header=header)
    return Volume(np.zeros((64, 48, 1), np.float32), np.diag([0.2, 0.25, 1.0, 1.0]), "DX", source=source)


def test_xray_report_draws_the_box_ellipse_and_center_on_the_image(sr_finding_groups, dciodvfy_errors, tmp_path):
    volume = _xray_volume()
    column, row = 20.0, 31.0
    finding = Finding("opacity", 0.7, (column * 0.2, row * 0.25), (3.0, 6.0, 5.0, 9.5), 2.5, None, None, (column, row))
    path = _write(build_measurement_report(volume, [finding], algorithm=ALGORITHM), tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []

    sr = hd.sr.srread(path)
    (groups,) = sr_finding_groups(sr)
    assert set(groups) == {"outline", "center"}  # no frame of reference: no SCOORD3D
    image_uid = volume.source.images[0].sop_instance_uid
    for group in groups.values():
        assert group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == image_uid
        assert group.finding_type == codes.DCM.Opacity  # a standard code, no private one
        assert [site.value for site in group.finding_sites] == [codes.SCT.Lung]
    # SCOORD image coordinates start at the top-left corner of the top-left pixel: its center is (0.5, 0.5).
    np.testing.assert_allclose(groups["center"].roi.value, [[column + 0.5, row + 0.5]])
    ellipse = groups["outline"].roi
    assert ellipse.graphic_type == hd.sr.GraphicTypeValues.ELLIPSE
    # The box spans columns 15-25 and rows 24-38: major axis along the rows.
    np.testing.assert_allclose(ellipse.value, [[20.5, 24.5], [20.5, 38.5], [15.5, 31.5], [25.5, 31.5]])
    assert sr.StudyInstanceUID == volume.source.study_instance_uid
    procedure = sr.ContentSequence[[i.ConceptNameCodeSequence[0].CodeValue for i in sr.ContentSequence].index("121058")]
    assert procedure.ConceptCodeSequence[0].CodeValue == "363679005"  # CID 100 "Imaging procedure"
    assert "CodingSchemeIdentificationSequence" in sr and LOCAL_SCHEME not in {
        item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence
    }

    # Without center_voxel the pixel position comes from center_mm and the pixel spacing.
    plain = Finding("opacity", 0.7, (column * 0.2, row * 0.25), (3.0, 6.0, 5.0, 9.5), 2.5)
    (groups,) = sr_finding_groups(_round_trip(build_measurement_report(volume, [plain], algorithm=ALGORITHM)))
    np.testing.assert_allclose(groups["center"].roi.value, [[column + 0.5, row + 0.5]])

    with pytest.raises(UnsupportedError, match="projection X-ray"):
        build_measurement_report(Volume(volume.voxels, volume.affine, "DX"), [finding], algorithm=ALGORITHM)


def test_no_findings_is_an_explicit_negative_report(ct_study, dciodvfy_errors, tmp_path: Path) -> None:
    path = _write(build_measurement_report(ct_study.volume, [], algorithm=ALGORITHM), tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    (group,) = hd.sr.srread(path).content.get_image_measurement_groups()
    assert group.finding_type == codes.SCT.None_
    _assert_identifies_the_algorithm(group, ALGORITHM)


def test_unknown_label_gets_a_declared_local_code(ct_study, dciodvfy_errors, tmp_path: Path) -> None:
    finding = ct_study.findings[0]
    odd = dataclasses.replace(finding, label="ground glass?")
    long = dataclasses.replace(finding, label="x" * 20 + " opacity")
    path = _write(build_measurement_report(ct_study.volume, [odd, long], algorithm=ALGORITHM), tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    sr = hd.sr.srread(path)
    first = sr.content.get_planar_roi_measurement_groups(tracking_uid=None)[0]
    second = sr.content.get_planar_roi_measurement_groups()[2]
    assert (first.finding_type.value, first.finding_type.scheme_designator) == ("GROUND_GLASS_", LOCAL_SCHEME)
    assert first.finding_type.meaning == "ground glass?"
    assert second.finding_type.value == "X" * 20 + "_OPACITY"  # 28 characters: a LongCodeValue
    assert first.finding_sites == []  # no site for a label the table does not know
    assert {item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence} == {LOCAL_SCHEME, "99IHE"}


def test_code_tables() -> None:
    assert finding_type_code("Nodule") == codes.SCT.Nodule
    assert finding_type_code("opacity") == codes.DCM.Opacity  # DCM 112001, chest CAD's own concept
    assert finding_site_code("CT", "nodule") == codes.SCT.Lung
    assert finding_site_code("DX", "opacity") == codes.SCT.Lung
    assert finding_site_code("MR", "lesion") == codes.SCT.Brain
    assert finding_site_code("CT", "mass") is None
    cid100 = {code.value for code in codes.cid100.concepts.values()}
    for modality in ("CT", "MR", "CR", "DX", "PT"):
        assert procedure_code(modality).value in cid100, modality
    assert procedure_code("CT").value == "25045-6" and procedure_code("MR").value == "25056-3"


def test_encode_dataset_writes_part10_explicit_little_endian(ct_study) -> None:
    sr = build_measurement_report(ct_study.volume, ct_study.findings, algorithm=ALGORITHM)
    data = encode_dataset(sr)
    assert data[128:132] == b"DICM"
    back = pydicom.dcmread(io.BytesIO(data))
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.file_meta.MediaStorageSOPInstanceUID == sr.SOPInstanceUID


def test_bad_finding_values_are_refused(ct_study) -> None:
    finding = ct_study.findings[0]
    for bad in (
        dataclasses.replace(finding, score=1.5),
        dataclasses.replace(finding, center_mm=finding.center_mm[:2]),
        dataclasses.replace(finding, diameter_mm=float("nan")),
    ):
        with pytest.raises(ValueError, match="finding 1"):
            build_measurement_report(ct_study.volume, [bad], algorithm=ALGORITHM)
    with pytest.raises(ValueError, match="non-empty"):
        Algorithm("", "1")
    with pytest.raises(ValueError, match="hex"):
        Algorithm("m", "1", "not a digest")


def test_malformed_source_values_are_copied_as_empty(ct_study, dciodvfy_errors, tmp_path: Path) -> None:
    header = pydicom.Dataset(ct_study.volume.source.header)
    header = pydicom.dcmread(io.BytesIO(encode_dataset(_with_file_meta(header))), stop_before_pixels=True)
    header.PatientBirthDate = "NOTADATE"
    header.StudyTime = "99:99"
    header.PatientSex = "MALE"
    source = dataclasses.replace(ct_study.volume.source, header=header)
    volume = dataclasses.replace(ct_study.volume, source=source)
    path = _write(build_measurement_report(volume, ct_study.findings, algorithm=ALGORITHM), tmp_path / "sr.dcm")
    sr = pydicom.dcmread(path)
    assert sr.PatientBirthDate == "" and sr.StudyTime == "" and sr.PatientSex == ""
    assert sr.StudyDate == header.StudyDate  # valid values are still copied
    assert ct_study.volume.source.header.PatientSex != ""  # the source header itself is untouched
    assert dciodvfy_errors(path) == []


def _with_file_meta(ds: Dataset) -> Dataset:
    ds = pydicom.Dataset(ds)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    return ds


@pytest.mark.skipif(not conformance.pixelmed_available(), reason="PixelMed (pixelmed-apps) or java is not installed")
def test_pixelmed_finds_no_error_in_nifti_and_negative_reports(ct_study, tmp_path: Path) -> None:
    """The report forms no read of tests/e2e/test_conformance.py produces (that module validates CT, MR and X-ray
    reports with their SEG): one Java process each, about 10 s."""
    volume = ct_study.volume
    reports = {
        "nifti": build_measurement_report(
            Volume(volume.voxels, volume.affine, "MR"), ct_study.findings, algorithm=ALGORITHM
        ),
        "negative": build_measurement_report(volume, [], algorithm=ALGORITHM),
    }
    paths = [_write(report, tmp_path / f"{name}.dcm") for name, report in reports.items()]
    with ThreadPoolExecutor(2) as pool:
        verdicts = dict(zip(reports, pool.map(conformance.pixelmed_sr, paths), strict=True))
    for name, verdict in verdicts.items():
        assert verdict.errors == [], (name, verdict.errors)
        assert verdict.unexpected_warnings() == [], (name, verdict.unexpected_warnings())
