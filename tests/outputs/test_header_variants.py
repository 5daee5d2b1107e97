"""A corpus of header variants: any study radserve reads yields its SR and SEG, valid, with the source's values.

Each Type 2 patient and study attribute absent or empty, private tags, a UTF-8 patient name, malformed values and
values too long for their VR, Enhanced CT and MR multi-frame, MONOCHROME1 DX, CR and DX. Each variant is written,
read by the DICOM reader, and given the findings a perfect model would report (the planted truth); ``build_derived``
makes its SR and SEG, exactly as a read through the server does. An attribute the source lacks is carried empty,
never invented; a value its VR forbids is carried empty (Type 2) or left out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import EnhancedMRImageStorage

from inference.io.dicom import read_dicom_series
from inference.io.volume import Volume
from inference.outputs import Algorithm, conformance
from inference.outputs.derived import build_derived, source_headers
from inference.outputs.finding import Finding
from inference.outputs.source import PATIENT_STUDY_TYPE2
from inference.phantoms import (
    make_brain_mr,
    make_chest_ct,
    make_chest_xray,
    write_dicom_multiframe,
    write_dicom_series,
    write_xray_dicom,
)

pytestmark = pytest.mark.skipif(not conformance.dciodvfy_available(), reason="dciodvfy (dicom3tools) is not installed")

ALGORITHM = Algorithm("variant_model", "3", "de" * 32)


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # ct | ct_enhanced | mr_enhanced | xray
    edit: Callable[[pydicom.Dataset], None] = lambda ds: None
    xray: tuple[str, str] = ("DX", "MONOCHROME2")  # modality, photometric


def _remove(keyword: str) -> Callable[[pydicom.Dataset], None]:
    return lambda ds: delattr(ds, keyword) if keyword in ds else None


def _empty(keyword: str) -> Callable[[pydicom.Dataset], None]:
    return lambda ds: setattr(ds, keyword, "")


def _private_tags(ds: pydicom.Dataset) -> None:
    block = ds.private_block(0x0019, "ACME SCANNER 1.0", create=True)
    block.add_new(0x10, "LO", "reconstruction kernel B30f")
    block.add_new(0x11, "DS", "1.25")
    item = pydicom.Dataset()
    item.add_new(0x00191010, "LO", "nested")
    block.add_new(0x12, "SQ", [item])
    ds.add_new(0x00291010, "OB", b"\x00\x01" * 64)  # a private element without a creator


def _utf8_name(ds: pydicom.Dataset) -> None:
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Jürgen=山田^太郎"
    ds.StudyDescription = "Thorax ÉCHO"


def _malformed(ds: pydicom.Dataset) -> None:
    ds.PatientSex = "MALE"  # not M, F or O
    ds.PatientBirthDate = "1980-01-01"  # not DA
    ds.StudyTime = "25:61"  # not TM


def _too_long(ds: pydicom.Dataset) -> None:
    ds.AccessionNumber = "A" * 20  # SH: at most 16
    ds.PatientID = "P" * 70  # LO: at most 64
    ds.StudyDescription = "D" * 80  # LO, Type 3: left out
    ds.PatientAge = "forty"  # AS


def _anonymised(ds: pydicom.Dataset) -> None:
    for keyword in PATIENT_STUDY_TYPE2:
        if keyword in ds and keyword not in ("PatientID",):
            delattr(ds, keyword)


VARIANTS = [
    *(Variant(f"{keyword} absent", "ct", _remove(keyword)) for keyword in PATIENT_STUDY_TYPE2),
    *(Variant(f"{keyword} empty", "ct", _empty(keyword)) for keyword in PATIENT_STUDY_TYPE2),
    Variant("private tags", "ct", _private_tags),
    Variant("UTF-8 patient name", "ct", _utf8_name),
    Variant("malformed values", "ct", _malformed),
    Variant("values too long for their VR", "ct", _too_long),
    Variant("Enhanced CT, anonymised", "ct_enhanced", _anonymised),
    Variant("Enhanced MR", "mr_enhanced", _remove("PatientSex")),
    Variant("DX MONOCHROME1, anonymised", "xray", _anonymised, ("DX", "MONOCHROME1")),
    Variant("CR without PatientOrientation", "xray", _remove("PatientOrientation"), ("CR", "MONOCHROME2")),
    Variant("DX, private tags", "xray", _private_tags, ("DX", "MONOCHROME2")),
]


def _truth_findings(volume: Volume, lesions) -> list[Finding]:
    findings = []
    for lesion in lesions:
        center = np.asarray(lesion.center_mm, dtype=np.float64)
        half = lesion.diameter_mm / 2.0
        if volume.shape[2] == 1:  # projection: [x, y] on the image plane
            column, row = center[:2] / np.array(volume.spacing_mm[:2])
            bbox = (*(center[:2] - half), *(center[:2] + half))
            findings.append(
                Finding(lesion.label, 0.8, tuple(center[:2]), bbox, lesion.diameter_mm, None, None, (column, row))
            )
            continue
        nearest = volume.nearest_source_image(center)
        findings.append(
            Finding(
                lesion.label,
                0.8,
                tuple(center),
                (*(center - half), *(center + half)),
                lesion.diameter_mm,
                lesion.volume_ml,
                nearest.sop_instance_uid if nearest is not None else None,
                tuple(volume.lps_to_voxel(center)[0]),
            )
        )
    return findings


def _write(variant: Variant, out: Path) -> tuple[list[Path], list]:
    out.mkdir(parents=True)
    if variant.kind == "ct":
        phantom = make_chest_ct(11, shape=(48, 48, 10), pixel_spacing_mm=0.9, slice_spacing_mm=2.5, n_nodules=1)
        paths = write_dicom_series(phantom, out)
    elif variant.kind == "ct_enhanced":
        phantom = make_chest_ct(12, shape=(48, 48, 10), pixel_spacing_mm=0.9, slice_spacing_mm=2.5, n_nodules=1)
        paths = [write_dicom_multiframe(phantom, out / "enhanced_ct.dcm")]
    elif variant.kind == "mr_enhanced":
        phantom = make_brain_mr(13, shape=(56, 56, 10), pixel_spacing_mm=3.0, slice_spacing_mm=5.0)
        as_ct = Volume(phantom.volume.voxels, phantom.volume.affine, "CT")
        paths = [write_dicom_multiframe(as_ct, out / "enhanced_mr.dcm")]
        ds = pydicom.dcmread(paths[0])  # Enhanced CT's layout relabelled: an Enhanced MR Image
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
        ds.Modality = "MR"
        shared = ds.SharedFunctionalGroupsSequence[0]
        shared.MRImageFrameTypeSequence = shared.CTImageFrameTypeSequence
        del shared.CTImageFrameTypeSequence
        shared.PixelValueTransformationSequence[0].RescaleType = "US"
        ds.save_as(paths[0], enforce_file_format=True)
    else:
        modality, photometric = variant.xray
        phantom = make_chest_xray(
            14, size_px=(320, 288), pixel_spacing_mm=0.5, n_opacities=1, photometric=photometric, modality=modality
        )
        paths = [write_xray_dicom(phantom, out / "cxr.dcm")]
    for path in paths:
        ds = pydicom.dcmread(path)
        variant.edit(ds)
        ds.save_as(path, enforce_file_format=True)
    return paths, list(phantom.lesions)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_a_header_variant_gets_a_valid_sr_and_seg_carrying_its_values(variant: Variant, tmp_path: Path) -> None:
    paths, lesions = _write(variant, tmp_path / "study")
    volume = read_dicom_series(paths)
    findings = _truth_findings(volume, lesions)
    assert findings, "each variant's phantom has a planted lesion"
    derived = build_derived(
        volume,
        findings,
        None,
        algorithm=ALGORITHM,
        want_sr=True,
        want_seg=True,
        source_datasets=source_headers(volume, [path.read_bytes() for path in paths]),
    )
    source = pydicom.dcmread(paths[0], stop_before_pixels=True)
    outputs = {"sr": derived.sr, "seg": derived.seg}
    for name, data in outputs.items():
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(data)
        report = conformance.dciodvfy(path)
        assert report.errors == [], (name, report.errors)
        assert report.unexpected_warnings() == [], (name, report.unexpected_warnings())
        ds = pydicom.dcmread(path)
        for keyword in PATIENT_STUDY_TYPE2:
            assert keyword in ds, (name, keyword)  # Type 2: present...
            value = source.get(keyword)
            malformed = keyword in _MALFORMED.get(variant.name, ())
            expected = "" if value is None or malformed else value
            assert str(ds[keyword].value or "") == str(expected or ""), (name, keyword)  # ...and never invented
        assert not any(element.tag.is_private for element in ds.iterall()), name  # private tags stay behind
        if variant.name == "values too long for their VR":
            assert "StudyDescription" not in ds and "PatientAge" not in ds
        if variant.name == "UTF-8 patient name":
            assert str(ds.PatientName) == "Müller^Jürgen=山田^太郎" and "ISO_IR 192" in ds.SpecificCharacterSet
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert len(seg.SegmentSequence) == len(findings)
    if variant.kind == "xray":
        expected = source.get("PatientOrientation")
        assert list(seg.PatientOrientation or []) == (list(expected) if expected else [])
    sr = hd.sr.srread(tmp_path / "sr.dcm")
    tracking = {group.tracking_uid for group in sr.content.get_planar_roi_measurement_groups()}
    assert tracking == {description.TrackingUID for description in seg.SegmentSequence}


_MALFORMED = {
    "malformed values": ("PatientSex", "PatientBirthDate", "StudyTime"),
    "values too long for their VR": ("AccessionNumber", "PatientID"),
}
