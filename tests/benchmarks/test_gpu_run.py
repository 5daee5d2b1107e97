"""What can be checked on the CPU of the GPU run (benchmarks/gpu_run.sh): the cuda tests collect on the GPU image
with the carried wheels and nothing else of requirements.txt; the benchmark leaves its results when a part fails
and when SIGTERM ends it, with its server stopped; the summary fails a run where CUDA was present and no cuda test
ran. The whole script is rehearsed on a copy of the GPU image by benchmarks/rehearse_gpu_image.sh.
"""

from __future__ import annotations

import importlib.metadata
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from benchmarks import gpu_summary
from benchmarks import run as bench_run

ROOT = Path(__file__).resolve().parents[2]


def _names(path: Path) -> set[str]:
    """Canonical distribution names of a requirements-style file."""
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {canonicalize_name(Requirement(line).name) for line in lines if line}


def _with_dependencies(names: set[str]) -> set[str]:
    """``names`` and every distribution they require, as installed here (extras left out)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = [Requirement(text) for text in importlib.metadata.requires(name) or []]
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [canonicalize_name(r.name) for r in requires if r.marker is None or r.marker.evaluate({"extra": ""})]
    return seen


def absent_on_the_gpu_machine() -> list[str]:
    """Top-level modules of the distributions installed here that neither the GPU image nor the wheels provide,
    their dependencies included: what requirements.txt brings, directly or not (pydantic comes with
    fhir.resources), and the image lacks."""
    provided = _with_dependencies(
        _names(ROOT / "benchmarks" / "gpu_image.txt") | _names(ROOT / "benchmarks" / "gpu_wheels.txt") | {"radserve"}
    )
    installed = {canonicalize_name(d.metadata["Name"]) for d in importlib.metadata.distributions()}
    absent = installed - provided - {"pip", "setuptools", "wheel"}
    modules = []
    for module, dists in importlib.metadata.packages_distributions().items():
        if {canonicalize_name(d) for d in dists} <= absent and not module.startswith("_"):
            modules.append(module)
    return sorted(modules)


HIDE = """
import importlib.abc, sys
HIDDEN = set(sys.argv[1].split(","))
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden: not on the GPU machine)", name=name)
        return None
