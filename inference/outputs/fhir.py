"""The read's findings as FHIR R4: a Bundle holding a DiagnosticReport, one Observation per finding and the Device.

For the systems beside the archive (EHR, worklists), following HL7's DICOM SR to FHIR Resource Mapping IG (its
TID 1500 report -> DiagnosticReport, measurement group -> Observation, algorithm -> Device), restricted to R4
resources (the IG's ImagingSelection and BodyStructure are R5):

* Bundle, type "collection": the DiagnosticReport first, then the Observations, then the Device; entries refer to
  each other by ``urn:uuid`` full URLs.
* DiagnosticReport: status "preliminary" (AI output for review, as the SR's PRELIMINARY flag), category RAD
  (v2-0074), code DCM 126000 "Imaging Measurement Report", identifier = the SR's SOP Instance UID
  (``urn:dicom:uid``, ``urn:oid:``...), imagingStudy = the StudyInstanceUID (a logical reference), subject = the
  PatientID (a logical reference) when the source has one, performer = the Device, result = the Observations.
* Observation per finding N: status "preliminary", category "imaging" and DCM 125007 "Measurement Group", code =
  the finding type (the SR's Finding code), bodySite = the finding site where known, identifiers = the tracking
  identifier "finding N" and tracking UID (the SR group's and the SEG segment's), components with UCUM quantities:
  Diameter (mm), Volume (mL) where known, Certainty of Finding (%); derivedFrom = the SR and SEG instances the read
  made, as logical references; device = the Device.
* Device: the algorithm (``inference.outputs.algorithm``): its Device UID, model name, versions, manufacturer.

Resource ids are the UUIDs of the derived UIDs (a "2.25." UID is the decimal of a UUID), so a redelivered read
gives the same ids. Codes: SCT -> http://snomed.info/sct, DCM -> http://dicom.nema.org/resources/ontology/DCM,
LN -> http://loinc.org, UCUM -> http://unitsofmeasure.org, 99RADSERVE -> ``urn:radserve:label``. The JSON is
validated against the FHIR R4B models of fhir.resources in the tests (R4B leaves these resources as R4 has them).
"""

from __future__ import annotations

import datetime
import json
import uuid
from collections.abc import Sequence
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from inference.io.volume import Volume
from inference.outputs.algorithm import Algorithm
from inference.outputs.codes import (
    CERTAINTY_OF_FINDING,
    DIAMETER,
    IHE_SCHEME,
    LOCAL_SCHEME,
    VOLUME,
    finding_site_code,
    finding_type_code,
)
from inference.outputs.finding import Finding
from inference.outputs.uids import SR, UUID_ROOT, DerivedUids

SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "LN": "http://loinc.org",
    "UCUM": "http://unitsofmeasure.org",
    LOCAL_SCHEME: "urn:radserve:label",
    IHE_SCHEME: "urn:ihe:rad:codes",
}
DICOM_UID_SYSTEM = "urn:dicom:uid"
IMAGING_MEASUREMENT_REPORT = Code("126000", "DCM", "Imaging Measurement Report")
MEASUREMENT_GROUP = Code("125007", "DCM", "Measurement Group")


def coding(code: Code) -> dict[str, str]:
    system = SYSTEMS.get(code.scheme_designator, f"urn:dicom:scheme:{code.scheme_designator}")
    return {"system": system, "code": code.value, "display": code.meaning}


def concept(code: Code) -> dict[str, Any]:
    return {"coding": [coding(code)], "text": code.meaning}


def uid_identifier(uid: str) -> dict[str, str]:
    return {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}


def uuid_of(uid: str) -> str:
    """The UUID behind a derived "2.25." UID (its decimal); a fresh one for any other UID."""
    if uid.startswith(UUID_ROOT):
        return str(uuid.UUID(int=int(uid.removeprefix(UUID_ROOT))))
    return str(uuid.uuid4())


