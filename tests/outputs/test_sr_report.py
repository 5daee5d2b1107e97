"""The TID 1500 SR: valid DICOM, and what it says reads back equal to the findings."""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Iterator
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
from inference.outputs import build_measurement_report, encode_dataset
from inference.outputs.sr import (
    CERTAINTY_OF_FINDING,
    DIAMETER,
    LOCAL_SCHEME,
    VOLUME,
    finding_site_code,
    finding_type_code,
)
from inference.postprocess.finding import Finding

MODEL = {"model_name": "lung_nodule_ct", "model_version": "1.2.0"}


def _write(ds: Dataset, path: Path) -> Path:
    path.write_bytes(encode_dataset(ds))
    return path


def _round_trip(ds: Dataset) -> hd.sr.Comprehensive3DSR:
    return hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(encode_dataset(ds))))


def _referenced_instances(items: Iterator[Dataset] | pydicom.Sequence) -> Iterator[tuple[str, list[int] | None]]:
    """(ReferencedSOPInstanceUID, frames) of every IMAGE/COMPOSITE item anywhere in a content tree."""
    for item in items:
        for ref in item.get("ReferencedSOPSequence", []):
            frames = ref.get("ReferencedFrameNumber")
            yield str(ref.ReferencedSOPInstanceUID), None if frames is None else [int(f) for f in np.atleast_1d(frames)]
        yield from _referenced_instances(item.get("ContentSequence", []))


