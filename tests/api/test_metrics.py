"""Metrics endpoint, JSON logs and the audit record, against one real server (``--log-format json``).

The DICOM study carries canary patient data (name, ID, accession number, UIDs): none of it may reach the log.
"""

from __future__ import annotations

import json
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.client import ReadingClient
from inference.io.dicom import hash_uid
from inference.phantoms import make_chest_ct, write_dicom_series
from inference.serverproc import ServerProcess, free_port

CANARY = {
    "patient_name": "CANARYSURNAME^CANARYGIVEN",
    "patient_id": "CANARY-PID-90210",
    "accession_number": "CANARYACC77",
    "study_instance_uid": "1.2.826.0.1.3680043.8.498.77665544332211",
    "series_instance_uid": "1.2.826.0.1.3680043.8.498.11223344556677",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_repo):
    with ServerProcess(
        models=model_repo("lung_nodule_ct"),
        log_path=tmp_path_factory.mktemp("metrics") / "server.log",
        metrics_port=free_port(),
        extra_args=["--log-format", "json", "--log-level", "DEBUG"],
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def phantom():
    return make_chest_ct(31, shape=(128, 128, 40), pixel_spacing_mm=1.0, slice_spacing_mm=2.5, n_nodules=1)


@pytest.fixture(scope="module")
def outcomes(server, phantom, tmp_path_factory):
    """Reads of every kind, each with its request id -> the status it got."""
    volume = phantom.volume
    data = volume.voxels.astype(np.float32).tobytes()
    raw = pb.RawArray(dtype="float32", shape=volume.shape, affine=volume.affine.ravel().tolist())
    bad_raw = pb.RawArray(dtype="float32", shape=[7, 7, 7], affine=raw.affine)
    folder = tmp_path_factory.mktemp("canary")
    series = [p.read_bytes() for p in write_dicom_series(phantom, folder, **CANARY)]
    reads = {
        "audit-dicom": dict(payloads=series, payload_kind=pb.DICOM_FILES),
        "audit-raw": dict(payloads=[data], payload_kind=pb.RAW, raw=raw),
        "audit-bad-shape": dict(payloads=[data], payload_kind=pb.RAW, raw=bad_raw),
        "audit-not-found": dict(payloads=[data], payload_kind=pb.RAW, raw=raw, model="no_such_model"),
        "audit-not-dicom": dict(payloads=[b"not a DICOM file" * 64], payload_kind=pb.DICOM_FILES),
    }
    client = ReadingClient(server.target)
    got = {}
    try:
        for request_id, kwargs in reads.items():
            try:
                client.read(kwargs.pop("payloads"), request_id=request_id, timeout_s=120, **kwargs)
                got[request_id] = "OK"
            except grpc.RpcError as exc:
                got[request_id] = exc.code().name
    finally:
        client.close()
    return got


def scrape(server) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[f"{s.name}{{{','.join(f'{k}={v}' for k, v in sorted(s.labels.items()))}}}"] = s.value
    return samples


def log_records(server) -> list[dict]:
    # gRPC's own C core writes a few plain lines to stderr; every line of ours is one JSON object.
    return [json.loads(line) for line in server.log_path.read_text().splitlines() if line.startswith("{")]


def test_the_reads_got_their_statuses(outcomes):
    assert outcomes == {
        "audit-dicom": "OK",
        "audit-raw": "OK",
        "audit-bad-shape": "INVALID_ARGUMENT",
        "audit-not-found": "NOT_FOUND",
        "audit-not-dicom": "INVALID_ARGUMENT",
    }


def test_the_metrics_endpoint_serves_counters_histograms_and_gauges(server, outcomes):
    m = scrape(server)
    assert m["radserve_reads_total{model=lung_nodule_ct,status=OK,version=1}"] == 2
    assert m["radserve_reads_total{model=unknown,status=INVALID_ARGUMENT,version=unknown}"] == 2
    assert m["radserve_reads_total{model=unknown,status=NOT_FOUND,version=unknown}"] == 1
    assert not any("no_such_model" in key for key in m)  # a client-sent name is never a label
    for stage in ("receive", "decode", "preprocess", "infer", "postprocess", "total"):
        assert m[f"radserve_stage_seconds_count{{stage={stage}}}"] == 2
    assert m["radserve_stage_seconds_sum{stage=total}"] > 0
    assert m["radserve_reads_in_flight{}"] == 0
    assert m["radserve_queue_depth{model=lung_nodule_ct,version=1}"] == 0
    assert m["radserve_batch_size_count{model=lung_nodule_ct,version=1}"] >= 2  # warm-up runs outside the batcher
    assert m["radserve_batch_size_bucket{le=+Inf,model=lung_nodule_ct,version=1}"] >= 2
    assert not any(key.startswith("radserve_gpu_memory") for key in m)  # CPU server: no GPU gauge


def test_one_audit_record_per_read_with_hashed_study_and_no_patient_data(server, outcomes):
    audits = [r for r in log_records(server) if r["logger"] == "radserve.audit"]
    by_id = {}
    for record in audits:
        by_id.setdefault(record["audit"]["request_id"], []).append(record["audit"])
    assert sorted(by_id) == sorted(outcomes)
    for request_id, status in outcomes.items():
        (audit,) = by_id[request_id]
        assert audit["status"] == status
        assert audit["duration_ms"] >= 0 and audit["tenant"] == "-"
    assert by_id["audit-dicom"][0]["study_hash"] == hash_uid(CANARY["study_instance_uid"])
    assert by_id["audit-dicom"][0]["model"] == "lung_nodule_ct" and by_id["audit-dicom"][0]["model_version"] == "1"
    assert by_id["audit-raw"][0]["study_hash"] == ""  # a raw array has no study UID
    log = server.log_path.read_text()
    for value in CANARY.values():
        for variant in {value, *value.split("^")}:
            assert variant not in log, f"patient data {variant!r} in the server log"


def test_json_log_lines_carry_ts_level_logger_request_id_and_msg(server, outcomes):
    records = log_records(server)
    assert len(records) > 10
    for record in records:
        assert {"ts", "level", "logger", "request_id", "msg"} <= set(record)
    assert any(r["request_id"] == "audit-raw" and r["logger"] == "inference.api.servicer" for r in records)


def test_metrics_and_log_settings_are_checked():
    from inference.config import ServerConfig

    with pytest.raises(ValueError, match="'xml'"):
        ServerConfig(log_format="xml")
    with pytest.raises(ValueError, match="70000"):
        ServerConfig(metrics_port=70000)
    with pytest.raises(ValueError, match="metrics_port must differ from port"):
        ServerConfig(port=9000, metrics_port=9000)
    assert ServerConfig(metrics_port=0).metrics_port == 0
