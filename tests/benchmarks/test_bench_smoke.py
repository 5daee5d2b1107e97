"""The benchmark harness end to end, in its tiny profile: the load generator against a real server, the ingest and
memory runs, and the direct and naive baselines, then the report's structure and that every read succeeded.

The server runs the real networks of models/lung_nodule_ct, models/chest_xray and models/brain_lesion_mr with seeded
untrained weights:
the harness is under test here, not the models (their throughput does not depend on the weights' values).
Targets are figures in the report (PASS / MISS), never asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inference.modelrepo.schema import ModelConfig
from inference.tasks import task_class

pytestmark = pytest.mark.server  # every test here starts a server (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[2]


def untrained_repository(dst: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        source = ROOT / "models" / name / "1" / "model.yaml"
        if not source.is_file():
            continue
        version = dst / name / "1"
        version.mkdir(parents=True)
        (version / "model.yaml").write_text(source.read_text())
        config = ModelConfig.from_yaml(version / "model.yaml")
        torch.manual_seed(0)
        torch.save(task_class(config)(config, torch.device("cpu")).build_network().state_dict(), version / "model.pt")
    return dst


def bench(*args: str, timeout_s: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--device", "cpu", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    models = untrained_repository(
        tmp_path_factory.mktemp("models"), ("lung_nodule_ct", "chest_xray", "brain_lesion_mr")
    )
    out = tmp_path_factory.mktemp("bench")
    cache = tmp_path_factory.mktemp("cache")
    result = bench("--profile", "tiny", "--models", str(models), "--out", str(out), "--cache", str(cache))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, json.loads((out / "tiny.json").read_text()), models, out


def test_tiny_run_reports_every_path_and_every_read_succeeded(tiny_run):
    _, report, models, out = tiny_run
    assert {"profile", "date", "commit", "device", "machine", "load_avg_before", "load_avg_after"} <= set(report)
    workloads = report["workloads"]
    expected = {"ct"} | ({"dx-256"} if (models / "chest_xray").is_dir() else set())
    expected |= {"mr"} if (models / "brain_lesion_mr").is_dir() else set()
    assert set(workloads) == expected
    assert sorted(p.name for p in out.iterdir()) == ["server.log", "tiny.json", "tiny.md"]  # the cache lives elsewhere
    for name, entry in workloads.items():
        assert entry["input"] and entry["images_per_study"] >= 1, name
        concurrencies = [row["concurrency"] for row in entry["service"]]
        assert len(concurrencies) == 2 and concurrencies[0] == 1, name
        for row in entry["service"]:
            assert row["errors"] == {}, (name, row)
            assert row["reads_ok"] >= 2 and row["studies_per_s"] > 0 and row["images_per_s"] > 0
            assert row["latency_ms"]["p50"] <= row["latency_ms"]["p95"] <= row["latency_ms"]["p99"]
            assert {"receive", "decode", "preprocess", "infer", "postprocess", "total"} <= set(row["stages_ms"])
            memory = row["server_memory"]
            assert memory["rss_peak_mb"] >= memory["rss_idle_mb"] > 0
        for baseline in ("direct", "naive") if name != "mr" else ("direct",):  # segmentation has no naive baseline
            assert entry[baseline]["studies"] >= 1 and entry[baseline]["studies_per_s"] > 0, (name, baseline)
        assert "errors" not in entry, entry.get("errors")
        # The direct baseline's pooled batches find what run_direct finds.
        assert entry["direct"]["max_center_diff_vs_run_direct_mm"] < 1e-3
    paths = report["ingest"]["paths"]
    assert {"stream-4MiB", "shm", "file"} <= set(paths)
    assert all(p["gb_per_s"] > 0 for p in paths.values())
    assert [m["concurrency"] for m in report["memory"]] == [2]
    assert all(m["errors"] == {} and m["peak_per_in_flight_over_raw"] >= 0 for m in report["memory"])


def test_tiny_run_prints_the_contract_lines(tiny_run):
    result, report, models, _ = tiny_run
    lines = result.stdout.splitlines()
    ratio = [line for line in lines if line.startswith("service/direct: ")]
    assert len(ratio) == 1 and float(ratio[0].split(": ")[1]) > 0
    assert report["summary"]["service_over_direct"]["ratio"] == pytest.approx(float(ratio[0].split(": ")[1]), abs=0.01)
    batching = [line for line in lines if line.startswith("batching x8/x1 (chest_xray): ")]
    assert len(batching) == 1
    if (models / "chest_xray").is_dir():
        assert float(batching[0].split(": ")[1]) > 0


def test_a_missing_model_skips_its_rows_with_a_note(tmp_path):
    xray_yaml = ROOT / "models" / "chest_xray" / "1" / "model.yaml"
    if not xray_yaml.is_file():
        pytest.skip("no chest_xray model.yaml in the repository")
    models = untrained_repository(tmp_path / "models", ("lung_nodule_ct",))
    (models / "chest_xray" / "1").mkdir(parents=True)
    (models / "chest_xray" / "1" / "model.yaml").write_text(xray_yaml.read_text())  # no weights: cannot load
    out = tmp_path / "out"
    result = bench("--profile", "tiny", "--models", str(models), "--out", str(out), "--only", "dx-256", "--no-ingest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batching x8/x1 (chest_xray): skipped" in result.stdout
    assert "model chest_xray cannot load" in result.stdout
