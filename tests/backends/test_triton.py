"""The Triton backend against a real Triton Inference Server (nvidia-pytriton's tritonserver, in .venv-triton).

Fast tests: the output layout, config.pbtxt, settings, and an unreachable Triton. Slow ones export every model
of models/ with `radserve triton export` (each export checked against the eager network), start a real Triton
with `radserve triton serve`, read a phantom through `radserve serve --backend triton` and compare with the
local torch backend, then kill Triton mid-read (UNAVAILABLE, health NOT_SERVING) and start it again (reads
succeed, health SERVING) without restarting radserve.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2

from inference.backends.triton.layout import flatten, layout_names, parse_layout, rebuild
from inference.config import TritonConfig
from inference.errors import BackendUnavailableError
from inference.serverproc import ServerProcess, free_port, health_status
from inference.triton.config_pbtxt import TensorSpec, TritonModelSpec, input_spec, parse_config, render_config

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
CT_MODEL = "lung_nodule_ct"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _model_names() -> list[str]:
    from inference.modelrepo.repository import discover

    return sorted({s.name for s in discover(MODELS)})


# -- fast: layout, config, settings ----------------------------------------------------------------------------


def test_layout_round_trips_retinanet_segmentation_and_list_outputs():
    retinanet = {
        "classification": [torch.zeros(2, 3, 4), torch.ones(2, 3, 2)],
        "box_regression": [torch.ones(2, 18, 4)],
    }
    tensors, layout = flatten(retinanet)
    assert layout == {
        "classification": ["classification_0__0", "classification_1__1"],
        "box_regression": ["box_regression_0__2"],
    }
    names = layout_names(layout)
    rebuilt = rebuild(parse_layout(json.dumps(layout)), dict(zip(names, tensors, strict=True)))
    assert rebuilt.keys() == retinanet.keys()
    assert all(a is b for a, b in zip(rebuilt["classification"], retinanet["classification"], strict=True))
    assert flatten(torch.zeros(1, 2, 8, 8, 8))[1] == "output__0"
    assert flatten([torch.zeros(1), torch.zeros(1)])[1] == ["output_0__0", "output_1__1"]
    with pytest.raises(TypeError, match="cannot be exported"):
        flatten(3.0)


def test_config_pbtxt_carries_batching_instances_and_tensors():
    spec = TritonModelSpec(
        name="lung_nodule_ct",
        max_batch_size=4,
        max_queue_delay_ms=5.0,
        input=input_spec((1, 96, 96, 96)),
        outputs=(
            TensorSpec("classification_0__0", (3, 24, 24, 24)),
            TensorSpec("box_regression_0__1", (18, 24, 24, 24)),
        ),
        layout={"classification": ["classification_0__0"], "box_regression": ["box_regression_0__1"]},
        runtime="pytorch",
        instance_kind="gpu",
        instance_count=2,
    )
    config = parse_config(render_config(spec))
    assert config.platform == "pytorch_libtorch" and config.max_batch_size == 4
    assert config.dynamic_batching.max_queue_delay_microseconds == 5000
    assert config.instance_group[0].count == 2 and config.instance_group[0].kind == config.instance_group[0].KIND_GPU
    assert [(i.name, list(i.dims)) for i in config.input] == [("image__0", [1, 96, 96, 96])]
    assert [o.name for o in config.output] == ["classification_0__0", "box_regression_0__1"]
    assert config.parameters["INFERENCE_MODE"].string_value == "true"
    python = parse_config(
        render_config(TritonModelSpec(**{**spec.__dict__, "runtime": "python", "instance_kind": "cpu"}))
    )
    assert python.backend == "python" and not python.platform
    assert python.instance_group[0].kind == python.instance_group[0].KIND_CPU


def test_triton_settings_are_checked_and_shared_memory_follows_the_url():
    from inference.backends.triton import use_shared_memory
    from inference.config import load_config

    with pytest.raises(ValueError, match="'triton:'"):
        TritonConfig(url="triton:")
    with pytest.raises(ValueError, match="'sometimes'"):
        TritonConfig(shared_memory="sometimes")
    config = load_config({"backend": "triton", "triton_url": "10.0.0.5:8001"}, environ={"RADSERVE_TRITON_RETRIES": "4"})
    assert (config.backend, config.triton.url, config.triton.retries) == ("triton", "10.0.0.5:8001", 4)
    assert use_shared_memory("auto", "127.0.0.1:8001") and use_shared_memory("auto", "localhost:8001")
    assert use_shared_memory("auto", "[::1]:8001")
    assert not use_shared_memory("auto", "triton.radserve.svc:8001") and not use_shared_memory("off", "127.0.0.1:1")
    assert use_shared_memory("on", "triton:8001")


def test_unreachable_triton_fails_fast_with_unavailable():
    from inference.backends.triton import TritonBackend

    settings = TritonConfig(url=f"127.0.0.1:{free_port()}", retries=1, retry_backoff_s=0.1, connect_timeout_s=1.0)
    backend = TritonBackend("lung_nodule_ct", "1", (1, 8, 8, 8), settings, max_batch_size=2)
    try:
        start = time.monotonic()
        with pytest.raises(BackendUnavailableError, match="unavailable for model lung_nodule_ct:1 after 2 attempt"):
            backend.forward(torch.zeros(1, 1, 8, 8, 8))
        assert time.monotonic() - start < 10
        assert backend.is_ready() is False
        assert BackendUnavailableError.code == "UNAVAILABLE"
    finally:
        backend.close()


def test_model_yaml_backend_overrides_the_server_flag():
    import yaml

    from inference.backends.triton import TritonBackend
    from inference.modelrepo.schema import ModelConfig
    from inference.serving.runners import backend_of, build_runner

    path = MODELS / "chest_xray" / "1" / "model.yaml"
    data = yaml.safe_load(path.read_text())
    on_triton = ModelConfig.from_dict({**data, "backend": "triton"}, version="1", directory=path.parent)
    runner = build_runner(on_triton, torch.device("cpu"), backend="torch", triton=TritonConfig(url="127.0.0.1:1"))
    assert isinstance(runner.backend, TritonBackend) and runner.backend.item_shape == runner.task.item_shape
    runner.backend.close()
    plain = ModelConfig.from_dict(data, version="1", directory=path.parent)
    assert plain.backend is None
    assert (backend_of(plain, "torch"), backend_of(plain, "triton"), backend_of(on_triton, "torch")) == (
        "torch",
        "triton",
        "triton",
    )
    with pytest.raises(ValueError, match="'gpu-cluster'"):
        ModelConfig.from_dict({**data, "backend": "gpu-cluster"}, version="1", directory=path.parent)


def test_export_fails_loudly_when_the_trace_does_not_reproduce_the_network(tmp_path, monkeypatch):
    """A data-dependent branch is frozen by tracing; the check on other inputs must catch it."""
    from inference.modelrepo.schema import ModelConfig
    from inference.triton import export

    class Branchy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if x.shape[0] == 1 else x * 3  # traced with a batch of 1, checked with 2

    class FakeTask:
        item_shape = (1, 8, 8)

    monkeypatch.setattr(export, "_load_network", lambda config, device: (FakeTask(), Branchy()))
    config = ModelConfig.from_yaml(MODELS / "chest_xray" / "1" / "model.yaml")
    with pytest.raises(export.ExportError, match=r"chest_xray:1: exported output 0 differs .* relative error"):
        export._export_version(
            config, tmp_path / "1", device=torch.device("cpu"), check_batch=2, tolerance=1e-4, seed=0
        )


# -- slow: real exports and a real Triton ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """`radserve triton export --runtime python --model NAME`, once per model: name -> (repository, stdout)."""
    done: dict[str, tuple[Path, str]] = {}

    def export(name: str) -> tuple[Path, str]:
        if name not in done:
            out = tmp_path_factory.mktemp(f"triton-{name}")
            result = subprocess.run(
                [sys.executable, "-m", "inference.cli", "triton", "export", "--out", str(out), "--models", str(MODELS),
                 "--model", name, "--runtime", "python"],
                capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr[-3000:]
            done[name] = (out, result.stdout)
        return done[name]

    return export


@pytest.mark.slow
@pytest.mark.parametrize("name", _model_names())
def test_export_of_every_model_matches_the_eager_network(exports, name):
    out, stdout = exports(name)
    errors = [float(e) for e in re.findall(r"max relative error ([0-9.e+-]+)", stdout)]
    assert errors and max(errors) < 1e-4, stdout
    config = parse_config((out / name / "config.pbtxt").read_text())
    assert config.backend == "python" and config.max_batch_size >= 1
    assert config.dynamic_batching.max_queue_delay_microseconds >= 0
    layout = parse_layout(config.parameters["radserve_output_layout"].string_value)
    assert layout_names(layout) == [o.name for o in config.output]
    versions = [p for p in (out / name).iterdir() if p.is_dir()]
    assert versions and all((v / "model.pt").is_file() and (v / "model.py").is_file() for v in versions)


class TritonUnderTest:
    """`radserve triton serve --repository R` in its own process group, so that a kill takes Triton down whole."""

    def __init__(self, repository: Path, log_dir: Path) -> None:
        self.repository = repository
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.log_dir = log_dir
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout_s: float = 240.0) -> None:
        from tritonclient.utils import InferenceServerException

        from inference.backends.triton.client import connect

        self.starts += 1
        log = open(self.log_dir / f"triton-{self.starts}.log", "wb")  # noqa: SIM115 - closed with the process
        cmd = [sys.executable, "-m", "inference.cli", "triton", "serve", "--repository", str(self.repository),
               "--grpc-port", str(self.port), "--http-port", "0", "--metrics-port", "0"]  # fmt: skip
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client = connect(self.url)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                assert self.process.poll() is None, self.log()
                try:
                    if client.is_model_ready(CT_MODEL, client_timeout=2.0):
                        return
                except InferenceServerException:
                    pass
                time.sleep(0.5)
        finally:
            client.close()
        raise TimeoutError(f"Triton not ready in {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        return (self.log_dir / f"triton-{self.starts}.log").read_text(errors="replace")[-4000:]

    def inference_count(self) -> int:
        from inference.backends.triton.client import connect

        client = connect(self.url)
        try:
            stats = client.get_inference_statistics(CT_MODEL, as_json=True, client_timeout=5.0)
        finally:
            client.close()
        return sum(int(m.get("inference_count", 0)) for m in stats.get("model_stats", []))

    def kill(self) -> None:
        """SIGKILL the whole process group (radserve's wrapper, tritonserver, its Python-backend stubs)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
        for path in Path("/dev/shm").glob(f"radserve_triton_{self.port}_*"):
            path.unlink(missing_ok=True)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # the wrapper forwards it to tritonserver
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(20)
        self.kill()


@pytest.fixture(scope="module")
def triton(exports, tmp_path_factory):
    from inference.triton.serve import ensure_environment

    try:
        ensure_environment(create=True)
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"the Triton environment (.venv-triton: nvidia-pytriton, numpy<2, torch) cannot be created: {exc}")
    repository, _ = exports(CT_MODEL)
    server = TritonUnderTest(repository, tmp_path_factory.mktemp("triton-logs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def radserve_on_triton(triton, tmp_path_factory):
    """`radserve serve --backend triton` on a repository holding only the CT model (all Triton serves)."""
    models = tmp_path_factory.mktemp("models-ct")
    (models / CT_MODEL).symlink_to(MODELS / CT_MODEL, target_is_directory=True)
    log_path = tmp_path_factory.mktemp("radserve") / "server.log"
    args = ["--backend", "triton", "--triton-url", triton.url, "--metrics-port", "0", "--model-poll-interval-s", "0"]
    proc = ServerProcess(models=models, device="cpu", log_path=log_path, extra_args=args)
    proc.start(timeout_s=300)
    yield proc
    proc.stop()


def _study(seed: int, shape: tuple[int, int, int]):
    from inference.api.gen.radserve.v1 import reading_pb2 as pb
    from inference.phantoms import make_chest_ct

    phantom = make_chest_ct(
        np.random.default_rng(seed), shape=shape, slice_spacing_mm=2.5, n_nodules=2, nodule_diameters_mm=(12.0, 18.0)
    )
    volume = phantom.volume
    raw = pb.RawArray(dtype="float32", shape=volume.shape, affine=volume.affine.ravel().tolist())
    return volume, volume.voxels.astype(np.float32).tobytes(), raw


def _read(target: str, data: bytes, raw, timeout_s: float = 120.0):
    from inference.api.gen.radserve.v1 import reading_pb2 as pb
    from inference.client import ReadingClient

    client = ReadingClient(target)
    try:
        return client.read([data], payload_kind=pb.RAW, raw=raw, model=CT_MODEL, timeout_s=timeout_s)
    finally:
        client.close()


def _torch_findings(volume) -> list:
    from inference.modelrepo.schema import ModelConfig
    from inference.tasks import task_class
    from inference.tasks.direct import load_network, run_direct

    config = ModelConfig.from_yaml(MODELS / CT_MODEL / "1" / "model.yaml")
    task = task_class(config)(config, torch.device("cpu"))
    return run_direct(task, load_network(task), volume, batch_size=config.batching.max_batch_size)


def _assert_same_findings(triton_findings, torch_findings) -> None:
    assert len(triton_findings) == len(torch_findings), (triton_findings, torch_findings)
    for got, want in zip(
        sorted(triton_findings, key=lambda f: -f.score), sorted(torch_findings, key=lambda f: -f.score), strict=True
    ):
        assert np.linalg.norm(np.subtract(got.center_mm, want.center_mm)) <= 0.5, (got, want)
        assert abs(got.score - want.score) <= 0.01, (got, want)


@pytest.mark.slow
def test_phantom_read_through_triton_matches_the_torch_backend(radserve_on_triton):
    volume, data, raw = _study(11, (160, 160, 64))
    response = _read(radserve_on_triton.target, data, raw)
    assert response.model == CT_MODEL
    expected = _torch_findings(volume)
    assert expected, "the CT model found nothing in the phantom: no comparison"
    _assert_same_findings(list(response.findings), expected)
    log = radserve_on_triton.log_path.read_text()
    assert "inputs go through shared memory" in log, "a loopback Triton must get its inputs through shared memory"


@pytest.mark.slow
def test_triton_killed_mid_read_gives_unavailable_then_recovers_without_restart(radserve_on_triton, triton):
    target = radserve_on_triton.target
    assert health_status(target) == SERVING
    _, data, raw = _study(12, (256, 256, 96))  # 8 patches: two Triton batches of 4
    before = triton.inference_count()
    outcome: dict[str, object] = {}

    def read() -> None:
        start = time.monotonic()
        try:
            outcome["response"] = _read(target, data, raw, timeout_s=180)
        except grpc.RpcError as exc:
            outcome["code"] = exc.code()
        outcome["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=read)
    thread.start()
    deadline = time.monotonic() + 180
    while triton.inference_count() == before and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.1)  # until Triton has run the first batch: the second is in flight or queued
    killed_at = time.monotonic()
    triton.kill()
    thread.join(60)
    assert not thread.is_alive(), "the read hung after Triton died"
    assert outcome.get("code") == grpc.StatusCode.UNAVAILABLE, outcome
    assert time.monotonic() - killed_at < 30

    deadline = time.monotonic() + 15
    while health_status(target) != NOT_SERVING and time.monotonic() < deadline:
        time.sleep(0.2)
    assert health_status(target) == NOT_SERVING, "health must say NOT_SERVING while Triton is down"
    small = _study(13, (160, 160, 64))
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as refused:
        _read(target, small[1], small[2], timeout_s=60)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - start < 30

    triton.start()
    deadline = time.monotonic() + 30
    while health_status(target) != SERVING and time.monotonic() < deadline:
        time.sleep(0.2)
    assert health_status(target) == SERVING, "health must turn SERVING again once Triton is back"
    response = _read(target, small[1], small[2])
    _assert_same_findings(list(response.findings), _torch_findings(small[0]))
    assert radserve_on_triton.process.poll() is None, "radserve must not have restarted"