def build_fhir_report(
    volume: Volume,
    findings: Sequence[Finding],
    *,
    algorithm: Algorithm,
    report: Dataset | None = None,
    segmentation: Dataset | None = None,
    issued: datetime.datetime | None = None,
) -> dict[str, Any]:
    """The FHIR R4 Bundle of a read (see the module docstring), as a JSON-ready dict.

    ``report`` and ``segmentation``: the SR and SEG this read made, which the Observations name as derivedFrom.
    The DiagnosticReport's identifier is the SR's (derived) SOP Instance UID whether or not the SR was made.
    """
    uids = DerivedUids.for_volume(
        volume, model_name=algorithm.name, model_version=algorithm.version, weights_sha256=algorithm.weights_sha256
    )
    sr_uid = uids.instance(SR)
    report_id, device_id = uuid_of(sr_uid), uuid_of(algorithm.device_uid)
    issued = issued or datetime.datetime.now(datetime.UTC)
    header = volume.source.header if volume.source is not None and isinstance(volume.source.header, Dataset) else None
    patient_id = str(header.get("PatientID", "") or "") if header is not None else ""
    subject = {"subject": {"identifier": {"value": patient_id}, "display": "patient"}} if patient_id else {}

    derived_from = []
    if report is not None:
        derived_from.append({"identifier": uid_identifier(str(report.SOPInstanceUID)), "display": "DICOM SR"})
    if segmentation is not None:
        derived_from.append({"identifier": uid_identifier(str(segmentation.SOPInstanceUID)), "display": "DICOM SEG"})
    device_reference = {"reference": f"urn:uuid:{device_id}", "display": algorithm.name}

    observations = []
    for number, finding in enumerate(findings, start=1):
        tracking_uid = uids.tracking(number)
        observation: dict[str, Any] = {
            "resourceType": "Observation",
            "id": uuid_of(tracking_uid),
            "identifier": [
                {"type": {"text": "Tracking Identifier"}, "value": f"finding {number}"},
                {**uid_identifier(tracking_uid), "type": {"text": "Tracking Unique Identifier"}},
            ],
            "status": "preliminary",
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                            "code": "imaging",
                            "display": "Imaging",
                        }
                    ]
                },
                concept(MEASUREMENT_GROUP),
            ],
            "code": concept(finding_type_code(finding.label)),
            **subject,
            "issued": issued.isoformat(),
            "device": device_reference,
            **({"derivedFrom": derived_from} if derived_from else {}),
            "component": _components(finding),
        }
        site = finding_site_code(volume.modality, finding.label)
        if site is not None:
            observation["bodySite"] = concept(site)
        observations.append(observation)

    diagnostic_report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": report_id,
        "identifier": [uid_identifier(sr_uid)],
        "status": "preliminary",
        "category": [
            {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"}
                ]
            }
        ],
        "code": concept(IMAGING_MEASUREMENT_REPORT),
        **subject,
        "issued": issued.isoformat(),
        "performer": [device_reference],
        "conclusion": f"{len(observations)} finding(s) by {algorithm.name} {algorithm.version} (AI, for review)",
    }
    if observations:  # FHIR JSON has no empty arrays
        diagnostic_report["result"] = [
            {"reference": f"urn:uuid:{o['id']}", "display": f"finding {n}"} for n, o in enumerate(observations, 1)
        ]
    if volume.source is not None:
        diagnostic_report["imagingStudy"] = [
            {"identifier": uid_identifier(volume.source.study_instance_uid), "display": "study"}
        ]
    device = {
        "resourceType": "Device",
        "id": device_id,
        "identifier": [uid_identifier(algorithm.device_uid)],
        "manufacturer": "radserve",
        "deviceName": [{"name": algorithm.name, "type": "model-name"}],
        "type": concept(Code("123110", "DCM", "Artificial Intelligence")),
        "version": [
            {"type": {"text": "model"}, "value": algorithm.version},
            {"type": {"text": "radserve"}, "value": algorithm.software_version},
        ],
    }
    if algorithm.weights_sha256:
        device["version"].append({"type": {"text": "weights sha256"}, "value": algorithm.weights_sha256})
    resources = [diagnostic_report, *observations, device]
    return {
        "resourceType": "Bundle",
        "id": report_id,
        "type": "collection",
        "timestamp": issued.isoformat(),
        "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources],
    }


def _components(finding: Finding) -> list[dict[str, Any]]:
    def quantity(value: float, unit: str, code: str) -> dict[str, Any]:
        return {"value": round(float(value), 6), "unit": unit, "system": SYSTEMS["UCUM"], "code": code}

    components = [{"code": concept(DIAMETER), "valueQuantity": quantity(finding.diameter_mm, "mm", "mm")}]
    if finding.volume_ml is not None:
        components.append({"code": concept(VOLUME), "valueQuantity": quantity(finding.volume_ml, "mL", "mL")})
    components.append(
        {"code": concept(CERTAINTY_OF_FINDING), "valueQuantity": quantity(float(finding.score) * 100.0, "%", "%")}
    )
    return components


def encode_fhir(bundle: dict[str, Any]) -> bytes:
    """The Bundle as compact UTF-8 JSON."""
    return json.dumps(bundle, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
