"""Server lifecycle against a real server process: health after warm-up, reflection, SIGTERM drain."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.client import ReadingClient
from inference.phantoms import make_chest_ct
from inference.serverproc import ServerProcess, health_status

pytestmark = pytest.mark.server  # every test here starts a server (tests/conftest.py)


def _raw_study(seed: int):
    phantom = make_chest_ct(np.random.default_rng(seed), shape=(160, 160, 64), slice_spacing_mm=2.5, n_nodules=1)
    volume = phantom.volume
    raw = pb.RawArray(dtype="float32", shape=volume.shape, affine=volume.affine.ravel().tolist())
    return volume.voxels.astype(np.float32).tobytes(), raw


def test_health_is_serving_after_warmup_and_reflection_lists_services(server):
    assert health_status(server.target) == health_pb2.HealthCheckResponse.SERVING
    assert health_status(server.target, "radserve.v1.ReadingService") == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"radserve.v1.ReadingService", "grpc.health.v1.Health"} <= names


def test_health_is_not_serving_until_models_are_warm(tmp_path):
    proc = ServerProcess(log_path=tmp_path / "server.log").spawn()
    try:
        seen = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            status = health_status(proc.target, timeout_s=1.0)
            if status is not None:
                seen.append(status)
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
            time.sleep(0.05)
        assert seen and seen[-1] == health_pb2.HealthCheckResponse.SERVING
        assert seen[0] == health_pb2.HealthCheckResponse.NOT_SERVING, "health answered SERVING before warm-up"
    finally:
        proc.stop()


def test_sigterm_lets_reads_in_flight_finish_and_exits_zero(tmp_path):
    data, raw = _raw_study(5)
    with ServerProcess(log_path=tmp_path / "server.log", extra_args=["--grace-s", "60"]) as proc:
        client = ReadingClient(proc.target)
        results: dict[str, object] = {}

        def read() -> None:
            try:
                results["response"] = client.read([data], payload_kind=pb.RAW, raw=raw, timeout_s=120)
            except grpc.RpcError as exc:
                results["error"] = exc

        thread = threading.Thread(target=read)
        thread.start()
        log = proc.log_path
        deadline = time.monotonic() + 60
        while "-> lung_nodule_ct" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)  # wait until the read is past decoding, i.e. in flight in the engine
        proc.process.send_signal(15)
        time.sleep(0.3)
        late = ReadingClient(proc.target)
        try:
            late.read([data], payload_kind=pb.RAW, raw=raw, timeout_s=30)
            late_code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            late_code = exc.code()
        finally:
            late.close()
        thread.join(120)
        client.close()
        assert "error" not in results, results.get("error")
        assert results["response"].model == "lung_nodule_ct"
        assert late_code == grpc.StatusCode.UNAVAILABLE
        assert proc.process.wait(60) == 0