def test_ct_report_is_valid_dicom(ct_study, dciodvfy_errors, tmp_path: Path) -> None:
    path = _write(build_measurement_report(ct_study.volume, ct_study.findings, **MODEL), tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    if shutil.which("dsrdump") is None:
        pytest.skip("dsrdump (Debian package dcmtk) is not installed")
    assert subprocess.run(["dsrdump", str(path)], capture_output=True, timeout=60).returncode == 0


def test_ct_report_reads_back_as_the_findings(ct_study, dciodvfy_errors, tmp_path: Path) -> None:
    volume, findings = ct_study.volume, ct_study.findings
    path = _write(build_measurement_report(volume, findings, **MODEL), tmp_path / "sr.dcm")
    sr = hd.sr.srread(path)
    header = volume.source.header
    input_uids = {ds.SOPInstanceUID for ds in ct_study.datasets}

    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert sr.StudyInstanceUID == volume.source.study_instance_uid
    assert sr.SeriesInstanceUID != volume.source.series_instance_uid
    assert sr.SOPInstanceUID not in input_uids
    assert (sr.SeriesNumber, sr.InstanceNumber, sr.Modality) == (900, 1, "SR")
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"):
        assert sr.get(keyword) == header.get(keyword), keyword

    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == len(findings)
    tracking_uids = set()
    for number, (group, finding) in enumerate(zip(groups, findings, strict=True), start=1):
        assert group.tracking_identifier == f"finding {number}"
        tracking_uids.add(group.tracking_uid)
        assert group.finding_type == codes.SCT.Nodule
        assert [site.value for site in group.finding_sites] == [codes.SCT.Lung]
        region = group.roi
        assert isinstance(region, hd.sr.ImageRegion3D)
        assert region.graphic_type == hd.sr.GraphicTypeValues3D.POINT
        assert region.frame_of_reference_uid == volume.source.frame_of_reference_uid
        np.testing.assert_allclose(region.value[0], finding.center_mm, atol=1e-3)

        (diameter,) = group.get_measurements(name=DIAMETER)
        assert diameter.value == pytest.approx(finding.diameter_mm, abs=1e-6)
        assert diameter.unit == codes.UCUM.Millimeter
        (volume_ml,) = group.get_measurements(name=VOLUME)
        assert volume_ml.value == pytest.approx(finding.volume_ml, abs=1e-6)
        assert volume_ml.unit.value == "ml"
        (certainty,) = group.get_measurements(name=CERTAINTY_OF_FINDING)
        assert certainty.value / 100.0 == pytest.approx(finding.score, abs=1e-9)
        for measurement in (diameter, volume_ml, certainty):
            refs = [ref.referenced_sop_instance_uid for ref in measurement.referenced_images]
            assert refs == [finding.sop_instance_uid]

        names = {item.ConceptNameCodeSequence[0].CodeValue: item for item in group[0].ContentSequence}
        assert names["111001"].TextValue == MODEL["model_name"]  # Algorithm Name
        assert names["111003"].TextValue == MODEL["model_version"]  # Algorithm Version
    assert len(tracking_uids) == len(findings)

    referenced = {uid for uid, _ in _referenced_instances(sr.ContentSequence)}
    assert referenced and referenced <= input_uids
    evidence = {uid for _, _, uid, _ in sr.get_evidence()}
    assert evidence == input_uids  # every source instance, hence every referenced one
    assert "PertinentOtherEvidenceSequence" not in sr
    assert "CodingSchemeIdentificationSequence" not in sr  # nodules need no local code


def test_nifti_report_synthesises_study_and_uses_scoord3d_only(ct_study, dciodvfy_errors, tmp_path: Path) -> None:
    source = ct_study.volume
    volume = Volume(source.voxels, source.affine, "CT")  # as read from NIfTI: no DICOM context
    findings = [
        Finding(f.label, f.score, f.center_mm, f.bbox_mm, f.diameter_mm, f.volume_ml, None, f.center_voxel)
        for f in ct_study.findings
    ]
    path = _write(build_measurement_report(volume, findings, **MODEL), tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []

    sr = hd.sr.srread(path)
    assert sr.StudyInstanceUID != source.source.study_instance_uid
    assert (str(sr.PatientName), sr.PatientID, sr.AccessionNumber) == ("", "", "")
    assert "CurrentRequestedProcedureEvidenceSequence" not in sr
    assert "PertinentOtherEvidenceSequence" not in sr
    assert list(_referenced_instances(sr.ContentSequence)) == []
    groups = sr.content.get_planar_roi_measurement_groups()
    frames_of_reference = {group.roi.frame_of_reference_uid for group in groups}
    assert len(frames_of_reference) == 1 and source.source.frame_of_reference_uid not in frames_of_reference
    for group, finding in zip(groups, findings, strict=True):
        np.testing.assert_allclose(group.roi.value[0], finding.center_mm, atol=1e-3)
        assert group.get_measurements(name=DIAMETER)[0].referenced_images == []


def _xray_volume() -> Volume:
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
    image = SourceImage(header.SOPInstanceUID, header.SOPClassUID, 0)
    source = SourceRefs(header.StudyInstanceUID, header.SeriesInstanceUID, None, (image,), header=header)
    return Volume(np.zeros((64, 48, 1), np.float32), np.diag([0.2, 0.25, 1.0, 1.0]), "DX", source=source)


def test_xray_report_uses_scoord_on_the_image(dciodvfy_errors, tmp_path: Path) -> None:
    volume = _xray_volume()
    column, row = 20.0, 31.0
    finding = Finding("nodule", 0.7, (column * 0.2, row * 0.25), (3.0, 6.0, 5.0, 9.5), 2.5, None, None, (column, row))
    path = _write(build_measurement_report(volume, [finding], **MODEL), tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []

    sr = hd.sr.srread(path)
    (group,) = sr.content.get_planar_roi_measurement_groups()
    region = group.roi
    assert isinstance(region, hd.sr.ImageRegion)
    # SCOORD image coordinates start at the top-left corner of the top-left pixel: its center is (0.5, 0.5).
    np.testing.assert_allclose(region.value, [[column + 0.5, row + 0.5]])
    assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        volume.source.images[0].sop_instance_uid
    )
    assert sr.StudyInstanceUID == volume.source.study_instance_uid

    # Without center_voxel the pixel position comes from center_mm and the pixel spacing.
    plain = Finding("nodule", 0.7, (column * 0.2, row * 0.25), (3.0, 6.0, 5.0, 9.5), 2.5)
    (group,) = _round_trip(
        build_measurement_report(volume, [plain], **MODEL)
    ).content.get_planar_roi_measurement_groups()
    np.testing.assert_allclose(group.roi.value, [[column + 0.5, row + 0.5]])

    with pytest.raises(UnsupportedError, match="projection X-ray"):
        build_measurement_report(Volume(volume.voxels, volume.affine, "DX"), [finding], **MODEL)


def test_no_findings_is_an_explicit_negative_report(ct_study, dciodvfy_errors, tmp_path: Path) -> None:
    path = _write(build_measurement_report(ct_study.volume, [], **MODEL), tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    (group,) = hd.sr.srread(path).content.get_image_measurement_groups()
    assert group.finding_type == codes.SCT.None_


def test_unknown_label_gets_a_declared_local_code(ct_study, dciodvfy_errors, tmp_path: Path) -> None:
    finding = ct_study.findings[0]
    odd = Finding("ground glass?", finding.score, finding.center_mm, finding.bbox_mm, finding.diameter_mm)
    long = Finding("x" * 20 + " opacity", finding.score, finding.center_mm, finding.bbox_mm, finding.diameter_mm)
    path = _write(build_measurement_report(ct_study.volume, [odd, long], **MODEL), tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    sr = hd.sr.srread(path)
    first, second = sr.content.get_planar_roi_measurement_groups()
    assert (first.finding_type.value, first.finding_type.scheme_designator) == ("GROUND_GLASS_", LOCAL_SCHEME)
    assert first.finding_type.meaning == "ground glass?"
    assert second.finding_type.value == "X" * 20 + "_OPACITY"  # 28 characters: a LongCodeValue
    assert first.finding_sites == []  # no site for a label the table does not know
    assert [item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence] == [LOCAL_SCHEME]


def test_code_tables() -> None:
    assert finding_type_code("Nodule") == codes.SCT.Nodule
    assert finding_site_code("CT", "nodule") == codes.SCT.Lung
    assert finding_site_code("DX", "nodule") == codes.SCT.Lung
    assert finding_site_code("MR", "lesion") == codes.SCT.Brain
    assert finding_site_code("CT", "mass") is None


def test_encode_dataset_writes_part10_explicit_little_endian(ct_study) -> None:
    sr = build_measurement_report(ct_study.volume, ct_study.findings, **MODEL)
    data = encode_dataset(sr)
    assert data[128:132] == b"DICM"
    back = pydicom.dcmread(io.BytesIO(data))
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.file_meta.MediaStorageSOPInstanceUID == sr.SOPInstanceUID


def test_bad_finding_values_are_refused(ct_study) -> None:
    finding = ct_study.findings[0]
    for bad in (
        Finding(finding.label, 1.5, finding.center_mm, finding.bbox_mm, finding.diameter_mm),
        Finding(finding.label, 0.5, finding.center_mm[:2], finding.bbox_mm, finding.diameter_mm),
        Finding(finding.label, 0.5, finding.center_mm, finding.bbox_mm, float("nan")),
    ):
        with pytest.raises(ValueError, match="finding 1"):
            build_measurement_report(ct_study.volume, [bad], **MODEL)


def test_malformed_source_dates_are_copied_as_empty(ct_study, dciodvfy_errors, tmp_path: Path) -> None:
    import copy as copy_module
    import dataclasses

    header = copy_module.deepcopy(ct_study.volume.source.header)
    header.PatientBirthDate = "NOTADATE"
    header.StudyTime = "99:99"
    source = dataclasses.replace(ct_study.volume.source, header=header)
    volume = dataclasses.replace(ct_study.volume, source=source)
    path = _write(build_measurement_report(volume, ct_study.findings, **MODEL), tmp_path / "sr.dcm")
    sr = pydicom.dcmread(path)
    assert sr.PatientBirthDate == "" and sr.StudyTime == ""
    assert sr.StudyDate == header.StudyDate  # valid values are still copied
    assert dciodvfy_errors(path) == []
