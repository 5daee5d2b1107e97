"""The FHIR view of a read: a valid R4 Bundle whose DiagnosticReport and Observations say what the findings say."""

from __future__ import annotations

import copy
import datetime
import json

import pytest

from inference.io.volume import Volume
from inference.outputs import Algorithm, build_measurement_report, build_segmentation
from inference.outputs.fhir import build_fhir_report, encode_fhir, uuid_of
from inference.outputs.regions import finding_masks
from inference.outputs.uids import SR, DerivedUids

# Development dependencies (requirements.txt, and pydantic through fhir.resources), not on the GPU machine: the
# module skips there.
pydantic = pytest.importorskip("pydantic")
Bundle = pytest.importorskip("fhir.resources.R4B.bundle").Bundle

ALGORITHM = Algorithm("lung_nodule_ct", "1.2.0", "ab" * 32)
ISSUED = datetime.datetime(2026, 12, 1, 8, 30, tzinfo=datetime.UTC)


def _bundle(ct_study, **kwargs) -> dict:
    volume, findings = ct_study.volume, ct_study.findings
    masks, rendered = finding_masks(volume, findings, None)
    seg = build_segmentation(
        volume, findings, masks, algorithm=ALGORITHM, source_datasets=ct_study.datasets, rendered=rendered
    )
    sr = build_measurement_report(volume, findings, algorithm=ALGORITHM, segmentation=seg)
    bundle = build_fhir_report(volume, findings, algorithm=ALGORITHM, report=sr, segmentation=seg, issued=ISSUED)
    return json.loads(encode_fhir(bundle)), sr, seg


def test_the_bundle_is_valid_fhir_r4(ct_study) -> None:
    bundle, _, _ = _bundle(ct_study)
    parsed = Bundle.model_validate(bundle)  # fhir.resources: every element, type and cardinality checked
    assert [entry.resource.get_resource_type() for entry in parsed.entry] == [
        "DiagnosticReport",
        "Observation",
        "Observation",
        "Device",
    ]
    # The validator is live: an Observation without its required code, or with a misspelt element, is refused.
    # (fhir.resources checks structure, types and cardinalities, not value sets.)
    for break_it in (lambda o: o.pop("code"), lambda o: o.update(bodysite=o.pop("bodySite"))):
        broken = copy.deepcopy(bundle)
        break_it(broken["entry"][1]["resource"])
        with pytest.raises(pydantic.ValidationError):
            Bundle.model_validate(broken)


def test_report_and_observations_say_what_the_findings_say(ct_study) -> None:
    bundle, sr, seg = _bundle(ct_study)
    volume, findings = ct_study.volume, ct_study.findings
    resources = {entry["fullUrl"]: entry["resource"] for entry in bundle["entry"]}
    (report,) = [r for r in resources.values() if r["resourceType"] == "DiagnosticReport"]
    (device,) = [r for r in resources.values() if r["resourceType"] == "Device"]
    uids = DerivedUids.for_volume(volume, model_name="lung_nodule_ct", model_version="1.2.0", weights_sha256="ab" * 32)

    assert report["identifier"] == [{"system": "urn:dicom:uid", "value": f"urn:oid:{sr.SOPInstanceUID}"}]
    assert report["id"] == uuid_of(uids.instance(SR)) == bundle["id"]
    assert report["code"]["coding"][0]["code"] == "126000"  # DCM Imaging Measurement Report
    assert report["status"] == "preliminary"
    assert report["subject"]["identifier"]["value"] == volume.source.header.PatientID
    assert report["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{volume.source.study_instance_uid}"
    assert report["performer"][0]["reference"] == f"urn:uuid:{device['id']}"
    assert device["identifier"][0]["value"] == f"urn:oid:{ALGORITHM.device_uid}"
    assert {v["value"] for v in device["version"]} == {"1.2.0", ALGORITHM.software_version, "ab" * 32}

    observations = [resources[reference["reference"]] for reference in report["result"]]
    assert len(observations) == len(findings)
    for number, (observation, finding) in enumerate(zip(observations, findings, strict=True), start=1):
        assert observation["code"]["coding"][0] == {
            "system": "http://snomed.info/sct",
            "code": "27925004",
            "display": "Nodule",
        }
        assert observation["bodySite"]["coding"][0]["code"] == "39607008"  # lung
        tracking = {identifier["value"] for identifier in observation["identifier"]}
        assert tracking == {f"finding {number}", f"urn:oid:{uids.tracking(number)}"}
        assert seg.SegmentSequence[number - 1].TrackingUID == uids.tracking(number)  # the same finding in the SEG
        values = {c["code"]["coding"][0]["code"]: c["valueQuantity"] for c in observation["component"]}
        assert values["81827009"] == pytest.approx(
            {"value": round(finding.diameter_mm, 6), "unit": "mm", "system": "http://unitsofmeasure.org", "code": "mm"}
        )
        assert values["118565006"]["value"] == pytest.approx(finding.volume_ml, abs=1e-6)
        assert values["118565006"]["code"] == "mL"
        assert values["111012"]["value"] == pytest.approx(finding.score * 100.0) and values["111012"]["code"] == "%"
        derived = {reference["identifier"]["value"] for reference in observation["derivedFrom"]}
        assert derived == {f"urn:oid:{sr.SOPInstanceUID}", f"urn:oid:{seg.SOPInstanceUID}"}


def test_a_redelivery_gives_the_same_bundle(ct_study) -> None:
    first, _, _ = _bundle(ct_study)
    second, _, _ = _bundle(ct_study)
    assert first == second  # the same ids and content; only `issued` would differ, and it is fixed here


def test_without_dicom_source_and_without_findings(ct_study) -> None:
    volume = ct_study.volume
    nifti = Volume(volume.voxels, volume.affine, "CT")
    bundle = build_fhir_report(nifti, ct_study.findings[:1], algorithm=Algorithm("m", "1"))
    parsed = Bundle.model_validate(bundle)
    report = parsed.entry[0].resource
    assert report.subject is None and report.imagingStudy is None and len(report.result) == 1
    empty = Bundle.model_validate(build_fhir_report(volume, [], algorithm=ALGORITHM))
    assert empty.entry[0].resource.result is None and empty.entry[0].resource.conclusion.startswith("0 finding")
