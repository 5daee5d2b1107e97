"""Admission control, deadlines and cancellation against one real server with a limit of 2 reads in flight.

The server's metrics endpoint tells the queue depth and how many work items ran, so the tests can see that
work of a read past its deadline, or cancelled, was dropped rather than run.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.client import ReadingClient
from inference.modelrepo.schema import ModelConfig
from inference.phantoms import make_chest_ct
from inference.serverproc import ServerProcess, free_port
from inference.tasks.detection import DetectionTask

ROOT = Path(__file__).resolve().parents[2]
MAX_IN_FLIGHT = 2
LUNG = ModelConfig.from_yaml(ROOT / "models" / "lung_nodule_ct" / "1" / "model.yaml")


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_repo):
    with ServerProcess(
        models=model_repo("lung_nodule_ct"),
        log_path=tmp_path_factory.mktemp("admission") / "server.log",
        metrics_port=free_port(),
        env={"RADSERVE_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT)},  # the environment route of a setting
        extra_args=["--log-level", "DEBUG"],
    ) as proc:
        yield proc


def make_study(seed: int, shape: tuple[int, int, int]):
    phantom = make_chest_ct(seed, shape=shape, pixel_spacing_mm=1.0, slice_spacing_mm=2.5, n_nodules=1)
    volume = phantom.volume
    raw = pb.RawArray(dtype="float32", shape=volume.shape, affine=volume.affine.ravel().tolist())
    return volume, volume.voxels.astype(np.float32).tobytes(), raw


@pytest.fixture(scope="module")
def small():
    """One 96^3 patch."""
    return make_study(21, (128, 128, 48))


@pytest.fixture(scope="module")
def large():
    """3 x 3 x 3 patches: seven forward passes of at most 4, seconds of work even on an idle machine."""
    return make_study(22, (256, 256, 120))


def metrics(server) -> dict[str, float]:
    """Samples as ``name{label=value,...}`` -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}"] = s.value
    return samples


QUEUE = "radserve_queue_depth{model=lung_nodule_ct,version=1}"
ITEMS_RUN = "radserve_batch_size_sum{model=lung_nodule_ct,version=1}"
IN_FLIGHT = "radserve_reads_in_flight{}"


def wait_for(predicate, timeout_s: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def findings(response: pb.ReadResponse) -> np.ndarray:
    return np.array(sorted((f.score, *f.center_mm) for f in response.findings)).reshape(-1, 4)


def test_a_flood_past_the_in_flight_limit_gets_unavailable_and_admitted_reads_are_correct(server, small):
    _, data, raw = small
    client = ReadingClient(server.target)
    try:
        reference = client.read([data], payload_kind=pb.RAW, raw=raw, timeout_s=120)
        futures = [client.read_future([data], payload_kind=pb.RAW, raw=raw, timeout_s=300) for _ in range(6)]
        outcomes = []
        for future in futures:
            try:
                outcomes.append(future.result())
            except grpc.RpcError as exc:
                outcomes.append(exc)
    finally:
        client.close()
    refused = [o for o in outcomes if isinstance(o, grpc.RpcError)]
    admitted = [o for o in outcomes if not isinstance(o, grpc.RpcError)]
    assert refused and admitted, outcomes
    for exc in refused:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE
        assert exc.details() == f"server is at its limit of {MAX_IN_FLIGHT} reads in flight; retry later"
    for response in admitted:
        assert response.model == "lung_nodule_ct"
        np.testing.assert_allclose(findings(response), findings(reference), atol=1e-3)
    assert metrics(server)[IN_FLIGHT] == 0


def test_a_50_ms_deadline_on_a_slow_read_is_deadline_exceeded_and_the_server_goes_on(server, small):
    _, data, raw = small
    client = ReadingClient(server.target)
    try:
        with pytest.raises(grpc.RpcError) as failed:
            client.read([data], payload_kind=pb.RAW, raw=raw, timeout_s=0.05)
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: metrics(server)[IN_FLIGHT] == 0, what="the expired read to leave")
        assert metrics(server)[QUEUE] == 0
        assert client.read([data], payload_kind=pb.RAW, raw=raw, timeout_s=120).model == "lung_nodule_ct"
    finally:
        client.close()


def test_a_read_whose_deadline_passes_in_the_queue_is_dropped_and_the_queue_drains(server, small, large):
    large_items = len(DetectionTask(LUNG, torch.device("cpu")).prepare(large[0]).items)
    assert large_items > 5 * LUNG.batching.max_batch_size  # the large read holds the model for several passes
    client = ReadingClient(server.target)
    try:
        before = metrics(server)[ITEMS_RUN]
        blocker = client.read_future([large[1]], payload_kind=pb.RAW, raw=large[2], timeout_s=300)
        # A RAW upload is read by slab: its patches queue as its x-planes arrive. Wait until all of them have
        # (queued or run, at most one batch in flight), so that the small read's patch queues behind them.
        batch = LUNG.batching.max_batch_size
        wait_for(
            lambda: (m := metrics(server))[QUEUE] + m[ITEMS_RUN] - before >= large_items - batch,
            what="the large read's items to queue",
        )
        with pytest.raises(grpc.RpcError) as failed:  # queued behind the large read's items
            client.read([small[1]], payload_kind=pb.RAW, raw=small[2], timeout_s=1.0)
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The premise: the deadline passed while the large read's items were still ahead of the small one's.
        # Otherwise the small read's patch may have run before it expired, and the count below means nothing.
        assert not blocker.done(), "the large read finished before the small read's deadline: make it larger"
        assert blocker.result().model == "lung_nodule_ct"
        wait_for(lambda: metrics(server)[QUEUE] == 0 and metrics(server)[IN_FLIGHT] == 0, what="the queue to drain")
        assert metrics(server)[ITEMS_RUN] - before == large_items  # the expired read's patch never ran
    finally:
        client.close()


def test_a_cancelled_read_stops_its_work(server, large):
    _, data, raw = large
    client = ReadingClient(server.target)
    try:
        before = metrics(server)[ITEMS_RUN]
        future = client.read_future([data], payload_kind=pb.RAW, raw=raw, timeout_s=300)
        wait_for(lambda: metrics(server)[QUEUE] > 0, what="the read's items to queue")
        future.cancel()
        wait_for(lambda: metrics(server)[IN_FLIGHT] == 0 and metrics(server)[QUEUE] == 0, what="the queue to drain")
        ran = metrics(server)[ITEMS_RUN] - before
        assert ran <= LUNG.batching.max_batch_size, f"{ran} items ran"  # at most the forward already running
        assert metrics(server)["radserve_reads_total{model=lung_nodule_ct,status=CANCELLED,version=1}"] >= 1
    finally:
        client.close()
    assert "was cancelled; dropped" in server.log_path.read_text()


def test_max_in_flight_is_bounded_and_comes_from_the_environment():
    from inference.config import ServerConfig, load_config

    with pytest.raises(ValueError, match="max_in_flight must be >= 1, got 0"):
        ServerConfig(max_in_flight=0)
    assert load_config({}, environ={"RADSERVE_MAX_IN_FLIGHT": "7"}).max_in_flight == 7
    assert load_config({"max_in_flight": 3}, environ={"RADSERVE_MAX_IN_FLIGHT": "7"}).max_in_flight == 3
    assert load_config({}, environ={"RADSERVE_OOM_CPU_FALLBACK": "false"}).oom_cpu_fallback is False
