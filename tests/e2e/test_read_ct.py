"""End to end: the real server, the real lung nodule model, a phantom DICOM series with planted truth."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference.outputs import validate_findings_json
from inference.outputs.codes import DIAMETER
from inference.outputs.uids import SEG, SR, DerivedUids, SourceKey
from inference.phantoms import make_chest_ct, write_dicom_series

ROOT = Path(__file__).resolve().parents[2]
MATCH_MM = 3.0


def radserve(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI; every JSON it prints is checked against the published findings schema."""
    result = subprocess.run([sys.executable, "-m", "inference.cli", *args], capture_output=True, text=True, timeout=600)
    if result.returncode == 0 and "json" in args:
        validate_findings_json(json.loads(result.stdout))
    return result


def match(findings: list[dict], lesions) -> tuple[dict, list[dict]]:
    """Nearest finding per planted lesion, and the findings that are near no lesion (false positives)."""
    centers = np.array([f["center_mm"] for f in findings]).reshape(-1, 3)
    nearest = {}
    for lesion in lesions:
        d = np.linalg.norm(centers - np.array(lesion.center_mm), axis=1) if len(centers) else np.array([np.inf])
        nearest[lesion] = float(d.min())

    def near_a_lesion(finding: dict) -> bool:
        return any(
            np.linalg.norm(np.subtract(finding["center_mm"], lesion.center_mm)) <= max(MATCH_MM, lesion.diameter_mm / 2)
            for lesion in lesions
        )

    false_positives = [f for f in findings if not near_a_lesion(f)]
    return nearest, false_positives


@pytest.fixture(scope="module")
def flipped_study(tmp_path_factory):
    """Rows run right-to-left, columns anterior-to-posterior... every axis flipped, files shuffled."""
    rng = np.random.default_rng(20261128)
    phantom = make_chest_ct(
        rng,
        shape=(192, 192, 72),
        pixel_spacing_mm=0.9,
        slice_spacing_mm=2.5,
        n_nodules=3,
        nodule_diameters_mm=(9.0, 14.0, 24.0),
        row_direction=(-1.0, 0.0, 0.0),
        column_direction=(0.0, -1.0, 0.0),
        slice_direction_sign=-1,
        origin_mm=(112.0, 95.0, 1234.5),
    )
    out = tmp_path_factory.mktemp("flipped")
    files = write_dicom_series(phantom, out, shuffle=rng)
    return phantom, out, files


def test_read_finds_planted_nodules_in_patient_coordinates(server, flipped_study):
    phantom, folder, files = flipped_study
    result = radserve("read", str(folder), "--server", server.target, "--format", "json")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["model"] == "lung_nodule_ct"
    assert body["model_version"]
    assert {"preprocess", "infer", "postprocess", "total"} <= set(body["timing_ms"])

    nearest, false_positives = match(body["findings"], phantom.lesions)
    for lesion, distance in nearest.items():
        if lesion.diameter_mm >= 8.0:
            assert distance <= MATCH_MM, f"nodule {lesion} nearest finding {distance:.1f} mm away"
    assert len(false_positives) <= 1, false_positives

    # Each finding names the slice nearest to its center: check against the file's own position.
    by_uid = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        by_uid[ds.SOPInstanceUID] = ds
    for finding in body["findings"]:
        ds = by_uid[finding["sop_instance_uid"]]
        row, col = np.array(ds.ImageOrientationPatient[:3]), np.array(ds.ImageOrientationPatient[3:])
        normal = np.cross(row, col)
        offset = float(np.dot(np.subtract(finding["center_mm"], ds.ImagePositionPatient), normal))
        assert abs(offset) <= 2.5 / 2 + 1e-3
        x0, y0, z0, x1, y1, z1 = finding["bbox_mm"]
        cx, cy, cz = finding["center_mm"]
        assert x0 <= cx <= x1 and y0 <= cy <= y1 and z0 <= cz <= z1


def test_nifti_and_dicom_give_the_same_findings(server, flipped_study, tmp_path):
    from inference.phantoms import write_nifti

    phantom, folder, _ = flipped_study
    nifti = tmp_path / "study.nii.gz"
    write_nifti(phantom.volume, nifti)
    from_nifti = json.loads(radserve("read", str(nifti), "--server", server.target, "--format", "json").stdout)
    from_dicom = json.loads(radserve("read", str(folder), "--server", server.target, "--format", "json").stdout)
    assert len(from_nifti["findings"]) == len(from_dicom["findings"])
    for a, b in zip(from_nifti["findings"], from_dicom["findings"], strict=True):
        assert np.allclose(a["center_mm"], b["center_mm"], atol=0.5)
    assert all("sop_instance_uid" not in f for f in from_nifti["findings"])