sys.meta_path.insert(0, Hide())
import pytest
sys.exit(pytest.main(sys.argv[2:]))
"""


def test_the_cuda_tests_collect_with_what_the_gpu_machine_has():
    hidden = absent_on_the_gpu_machine()
    # what the run must do without, directly required or not
    assert {"kubernetes_validate", "tritonclient", "pydantic"} <= set(hidden), hidden
    args = ["-m", "cuda", "--collect-only", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "tests"]
    result = subprocess.run(
        [sys.executable, "-c", HIDE, ",".join(hidden), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    collected = [line for line in result.stdout.splitlines() if "::" in line]
    modules = {line.split("::")[0] for line in collected}
    assert {"tests/benchmarks/test_gpu_pipeline.py", "tests/benchmarks/test_gpu_oom.py"} <= modules, modules
    assert len(collected) >= 14, collected


@pytest.mark.server
def test_a_failing_part_is_recorded_and_the_run_goes_on(model_repo, tmp_path, monkeypatch):
    def direct_fails(*args, **kwargs):
        raise RuntimeError("injected failure of the direct baseline")

    monkeypatch.setattr(bench_run, "run_direct_baseline", direct_fails)
    out = tmp_path / "out"
    args = ["--profile", "tiny", "--only", "dx-256", "--no-ingest", "--no-naive", "--device", "cpu"]
    args += ["--models", str(model_repo("chest_xray")), "--out", str(out), "--cache", str(tmp_path / "cache")]
    assert bench_run.main(args) == 1
    report = json.loads((out / "tiny.json").read_text())
    entry = report["workloads"]["dx-256"]
    assert entry["errors"] == [{"part": "direct", "error": "RuntimeError: injected failure of the direct baseline"}]
    assert [row["concurrency"] for row in entry["service"]] == [1, 8]  # the service rows still ran
    assert all(row["reads_ok"] >= 8 and row["errors"] == {} for row in entry["service"])
    assert "error: dx-256 direct failed: RuntimeError: injected" in (out / "tiny.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["server.log", "tiny.json", "tiny.md"]  # no cache, no partials


@pytest.mark.server
def test_sigterm_leaves_the_rows_measured_and_stops_the_server(model_repo, tmp_path):
    out = tmp_path / "out"
    args = ["--profile", "tiny", "--only", "dx-256", "--no-ingest", "--no-naive", "--device", "cpu"]
    args += ["--models", str(model_repo("chest_xray")), "--out", str(out), "--cache", str(tmp_path / "cache")]
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.run", *args], cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        report: dict = {}
        while time.monotonic() < deadline and not report.get("workloads", {}).get("dx-256", {}).get("service"):
            time.sleep(0.2)
            if (out / "tiny.json").is_file():
                report = json.loads((out / "tiny.json").read_text())
        assert report["workloads"]["dx-256"]["service"], "no row was written"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 1
    finally:
        process.kill()
    report = json.loads((out / "tiny.json").read_text())
    assert "run stopped early: RunInterruptedError: signal SIGTERM" in report["notes"]
    assert report["workloads"]["dx-256"]["service"][0]["reads_ok"] >= 8
    assert not Path(f"/proc/{report['server']['pid']}").exists(), "the benchmark's server outlived it"


def _junit(path: Path, passed: int, skipped: int, failed: int = 0) -> Path:
    cases = [f"<testcase classname='t' name='p{i}'/>" for i in range(passed)]
    cases += [f"<testcase classname='t' name='s{i}'><skipped message='no GPU'/></testcase>" for i in range(skipped)]
    cases += [f"<testcase classname='t' name='f{i}'><failure message='x'/></testcase>" for i in range(failed)]
    suite = f"<testsuite errors='0' tests='{len(cases)}'>{''.join(cases)}</testsuite>"
    path.write_text(f"<testsuites>{suite}</testsuites>")
    return path


@pytest.mark.parametrize(
    ("cuda", "passed", "skipped", "failed", "status"),
    [(1, 0, 15, 0, 3), (1, 14, 1, 0, 0), (1, 14, 0, 1, 1), (0, 0, 15, 0, 0)],
)
def test_the_summary_fails_a_gpu_run_where_no_cuda_test_ran(tmp_path, cuda, passed, skipped, failed, status):
    junit = _junit(tmp_path / "junit.xml", passed, skipped, failed)
    args = ["--out", str(tmp_path), "--profile", "gpu", "--junit", str(junit), "--compile", str(tmp_path / "x.json")]
    code = gpu_summary.main([*args, "--cuda", str(cuda)])
    assert code == status
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["cuda_tests"]["passed"] == passed and report["verdict"]["exit_status"] == status


def test_the_summary_fails_when_the_tests_left_no_report(tmp_path):
    args = ["--out", str(tmp_path), "--profile", "gpu", "--junit", str(tmp_path / "missing.xml")]
    assert gpu_summary.main([*args, "--compile", str(tmp_path / "none.json"), "--cuda", "1"]) == 3
    assert "no cuda test ran (no JUnit report" in (tmp_path / "gpu.md").read_text()


def test_the_summary_folds_in_the_progressive_rows(tmp_path):
    """benchmarks/progressive.py's JSON (left outside $OUT) becomes lines of the summary and a key of its report."""
    row = {"payload_mb": 157.0, "after_last_byte_s": 0.5, "total_s": 16.2, "timing_ms": {}, "findings": []}
    rows = {
        "ct:512x512x300": [
            {"mode": "full", "rate_mb_s": None, **row, "after_last_byte_s": 3.0},
            {"mode": "progressive", "rate_mb_s": 10.0, **row, "ratio_vs_full": 0.5 / 3.0, "same_findings": True},
        ]
    }
    (tmp_path / "progressive.json").write_text(json.dumps(rows))
    out = tmp_path / "out"
    out.mkdir()
    args = ["--out", str(out), "--profile", "gpu", "--junit", str(_junit(tmp_path / "j.xml", 1, 0))]
    args += [
        "--compile",
        str(tmp_path / "none.json"),
        "--cuda",
        "1",
        "--progressive",
        str(tmp_path / "progressive.json"),
    ]
    assert gpu_summary.main(args) == 0
    assert json.loads((out / "gpu.json").read_text())["progressive"] == rows
    text = (out / "gpu.md").read_text()
    assert "ct:512x512x300 157 MB progressive    10 MB/s: after last byte 0.50 s" in text and "ratio 0.17" in text
