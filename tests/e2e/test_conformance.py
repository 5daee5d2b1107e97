"""The conformance gate, end to end: CT, MR and X-ray studies read through the real server with SR, SEG and FHIR.

The studies are written here with pydicom alone (not radserve's phantom writers), some without Type 2 patient and
study attributes. For each: the read succeeds; dciodvfy reports 0 errors on the SR and SEG and PixelMed's
DicomSRValidator 0 errors on the SR (each warning one that docs/conformance.md justifies); the algorithm is
identified in the SR (TID 4019, Contributing Equipment) and in the SEG; each finding has an image SCOORD outline and
center referencing a source image (and a SCOORD3D for CT and MR); the SEG's volume of each finding is its
``volume_ml``; the FHIR Bundle is valid R4 and says the same; a second read gives the same UIDs (here for X-ray;
tests/e2e/test_read_ct.py and tests/api/test_read_streamed.py read CT and MR twice).
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from inference.io.volume import Volume
from inference.outputs import conformance, validate_findings_json
from inference.outputs.codes import DIAMETER
from inference.phantoms import make_brain_mr, make_chest_ct, make_chest_xray

# A development dependency (requirements.txt), not on the GPU machine: the module skips there.
Bundle = pytest.importorskip("fhir.resources.R4B.bundle").Bundle

STUDY_ATTRIBUTES = {
    "PatientName": "CONFORMANCE^TEST",
    "PatientID": "CONF-1",
    "PatientBirthDate": "19700101",
    "PatientSex": "F",
    "StudyDate": "20260101",
    "StudyTime": "101500",
    "AccessionNumber": "A100",
    "StudyID": "S100",
    "ReferringPhysicianName": "",
}


def _base(sop_class: str, modality: str, study: dict[str, str], drop: tuple[str, ...]) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID, ds.Modality = sop_class, modality
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study["StudyInstanceUID"], study["SeriesInstanceUID"]
    for keyword, value in STUDY_ATTRIBUTES.items():
        if keyword not in drop:
            setattr(ds, keyword, value)
    ds.SeriesNumber, ds.Manufacturer = 3, "Independent"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    return ds


def write_stack(volume: Volume, out: Path, *, drop: tuple[str, ...] = ()) -> list[Path]:
    """One CT or MR image per slice, 16-bit signed with a rescale: pydicom only, no radserve writer."""
    out.mkdir(parents=True)
    study = {"StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid()}
    frame_of_reference = generate_uid()
    columns_dir, rows_dir = (volume.affine[:3, a] / np.linalg.norm(volume.affine[:3, a]) for a in (0, 1))
    intercept = -1024.0 if volume.modality == "CT" else 0.0
    paths = []
    for k in range(volume.shape[2]):
        sop_class = CTImageStorage if volume.modality == "CT" else MRImageStorage
        ds = _base(sop_class, volume.modality, study, drop)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference, ""
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in volume.voxel_to_lps([0.0, 0.0, k])[0]]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*columns_dir, *rows_dir)]
        ds.PixelSpacing = [f"{volume.spacing_mm[1]:.4f}", f"{volume.spacing_mm[0]:.4f}"]
        ds.SliceThickness = f"{volume.spacing_mm[2]:.4f}"
        ds.RescaleIntercept, ds.RescaleSlope = f"{intercept:g}", "1"
        pixels = np.clip(np.rint(volume.voxels[:, :, k].T - intercept), -32768, 32767).astype(np.int16)
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        if volume.modality == "CT":
            ds.ImageType, ds.KVP, ds.AcquisitionNumber = ["ORIGINAL", "PRIMARY", "AXIAL"], "120", 1
        else:
            ds.ImageType, ds.ScanningSequence, ds.SequenceVariant = ["ORIGINAL", "PRIMARY"], "SE", "NONE"
            ds.ScanOptions, ds.MRAcquisitionType = "", "2D"
            ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "500", "15", "1"
        ds.PixelData = pixels.tobytes()
        path = out / f"image_{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_projection(volume: Volume, path: Path, *, drop: tuple[str, ...] = ()) -> Path:
    """A DX For Presentation image, MONOCHROME2, ImagerPixelSpacing: pydicom only."""
    path.parent.mkdir(parents=True)
    study = {"StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid()}
    ds = _base(DigitalXRayImageStorageForPresentation, "DX", study, drop)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber, ds.ImageType = 1, ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ["L", "F"]
    ds.PresentationIntentType, ds.PresentationLUTShape = "FOR PRESENTATION", "IDENTITY"
    ds.ImagerPixelSpacing = [f"{volume.spacing_mm[1]:.4f}", f"{volume.spacing_mm[0]:.4f}"]
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    pixels = np.clip(np.rint(volume.voxels[:, :, 0].T), 0, 65535).astype(np.uint16)
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


STUDIES = {
    # CT without PatientSex, StudyID and AccessionNumber; MR without ReferringPhysicianName and StudyTime;
    # X-ray without PatientBirthDate and PatientSex.
    "CT": (
        lambda: make_chest_ct(
            np.random.default_rng(31), shape=(160, 160, 56), pixel_spacing_mm=1.0, slice_spacing_mm=2.5,
            n_nodules=2, nodule_diameters_mm=(14.0, 20.0),
        ),
        ("PatientSex", "StudyID", "AccessionNumber"),
    ),
    "MR": (
        lambda: make_brain_mr(
            np.random.default_rng(777), shape=(160, 160, 40), pixel_spacing_mm=1.2, slice_spacing_mm=4.0,
            lesion_diameters_mm=(14.0, 24.0), lesion_contrasts=("bright", "bright"),
        ),
        ("ReferringPhysicianName", "StudyTime"),
    ),
    "DX": (
        lambda: make_chest_xray(
            np.random.default_rng(4242), size_px=(1024, 1024), pixel_spacing_mm=0.3,
            opacity_diameters_mm=(20.0, 30.0),
        ),
        ("PatientBirthDate", "PatientSex"),
    ),
}  # fmt: skip


def read(server, study: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    args = ["read", str(study), "--server", server.target, "--format", "json"]
    args += ["--sr", str(out / "sr.dcm"), "--seg", str(out / "seg.dcm"), "--fhir", str(out / "fhir.json")]
    result = subprocess.run([sys.executable, "-m", "inference.cli", *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    validate_findings_json(body)
    return body


@pytest.fixture(scope="module")
def pixelmed():
    """PixelMed runs in the background (about 10 s a report) while the next study is read."""
    if not conformance.pixelmed_available():
        pytest.skip("PixelMed (pixelmed-apps) or java is not installed")
    with ThreadPoolExecutor(1) as pool:
        yield pool


@pytest.mark.parametrize("modality", list(STUDIES))
def test_a_study_reads_into_conformant_sr_seg_and_fhir_with_the_same_uids_twice(
    modality, server, pixelmed, sr_finding_groups, tmp_path
):
    if not conformance.dciodvfy_available():
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    make, drop = STUDIES[modality]
    phantom = make()
    if modality == "DX":
        files = [write_projection(phantom.volume, tmp_path / "study" / "cxr.dcm", drop=drop)]
    else:
        files = write_stack(phantom.volume, tmp_path / "study", drop=drop)
    body = read(server, tmp_path / "study", tmp_path / "first")
    assert body["findings"], f"the {modality} phantom has planted lesions"
    first = tmp_path / "first"
    validation: Future = pixelmed.submit(conformance.pixelmed_sr, first / "sr.dcm")

    for name in ("sr.dcm", "seg.dcm"):
        report = conformance.dciodvfy(first / name)
        assert report.errors == [], (name, report.errors)
        assert report.unexpected_warnings() == [], (name, report.unexpected_warnings())
    sources = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    sr, seg = hd.sr.srread(first / "sr.dcm"), hd.seg.segread(first / "seg.dcm")

    # Type 2 attributes the source lacks are carried empty, the others as they are.
    for ds in (sr, seg):
        for keyword in STUDY_ATTRIBUTES:
            assert str(ds.get(keyword, "<absent>")) == str(source.get(keyword, "")), keyword

    # The algorithm, identified in the SR and the SEG with the same values.
    name, version = body["model"], body["model_version"]
    equipment = [
        i for i in sr.ContributingEquipmentSequence if i.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"
    ]
    assert len(equipment) == 1 and equipment[0].ManufacturerModelName == name
    assert f"{name} {version}" in list(equipment[0].SoftwareVersions)
    seg_equipment = [i for i in seg.ContributingEquipmentSequence if i.get("DeviceUID") == equipment[0].DeviceUID]
    assert len(seg_equipment) == 1

    per_finding = sr_finding_groups(sr)
    assert len(per_finding) == len(body["findings"]) == len(seg.SegmentSequence)
    voxel_ml = None if modality == "DX" else float(np.prod(phantom.volume.spacing_mm)) / 1000.0
    uids = [image for image in sorted(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence, key=str)]
    assert {ref.ReferencedSOPInstanceUID for ref in uids} == sources
    for number, (groups, finding) in enumerate(zip(per_finding, body["findings"], strict=True), start=1):
        for group in groups.values():
            items = {i.ConceptNameCodeSequence[0].CodeValue: i for i in group[0].ContentSequence}
            assert (items["111001"].TextValue, items["111003"].TextValue) == (name, version)  # TID 4019
        for role in ("outline", "center"):  # image SCOORDs on a source image
            region = groups[role].roi
            assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID in sources, role
        assert (
            groups["center"].roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            == (finding["sop_instance_uid"])
        )
        if modality != "DX":
            np.testing.assert_allclose(groups["center_3d"].roi.graphic_data[0], finding["center_mm"], atol=1e-2)
        assert groups["segment"].referenced_segment.referenced_segment_numbers == [number]
        (diameter,) = groups["outline"].get_measurements(name=DIAMETER)
        assert diameter.value == pytest.approx(finding["diameter_mm"], abs=1e-3)
        description = seg.get_segment_description(number)
        algorithm = description.algorithm_identification[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (name, version)
        assert description.tracking_uid == groups["outline"].tracking_uid
        if "volume_ml" in finding:  # the segmentation model: its SEG is its masks
            volume = seg.get_volume(segment_numbers=[number])
            assert volume.array.sum() * voxel_ml == pytest.approx(finding["volume_ml"], rel=0.05)

    # FHIR: valid R4, one Observation per finding, the SR named.
    bundle = json.loads((first / "fhir.json").read_text())
    parsed = Bundle.model_validate(bundle)
    observations = [e.resource for e in parsed.entry if e.resource.get_resource_type() == "Observation"]
    assert len(observations) == len(body["findings"])
    assert parsed.entry[0].resource.identifier[0].value == f"urn:oid:{sr.SOPInstanceUID}"

    verdict = validation.result(timeout=600)
    assert verdict.errors == [], verdict.errors
    assert verdict.unexpected_warnings() == [], verdict.unexpected_warnings()
    if modality != "DX":
        return  # redelivery of CT: tests/e2e/test_read_ct.py; of MR: tests/api/test_read_streamed.py

    # A redelivery: the same UIDs, the same FHIR ids.
    body_again = read(server, tmp_path / "study", tmp_path / "second")
    assert body_again["findings"] == body["findings"]
    second = tmp_path / "second"
    for name in ("sr.dcm", "seg.dcm"):
        a, b = (pydicom.dcmread(folder / name, stop_before_pixels=True) for folder in (first, second))
        assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID), name
    again = json.loads((second / "fhir.json").read_text())
    assert [e["fullUrl"] for e in again["entry"]] == [e["fullUrl"] for e in bundle["entry"]]
