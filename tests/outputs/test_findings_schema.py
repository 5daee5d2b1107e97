"""The `read --format json` schema and its validator."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest

from inference.outputs import load_findings_schema, validate_findings_json
from inference.outputs.finding import Finding

UID = "1.2.826.0.1.3680043.8.498.12345678901234567890"


def _example() -> dict[str, Any]:
    finding = Finding(
        label="nodule",
        score=0.9134,
        center_mm=(-10.46, -2.29, -216.52),
        bbox_mm=(-13.2, -5.1, -219.3, -7.7, 0.5, -213.7),
        diameter_mm=5.59,
        volume_ml=0.0914,
        sop_instance_uid=UID,
        center_voxel=(42.1, 30.0, 7.6),
    )
    return {
        "request_id": "r-1",
        "model": "lung_nodule_ct",
        "model_version": "1",
        "device": "cpu",
        "findings": [finding.to_json()],
        "warnings": [],
        "timing_ms": {"preprocess": 12.5, "infer": 230.0, "total": 250.1},
    }


def test_schema_file_is_draft_2020_12_and_uses_only_supported_keywords() -> None:
    schema = load_findings_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert set(schema["required"]) == {"model", "model_version", "findings", "timing_ms"}


def test_valid_examples_pass() -> None:
    validate_findings_json(_example())
    minimal = {"model": "m", "model_version": "1", "findings": [], "timing_ms": {}}
    validate_findings_json(minimal)
    xray = copy.deepcopy(minimal)
    xray["findings"] = [
        {"label": "nodule", "score": 1, "center_mm": [10.0, 20.0], "bbox_mm": [5, 15, 15, 25], "diameter_mm": 0}
    ]
    validate_findings_json(json.loads(json.dumps(xray)))


def test_cli_output_conforms() -> None:
    """The producer of the contract: inference.cli.response_to_json on a real ReadResponse."""
    from inference.api.gen.radserve.v1 import reading_pb2
    from inference.cli import response_to_json

    response = reading_pb2.ReadResponse(request_id="r-2", model="lung_nodule_ct", model_version="1", device="cpu")
    item = response.findings.add(label="nodule", score=0.75, diameter_mm=6.0, volume_ml=0.1, sop_instance_uid=UID)
    item.center_mm.extend([1.0, 2.0, 3.0])
    item.bbox_mm.extend([-2.0, -1.0, 0.0, 4.0, 5.0, 6.0])
    item.center_voxel.extend([10.0, 11.0, 3.0])
    response.findings.add(label="nodule", score=0.5, center_mm=[0, 0, 0], bbox_mm=[0, 0, 0, 1, 1, 1], diameter_mm=1)
    response.timing_ms["total"] = 12.0
    response.warnings.append("slice spacing varies")
    validate_findings_json(response_to_json(response))


@pytest.mark.parametrize(
    ("mutate", "path", "message"),
    [
        (lambda o: o.pop("model"), "$", "missing required property 'model'"),
        (lambda o: o["findings"][0].update(score=1.5), "$.findings[0].score", "must be <= 1"),
        (lambda o: o["findings"][0].update(score=-0.1), "$.findings[0].score", "must be >= 0"),
        (lambda o: o["findings"][0].update(score=math.nan), "$.findings[0].score", "must be of type number"),
        (lambda o: o["findings"][0].update(score=True), "$.findings[0].score", "must be of type number"),
        (lambda o: o["findings"][0].update(center_mm=[1.0]), "$.findings[0].center_mm", "at least 2 items"),
        (lambda o: o["findings"][0].update(center_mm=[1, 2, "3"]), "$.findings[0].center_mm[2]", "type number"),
        (lambda o: o["findings"][0].update(bbox_mm=[0, 0, 0, 1, 1]), "$.findings[0].bbox_mm", "none of the allowed"),
        (lambda o: o["findings"][0].update(diameter_mm=-1), "$.findings[0].diameter_mm", "must be >= 0"),
        (lambda o: o["findings"][0].pop("label"), "$.findings[0]", "missing required property 'label'"),
        (lambda o: o["findings"][0].update(label=" "), "$.findings[0].label", "pattern"),
        (lambda o: o["findings"][0].update(sop_instance_uid="1.02.3"), "$.findings[0].sop_instance_uid", "pattern"),
        (lambda o: o["findings"][0].update(sop_instance_uid="1." * 40 + "1"), "$.findings[0].sop_instance_uid", ""),
        (lambda o: o["findings"][0].update(extra=1), "$.findings[0].extra", "not an allowed property"),
        (lambda o: o.update(findings={}), "$.findings", "must be of type array, got object"),
        (lambda o: o["timing_ms"].update(infer="slow"), "$.timing_ms.infer", "type number"),
        (lambda o: o.update(warnings=[3]), "$.warnings[0]", "type string"),
    ],
)
def test_invalid_objects_fail_naming_the_path(mutate, path: str, message: str) -> None:
    obj = _example()
    mutate(obj)
    with pytest.raises(ValueError) as info:
        validate_findings_json(obj)
    text = str(info.value)
    assert text.startswith(f"{path}: "), text
    assert message in text
    assert UID not in text  # values are never echoed
