"""Shadow versions, the promotion guard and rollback, end to end (issue #16 items 3 and 4).

One real server per module on a copy of models/lung_nodule_ct/1 (96 x 96 x 40 CT phantoms with two planted nodules
each, under a second a read on a CPU), with an operator token, metrics, and a guard configured for the test: 4 shadow
reads at least, agreement floor 0.9, and an evaluation dataset of 2 labelled CT phantoms. Versions 2 (the weights
degraded by a seeded transform) and 3 (an identical copy) are loaded as `promote: manual` candidates. The tests run in
order, each building on the state the previous one left.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import yaml

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.cli import main as cli_main
from inference.client import ReadingClient
from inference.phantoms import make_chest_ct
from inference.phantoms.dataset import make_dataset
from inference.serverproc import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
NAME = "lung_nodule_ct"
TOKEN = "shadow-operator-token"
MIN_READS = 4
STUDY_SEEDS = (0, 1, 2, 3)  # the live reads each shadow phase compares: two nodules (12 and 9 mm) each


def degrade(weights: Path, out: Path, seed: int = 16, scale: float = 0.8) -> None:
    """The degraded copy: each learned tensor (not the normalisation statistics) plus Gaussian noise of ``scale`` times
    its own standard deviation, seeded."""
    state = torch.load(weights, weights_only=True)
    generator = torch.Generator().manual_seed(seed)
    for key, tensor in state.items():
        if tensor.is_floating_point() and tensor.numel() > 1 and not key.endswith(("running_mean", "running_var")):
            tensor.add_(torch.randn(tensor.shape, generator=generator) * tensor.std() * scale)
    torch.save(state, out)


def write_version(repo: Path, version: str, *, degraded: bool) -> Path:
    """models/lung_nodule_ct/1 as version ``version`` with ``promote: manual``."""
    source, target = repo / NAME / "1", repo / NAME / version
    target.mkdir()
    data = yaml.safe_load((source / "model.yaml").read_text())
    data["promote"] = "manual"
    (target / "model.yaml").write_text(yaml.safe_dump(data))
    if degraded:
        degrade(source / "model.pt", target / "model.pt")
    else:
        shutil.copy(source / "model.pt", target / "model.pt")
    return target


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(ROOT / "models" / NAME / "1", root / NAME / "1")
    return root


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    work = tmp_path_factory.mktemp("server")
    tokens = work / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"ops": {"token": TOKEN, "role": "operator"}}))
    dataset = work / "eval_ct"
    make_dataset(dataset, "CT", 2, seed=7, shape=(96, 96, 40))
    config = work / "server.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "promotion_min_shadow_reads": MIN_READS,
                "promotion_min_agreement": 0.9,
                "promotion_eval_datasets": {NAME: str(dataset)},
                "shadow_max_pending": 8,
            }
        )
    )
    proc = ServerProcess(
        models=repo,
        log_path=work / "server.log",
        metrics_port=free_port(),
        extra_args=["--model-poll-interval-s", "0", "--auth-tokens", str(tokens), "--config", str(config)],
    )
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    client = ReadingClient(server.target, token=TOKEN)
    yield client
    client.close()


@pytest.fixture(scope="module")
def studies():
    """RAW payloads of CT phantoms and their planted nodule centers (LPS mm)."""
    out = []
    for seed in STUDY_SEEDS:
        phantom = make_chest_ct(
            np.random.default_rng(seed),
            shape=(96, 96, 40),
            pixel_spacing_mm=1.5,
            slice_spacing_mm=2.5,
            nodule_diameters_mm=[12.0, 9.0],
        )
        volume = phantom.volume
        raw = pb.RawArray(dtype="float32", shape=volume.shape, affine=volume.affine.ravel().tolist())
        out.append((volume.voxels.astype(np.float32).tobytes(), raw, [lesion.center_mm for lesion in phantom.lesions]))
    return out


def read(client: ReadingClient, study, version: str = "") -> pb.ReadResponse:
    data, raw, _ = study
    model = NAME if version else ""
    return client.read(
        [data], payload_kind=pb.RAW, raw=raw, modality="CT", model=model, model_version=version, timeout_s=120
    )


def versions(client: ReadingClient) -> dict[str, pb.ModelVersion]:
    model = next(m for m in client.list_models().models if m.name == NAME)
    return {v.version: v for v in model.versions if v.state != "UNLOADING"}


def wait_compared(client: ReadingClient, version: str, n: int, timeout_s: float = 120.0) -> pb.ShadowAgreement:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        shadow = versions(client)[version].shadow
        if shadow.reads_compared + shadow.reads_failed + shadow.reads_skipped >= n:
            return shadow
        time.sleep(0.2)
    raise AssertionError(f"{NAME}:{version}: fewer than {n} shadow reads done within {timeout_s} s")


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli_main(["models", *args, "--token", TOKEN])
    out, err = capsys.readouterr()
    return code, out, err


def metrics(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        return response.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            return float(match.group(2))
    raise AssertionError(f"no {name}{{{wanted}}} in /metrics")


def findings_key(response: pb.ReadResponse) -> list[tuple]:
    return [(f.label, round(f.score, 4), tuple(round(v, 2) for v in f.center_mm)) for f in response.findings]


def test_manual_version_stays_out_of_default_routing(server, client, repo, studies, capsys):
    baseline = read(client, studies[0])
    assert baseline.model_version == "1" and len(baseline.findings) == 2  # the live version finds both nodules
    code, _, err = cli(capsys, "load", str(write_version(repo, "2", degraded=True)), "--server", server.target)
    assert code == 0, err
    state = versions(client)
    assert state["2"].state == "READY" and state["2"].promotion == "candidate"
    assert state["1"].promotion == "auto"
    listing = {m.name: m for m in client.list_models().models}[NAME]
    assert listing.default_version == "1"
    assert read(client, studies[0]).model_version == "1"  # a read naming no version
    assert read(client, studies[0], "2").model_version == "2"  # a read naming the candidate
    # Only an operator shadows, promotes and rolls back.
    tenant = ReadingClient(server.target)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            tenant.promote_model(NAME, "2")
    finally:
        tenant.close()
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_degraded_copy_shows_low_agreement_and_promote_refuses(server, client, studies, capsys):
    code, out, err = cli(capsys, "shadow", f"{NAME}:2", "--fraction", "1", "--server", server.target)
    assert code == 0, err
    answers = [read(client, study) for study in studies]
    assert {a.model_version for a in answers} == {"1"}  # shadow findings are never returned
    for answer, (_, _, centers) in zip(answers, studies, strict=True):
        found = sorted(tuple(f.center_mm) for f in answer.findings)
        assert len(found) == len(centers)
        for center in centers:  # the live answers still find the planted nodules
            assert min(np.linalg.norm(np.subtract(f, center)) for f in found) < 6.0
    shadow = wait_compared(client, "2", len(studies))
    assert shadow.reads_compared == len(studies) and shadow.fraction == 1.0
    assert shadow.live_findings == 2 * len(studies)
    assert min(shadow.live_found_share, shadow.shadow_found_share) < 0.5

    code, out, _ = cli(capsys, "list", "--format", "json", "--server", server.target)
    assert code == 0
    listed = {v["version"]: v for v in json.loads(out)["models"][0]["versions"]}
    assert listed["2"]["shadow"]["reads_compared"] == len(studies)
    assert listed["2"]["shadow"]["live_found_share"] == round(shadow.live_found_share, 4)
    assert "shadow" not in listed["1"]
    text = metrics(server)
    assert metric(text, "radserve_shadow_reads_total", model=NAME, version="2", outcome="compared") == len(studies)
    live_found = metric(text, "radserve_shadow_agreement", model=NAME, version="2", share="live_found")
    assert live_found == pytest.approx(shadow.live_found_share)

    code, _, err = cli(capsys, "promote", f"{NAME}:2", "--server", server.target)
    assert code == 1
    assert "FAILED_PRECONDITION" in err and "below the floor 0.9" in err
    assert "evaluation on" in err  # the labelled dataset shows the regression too
    assert versions(client)["2"].promotion == "candidate"
    assert read(client, studies[0]).model_version == "1"


def test_identical_copy_shows_full_agreement_and_is_promoted(server, client, repo, studies, capsys):
    code, _, err = cli(capsys, "load", str(write_version(repo, "3", degraded=False)), "--server", server.target)
    assert code == 0, err
    code, _, err = cli(capsys, "promote", f"{NAME}:3", "--server", server.target)
    assert code == 1 and f"needs at least {MIN_READS} compared reads" in err  # no shadow yet, no promotion
    assert cli(capsys, "shadow", f"{NAME}:3", "--server", server.target)[0] == 0  # replaces version 2 as shadow
    assert not versions(client)["2"].HasField("shadow")
    for study in studies:
        read(client, study)
    shadow = wait_compared(client, "3", len(studies))
    assert shadow.reads_compared == len(studies) and shadow.matched == 2 * len(studies)
    assert shadow.live_found_share == 1.0 and shadow.shadow_found_share == 1.0
    assert shadow.mean_center_shift_mm < 0.5

    code, out, err = cli(capsys, "promote", f"{NAME}:3", "--server", server.target)
    assert code == 0, err
    assert "was lung_nodule_ct:1" in out
    state = versions(client)
    assert state["3"].promotion == "promoted" and not state["3"].HasField("shadow")
    assert read(client, studies[1]).model_version == "3"


class ReadStream:
    """Reads naming no version, back to back from two threads, until stopped; every outcome kept."""

    def __init__(self, target: str, study) -> None:
        self.target, self.study = target, study
        self.versions: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(2)]

    def _run(self) -> None:
        client = ReadingClient(self.target, token=TOKEN)
        try:
            while not self._stop.is_set():
                try:
                    self.versions.append(read(client, self.study).model_version)
                except grpc.RpcError as exc:
                    self.errors.append(f"{exc.code().name}: {exc.details()}")
        finally:
            client.close()

    def __enter__(self) -> ReadStream:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)


def test_rollback_is_one_command_and_loses_no_read(server, client, studies, capsys):
    with ReadStream(server.target, studies[2]) as stream:
        while len(stream.versions) < 2:
            time.sleep(0.05)
        code, out, err = cli(capsys, "rollback", NAME, "--server", server.target)
        assert code == 0, err
        assert "rolled back lung_nodule_ct:3" in out and "lung_nodule_ct:1 has default routing" in out
        seen = len(stream.versions)
        while len(stream.versions) < seen + 2:
            time.sleep(0.05)
    assert stream.errors == []
    assert stream.versions[0] == "3" and stream.versions[-1] == "1"
    state = versions(client)
    assert state["3"].state == "READY" and state["3"].promotion == "demoted"
    assert read(client, studies[0], "3").model_version == "3"  # still loaded for reads naming it


def test_force_overrides_the_guard_and_is_audited(server, client, studies, capsys):
    code, _, err = cli(capsys, "promote", f"{NAME}:2", "--force", "--server", server.target)
    assert code == 0, err
    assert "forced past the guard" in err
    assert read(client, studies[0]).model_version == "2"
    log = server.log_path.read_text()
    assert re.search(r"radserve\.audit .*promote lung_nodule_ct:2 tenant=ops .*outcome=forced", log)
    assert re.search(r"radserve\.audit .*promote lung_nodule_ct:2 tenant=ops .*outcome=refused", log)
    assert cli(capsys, "rollback", NAME, "--server", server.target)[0] == 0
    assert read(client, studies[0]).model_version == "1"