def test_models_list_reports_the_bundled_model(server):
    result = radserve("models", "list", "--server", server.target)
    assert result.returncode == 0, result.stderr
    assert "lung_nodule_ct" in result.stdout and "READY" in result.stdout and "cpu" in result.stdout


def test_bad_input_gets_a_precise_status_and_the_server_stays_up(server, tmp_path, flipped_study):
    junk = tmp_path / "not_dicom.dcm"
    junk.write_bytes(b"this is not a DICOM file" * 10)
    result = radserve("read", str(junk), "--server", server.target)
    assert result.returncode != 0
    assert result.stderr.startswith("error: INVALID_ARGUMENT:"), result.stderr
    assert "Traceback" not in result.stderr

    _, folder, _ = flipped_study
    result = radserve("read", str(folder), "--server", server.target, "--model", "no_such_model")
    assert result.returncode != 0 and result.stderr.startswith("error: NOT_FOUND:"), result.stderr

    result = radserve("read", str(folder), "--server", server.target, "--model", "lung_nodule_ct:999")
    assert result.stderr.startswith("error: NOT_FOUND:"), result.stderr

    assert radserve("models", "list", "--server", server.target).returncode == 0


def test_sr_and_seg_come_back_valid_and_equal_to_the_findings(server, flipped_study, sr_finding_groups, tmp_path):
    import highdicom as hd

    from inference.outputs import conformance

    _, folder, files = flipped_study
    sr_path, seg_path = tmp_path / "sr.dcm", tmp_path / "seg.dcm"
    args = ("read", str(folder), "--server", server.target, "--format", "json", "--sr", str(sr_path))
    result = radserve(*args, "--seg", str(seg_path))
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["findings"], "the phantom has planted nodules"

    source_uids = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    sr, seg = hd.sr.srread(sr_path), hd.seg.segread(seg_path)
    assert sr.StudyInstanceUID == seg.StudyInstanceUID == study_uid
    per_finding = sr_finding_groups(sr)
    assert len(per_finding) == len(body["findings"]) == len(seg.SegmentSequence)
    for number, (groups, finding) in enumerate(zip(per_finding, body["findings"], strict=True), start=1):
        np.testing.assert_allclose(groups["center_3d"].roi.graphic_data[0], finding["center_mm"], atol=1e-2)
        (diameter,) = groups["outline"].get_measurements(name=DIAMETER)
        assert diameter.value == pytest.approx(finding["diameter_mm"], abs=1e-2)
        center_image = groups["center"].roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        assert center_image == finding["sop_instance_uid"]
        outline_image = groups["outline"].roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        assert outline_image in source_uids
        assert groups["segment"].referenced_segment.referenced_segment_numbers == [number]
        assert seg.get_segment_description(number).tracking_uid == groups["segment"].tracking_uid
    referenced = {ref.ReferencedSOPInstanceUID for ref in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == source_uids

    if conformance.dciodvfy_available():
        for path in (sr_path, seg_path):
            assert conformance.dciodvfy(path).errors == [], path.name
    if shutil.which("dsrdump"):
        assert subprocess.run(["dsrdump", str(sr_path)], capture_output=True, timeout=60).returncode == 0

    # A redelivery: the same study read again gives the same UIDs, those the documented derivation gives for the
    # source instances and the model's weights, so that an archive replaces the objects instead of keeping two.
    again_sr, again_seg = tmp_path / "sr2.dcm", tmp_path / "seg2.dcm"
    result = radserve(*args[:-1], str(again_sr), "--seg", str(again_seg))
    assert result.returncode == 0, result.stderr
    weights = (ROOT / "models" / body["model"] / body["model_version"] / "model.pt").read_bytes()
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    uids = DerivedUids(
        SourceKey(study_uid, series_uid, tuple(sorted(source_uids))),
        model_name=body["model"],
        model_version=body["model_version"],
        weights_sha256=hashlib.sha256(weights).hexdigest(),
    )
    for path, kind in ((sr_path, SR), (again_sr, SR), (seg_path, SEG), (again_seg, SEG)):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert (ds.SOPInstanceUID, ds.SeriesInstanceUID) == (uids.instance(kind), uids.series(kind)), path.name
    tracking = [groups["outline"].tracking_uid for groups in sr_finding_groups(hd.sr.srread(again_sr))]
    assert tracking == [groups["outline"].tracking_uid for groups in per_finding]
    assert tracking == [uids.tracking(number) for number in range(1, len(per_finding) + 1)]
