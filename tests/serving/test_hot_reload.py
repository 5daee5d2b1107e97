"""Swapping models on a running server: polling, `radserve models load/unload`, no lost read.

One real server per module over a copy of models/lung_nodule_ct/1 (32^3 patches, so a read takes about a
second on a CPU), polling every 0.5 s. The tests run in order and each leaves version "1" alone serving.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import yaml

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.cli import main as cli_main
from inference.client import ReadingClient
from inference.modelrepo.schema import ModelConfig
from inference.phantoms import make_chest_ct
from inference.serverproc import ServerProcess
from inference.tasks.detection import DetectionTask

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hot-reload-operator-token"  # model management is an operator's act (a tenant with role: operator)
LUNG = ROOT / "models" / "lung_nodule_ct" / "1"
NAME = "lung_nodule_ct"


def write_lung_copy(directory: Path) -> None:
    """models/lung_nodule_ct/1 with 32^3 patches; its weights when committed, else random ones."""
    data = yaml.safe_load((LUNG / "model.yaml").read_text())
    data["inferer"]["roi_size"] = [32, 32, 32]
    directory.mkdir(parents=True)
    (directory / "model.yaml").write_text(yaml.safe_dump(data))
    if (LUNG / "model.pt").is_file():
        shutil.copy(LUNG / "model.pt", directory / "model.pt")
    else:
        torch.manual_seed(0)
        config = ModelConfig.from_dict(data, version=directory.name)
        torch.save(DetectionTask(config, torch.device("cpu")).build_network().state_dict(), directory / "model.pt")


def perturbed(weights: Path, out: Path, seed: int) -> None:
    state = torch.load(weights, weights_only=True)
    generator = torch.Generator().manual_seed(seed)
    for tensor in state.values():
        if tensor.is_floating_point():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 1e-3)
    torch.save(state, out)


def publish(staging: Path, target: Path) -> None:
    """Make a version appear atomically: build it elsewhere, then rename it into the repository."""
    os.replace(staging, target)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    write_lung_copy(root / NAME / "1")
    return root


@pytest.fixture(scope="module")
def staging(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("staging")


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    tokens = log_path.parent / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"ops": {"token": TOKEN, "role": "operator"}}))
    proc = ServerProcess(
        models=repo, log_path=log_path, extra_args=["--model-poll-interval-s", "0.5", "--auth-tokens", str(tokens)]
    )
    proc.env["RADSERVE_METRICS_PORT"] = "0"
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def study():
    phantom = make_chest_ct(np.random.default_rng(5), shape=(32, 32, 16), pixel_spacing_mm=1.5, slice_spacing_mm=2.5)
    volume = phantom.volume
    raw = pb.RawArray(dtype="float32", shape=volume.shape, affine=volume.affine.ravel().tolist())
    return volume.voxels.astype(np.float32).tobytes(), raw


def versions(client: ReadingClient) -> dict[str, pb.ModelVersion]:
    models = {m.name: m for m in client.list_models().models}
    return {v.version: v for v in models[NAME].versions if v.state != "UNLOADING"} if NAME in models else {}


def wait_for(predicate, timeout_s: float = 90.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class ReadStream:
    """Reads without a model or version, back to back from ``threads`` threads; records every outcome."""

    def __init__(self, target: str, study, threads: int = 2) -> None:
        self.target, self.study = target, study
        self.results: list[tuple[float, float, str]] = []  # (start, end, model_version)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        client = ReadingClient(self.target, token=TOKEN)
        data, raw = self.study
        try:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    response = client.read([data], payload_kind=pb.RAW, raw=raw, timeout_s=120)
                except grpc.RpcError as exc:
                    self.errors.append(f"{exc.code().name}: {exc.details()}")
                    continue
                self.results.append((start, time.monotonic(), response.model_version))
        finally:
            client.close()

    def __enter__(self) -> ReadStream:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(180)

    def started_after(self, t: float) -> list[str]:
        return [version for start, _, version in list(self.results) if start > t]

    def wait_reads(self, t: float, n: int, version: str) -> None:
        wait_for(lambda: self.started_after(t).count(version) >= n, what=f"{n} reads on version {version}")


def test_version_swap_under_a_stream_of_reads_loses_no_read(server, repo, staging, study, capsys):
    client = ReadingClient(server.target, token=TOKEN)
    try:
        with ReadStream(server.target, study) as stream:
            stream.wait_reads(0, 2, "1")
            shutil.copytree(repo / NAME / "1", staging / "2")
            perturbed(staging / "2" / "model.pt", staging / "2" / "model.pt", seed=2)
            publish(staging / "2", repo / NAME / "2")
            wait_for(lambda: versions(client).get("2", pb.ModelVersion()).state == "READY", what="version 2 READY")
            ready_at = time.monotonic()
            stream.wait_reads(ready_at, 3, "2")
            assert set(stream.started_after(ready_at)) == {"2"}, "a read without a version got an older one"

            assert client.unload_model(NAME, "2").unloaded == [f"{NAME}:2"]
            unloaded_at = time.monotonic()
            stream.wait_reads(unloaded_at, 3, "1")
            assert set(stream.started_after(unloaded_at)) == {"1"}
            time.sleep(1.5)  # a few polls: the unload is sticky although models/lung_nodule_ct/2 is still there
            assert "2" not in versions(client)

            # `radserve models load DIR` brings it back; unload it again with the CLI.
            assert (
                cli_main(["models", "load", str(repo / NAME / "2"), "--server", server.target, "--token", TOKEN]) == 0
            )
            loaded_at = time.monotonic()
            stream.wait_reads(loaded_at, 2, "2")
            assert cli_main(["models", "unload", f"{NAME}:2", "--server", server.target, "--token", TOKEN]) == 0
            stream.wait_reads(time.monotonic(), 2, "1")
        assert stream.errors == [], stream.errors
        assert len(stream.results) >= 10
        listed = versions(client)
        assert list(listed) == ["1"] and listed["1"].state_code == pb.VERSION_STATE_READY
    finally:
        client.close()
    out = capsys.readouterr().out
    assert f"unloaded {NAME}:2" in out


def test_broken_versions_are_failed_with_the_reason_and_the_working_version_keeps_serving(server, repo, staging, study):
    client = ReadingClient(server.target, token=TOKEN)
    try:
        for version in ("3", "4", "5"):
            shutil.copytree(repo / NAME / "1", staging / version)
        (staging / "3" / "model.yaml").write_text("name: lung_nodule_ct\ntask: [detection\n")
        (staging / "4" / "model.pt").unlink()
        state = torch.load(staging / "5" / "model.pt", weights_only=True)
        first = next(iter(state))
        state[first] = torch.zeros(3, *state[first].shape[1:])
        torch.save(state, staging / "5" / "model.pt")
        with ReadStream(server.target, study, threads=1) as stream:
            for version in ("3", "4", "5"):
                publish(staging / version, repo / NAME / version)
            listed = wait_for(
                lambda: (v := versions(client))
                and all(v.get(x, pb.ModelVersion()).state == "FAILED" for x in "345")
                and v,
                what="versions 3, 4 and 5 FAILED",
            )
            started = time.monotonic()
            stream.wait_reads(started, 2, "1")
        assert stream.errors == [] and set(stream.started_after(started)) == {"1"}
        assert listed["3"].reason.startswith("ParserError: while parsing a flow sequence")
        assert listed["4"].reason == "ValueError: weights file 'model.pt' is missing"
        assert "size mismatch" in listed["5"].reason and listed["5"].state_code == pb.VERSION_STATE_FAILED
        assert listed["1"].state == "READY" and listed["1"].reason == ""
        with pytest.raises(grpc.RpcError) as info:
            client.read([study[0]], payload_kind=pb.RAW, raw=study[1], model=NAME, model_version="5", timeout_s=60)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "failed to load" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            client.load_model(str(repo / NAME / "4"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "weights file" in info.value.details()

        for version in ("3", "4", "5"):  # removed from the repository: gone from the listing
            shutil.rmtree(repo / NAME / version)
        wait_for(lambda: list(versions(client)) == ["1"], what="versions 3-5 gone")
    finally:
        client.close()


def test_weights_replaced_in_place_are_reloaded_while_reads_continue(server, repo, staging, study):
    client = ReadingClient(server.target, token=TOKEN)
    weights = repo / NAME / "1" / "model.pt"
    original = staging / "original.pt"
    shutil.copy(weights, original)
    old_sha = versions(client)["1"].weights_sha256
    try:
        with ReadStream(server.target, study, threads=1) as stream:
            perturbed(weights, staging / "new.pt", seed=7)
            os.replace(staging / "new.pt", weights)
            new = wait_for(
                lambda: (v := versions(client)["1"]).weights_sha256 not in ("", old_sha) and v, what="a reload"
            )
            assert new.state == "READY" and new.reason == ""
            stream.wait_reads(time.monotonic(), 2, "1")

            # A broken replacement (here: written in place, half a file) never takes the version down.
            data = original.read_bytes()
            weights.write_bytes(data[: len(data) // 2])
            broken = wait_for(
                lambda: (v := versions(client)["1"]).reason.startswith("reload failed") and v, what="the failed reload"
            )
            assert broken.state == "READY" and broken.weights_sha256 == new.weights_sha256
            stream.wait_reads(time.monotonic(), 2, "1")

            shutil.copy(original, weights)
            wait_for(lambda: versions(client)["1"].weights_sha256 == old_sha, what="the original weights back")
        assert stream.errors == [], stream.errors
        assert versions(client)["1"].reason == ""
    finally:
        client.close()
