"""The fuzzer's seed corpus and every crash it found replay cleanly; a bounded atheris run finds nothing new.

The bounded run is the CI run of README "Fuzzing": ``RADSERVE_FUZZ_SECONDS`` (default 90) of coverage-guided
fuzzing from the committed corpus, on a copy of it. A crash fails the test and names the input libFuzzer wrote; fix
the code, then add the input to fuzz/crashes/ so that it replays here for good.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from fuzz.targets import one_input

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "fuzz" / "corpus"
CRASHES = ROOT / "fuzz" / "crashes"
SECONDS = int(os.environ.get("RADSERVE_FUZZ_SECONDS", "90"))


def cases() -> list[Path]:
    return sorted(CORPUS.iterdir()) + sorted(p for p in CRASHES.iterdir() if not p.name.startswith("."))


MAX_CASE_S = 10.0  # what the CI run allows an input (-timeout=10)
MAX_CASE_BYTES = 256 * 1024**2  # Python allocations of one input, far under the run's -rss_limit_mb


@pytest.mark.parametrize("case", cases(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_seed_and_past_crash_ends_in_a_value_or_a_radserve_error(case):
    tracemalloc.start()
    start = time.perf_counter()
    try:
        one_input(case.read_bytes())  # any other exception fails the test
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < MAX_CASE_S and peak < MAX_CASE_BYTES, f"{elapsed:.1f} s, {peak / 1e6:.0f} MB"


@pytest.mark.slow
def test_a_bounded_fuzz_run_finds_no_crash(tmp_path):
    pytest.importorskip("atheris")
    work = tmp_path / "corpus"
    shutil.copytree(CORPUS, work)
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "fuzz" / "fuzz_decode.py"),
            str(work),
            f"-max_total_time={SECONDS}",
            "-timeout=10",
            "-rss_limit_mb=3072",
            f"-artifact_prefix={tmp_path}/",
            "-print_final_stats=1",
        ],
        capture_output=True,
        text=True,
        timeout=SECONDS + 120,
        cwd=ROOT,
    )
    found = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
    assert done.returncode == 0 and not found, f"fuzzer found {found}:\n{done.stderr[-4000:]}"
    runs = [line for line in done.stderr.splitlines() if line.startswith("stat::number_of_executed_units")]
    assert runs and int(runs[-1].split(":")[-1]) > 1000, done.stderr[-2000:]
