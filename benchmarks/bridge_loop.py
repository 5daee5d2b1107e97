"""The archive in the loop, measured: Orthanc (DICOMweb) -> `radserve bridge` -> radserve -> STOW-RS into Orthanc.

Two measurements, each with a fresh Orthanc, a fresh journal and the real server (lung_nodule_ct only, on the CPU):

* ``throughput``: ``--studies`` chest CTs stored into Orthanc first, then the bridge started with ``--concurrency``;
  studies per hour from the bridge's start to the last study stored (a backlog drained through the whole loop:
  QIDO-RS, WADO-RS metadata and retrieval, ReadStreamed with SR and SEG, the QIDO-RS look and STOW-RS).
* ``stat``: the time from "stable" to "results stored" (the journal's ``stable_at`` to ``stored_at``) of one STAT
  study (StudyDescription "CT HEAD CODE STROKE", a priority rule) arriving alone, and arriving once ``--behind``
  routine studies, in the archive before it, are queued; with the rule removed as well, to show what the priority
  buys.

Every study is the same phantom written again with new UIDs (so each is a new study with new outputs); the input
size is printed. `python -m benchmarks.bridge_loop --out runs/bench-bridge` (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from inference.bridge.orthanc import OrthancProcess, free_port
from inference.phantoms import make_chest_ct, write_dicom_series
from inference.serverproc import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
STAT_RULE = "priority:\n  - {attribute: StudyDescription, match: '\\bstroke\\b', priority: STAT}\n"


def load_average() -> float:
    return os.getloadavg()[0]


def rows(state: Path) -> dict[str, dict[str, Any]]:
    path = state / "journal.sqlite3"
    if not path.exists():
        return {}
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
        db.row_factory = sqlite3.Row
        try:
            return {r["study_uid"]: dict(r) for r in db.execute("SELECT * FROM studies")}
        except sqlite3.OperationalError:
            return {}


class Studies:
    """One phantom, written as a new study (new UIDs) on each call to ``write``."""

    def __init__(self, workdir: Path, shape: tuple[int, int, int]) -> None:
        self.workdir = workdir
        self.phantom = make_chest_ct(
            np.random.default_rng(2026), shape=shape, pixel_spacing_mm=0.8, slice_spacing_mm=2.5, n_nodules=2
        )
        self.count = 0

    def write(self, description: str) -> tuple[str, list[Path]]:
        self.count += 1
        files = write_dicom_series(self.phantom, self.workdir / f"study{self.count}")
        for path in files:
            ds = pydicom.dcmread(path)
            ds.StudyDescription = description
            ds.save_as(path)
        return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), files


class Loop:
    """A fresh Orthanc and bridge around a running server."""

    def __init__(self, workdir: Path, server: ServerProcess, concurrency: int, rules: str | None) -> None:
        self.workdir = workdir
        self.orthanc = OrthancProcess(workdir / "orthanc").start()
        self.state = workdir / "state"
        args = [
            sys.executable, "-m", "inference.cli", "bridge", "--dicomweb", self.orthanc.dicomweb_url,
            "--server", server.target, "--state", str(self.state), "--poll-s", "1", "--stable-s", "2",
            "--concurrency", str(concurrency), "--metrics-port", str(free_port()),
        ]  # fmt: skip
        if rules:
            (workdir / "bridge.yaml").write_text(rules)
            args += ["--config", str(workdir / "bridge.yaml")]
        self.args = args
        self.bridge: subprocess.Popen[bytes] | None = None

    def start_bridge(self) -> float:
        self.log = open(self.workdir / "bridge.log", "ab")  # noqa: SIM115
        self.bridge = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        return time.time()

    def wait(self, uids: list[str], state: str = "stored", timeout_s: float = 3600.0) -> dict[str, dict[str, Any]]:
        """Until every study is in ``state`` (one state, or several joined by ``|``); returns the journal."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            current = rows(self.state)
            if all(current.get(uid, {}).get("state") in state.split("|") for uid in uids):
                return current
            failed = [r for r in current.values() if r["state"] == "failed"]
            if failed:
                raise RuntimeError(f"a study failed: {failed[0]['status']}: {failed[0]['message']}")
            time.sleep(0.2)
        raise TimeoutError(f"not every study {state} within {timeout_s} s")

    def stages(self) -> dict[str, dict[str, float]]:
        """Each stored study's seconds by stage (choose, retrieve, read, server, keep, store), from the audit lines,
        by study hash."""
        found = {}
        for line in (self.workdir / "bridge.log").read_text().splitlines():
            if "event=stored " not in line:
                continue
            fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
            found[fields["study"]] = {k[:-2]: float(v) for k, v in fields.items() if k.endswith("_s") and k != "work_s"}
        return found

    def close(self) -> None:
        if self.bridge is not None:
            self.bridge.terminate()
            self.bridge.wait(120)
            self.log.close()
        self.orthanc.stop()


def throughput(workdir: Path, server: ServerProcess, studies: Studies, n: int, concurrency: int) -> dict[str, Any]:
    loop = Loop(workdir, server, concurrency, None)
    try:
        uids = []
        for _ in range(n):
            uid, files = studies.write("CT CHEST ROUTINE")
            loop.orthanc.upload(files)
            uids.append(uid)
        load_before = load_average()
        started = loop.start_bridge()
        done = loop.wait(uids)
        finished = max(done[uid]["stored_at"] for uid in uids)
        lags = sorted(done[uid]["stored_at"] - done[uid]["stable_at"] for uid in uids)
        elapsed = finished - started
        stages = loop.stages().values()
        return {
            "median_s_by_stage": {
                stage: round(float(np.median([st[stage] for st in stages if stage in st])), 2)
                for stage in ("stable_to_stored", "choose", "retrieve", "read", "server", "keep", "store")
            },
            "studies": n,
            "concurrency": concurrency,
            "elapsed_s": round(elapsed, 1),
            "studies_per_hour": round(n / elapsed * 3600, 1),
            "stable_to_stored_s_p50": round(lags[len(lags) // 2], 1),
            "stable_to_stored_s_max": round(lags[-1], 1),
            "load_before": round(load_before, 2),
            "load_after": round(load_average(), 2),
        }
    finally:
        loop.close()


def stat_lag(
    workdir: Path, server: ServerProcess, studies: Studies, behind: int, concurrency: int, rules: str | None
) -> dict[str, Any]:
    """The routine studies are in the archive before the bridge starts; the STAT one is stored once the bridge has
    queued them all, so it becomes stable behind them. ``ahead`` counts the routine studies stable before it and
    stored after it became stable: the queue it actually arrived behind."""
    loop = Loop(workdir, server, concurrency, rules)
    try:
        routine = []
        for _ in range(behind):
            uid, files = studies.write("CT CHEST ROUTINE")
            loop.orthanc.upload(files)
            routine.append(uid)
        uid, files = studies.write("CT HEAD CODE STROKE")
        loop.start_bridge()
        if routine:
            loop.wait(routine, state="queued|reading|storing|stored")
        load_before = load_average()
        loop.orthanc.upload(files)
        done = loop.wait([uid, *routine])
        stat = done[uid]
        ahead = [u for u in routine if done[u]["stable_at"] < stat["stable_at"] < done[u]["stored_at"]]
        routine_lags = sorted(done[u]["stored_at"] - done[u]["stable_at"] for u in routine)
        return {
            "stat_s_by_stage": loop.stages()[stat["study_hash"]],
            "behind": behind,
            "ahead_when_stable": len(ahead),
            "rule": rules is not None,
            "concurrency": concurrency,
            "priority": "STAT" if stat["priority"] == 2 else "ROUTINE",
            "stat_stable_to_stored_s": round(stat["stored_at"] - stat["stable_at"], 1),
            "routine_stable_to_stored_s_max": round(routine_lags[-1], 1) if routine_lags else None,
            "load_before": round(load_before, 2),
            "load_after": round(load_average(), 2),
        }
    finally:
        loop.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-bridge")
    parser.add_argument("--studies", type=int, default=20, help="studies of the throughput run")
    parser.add_argument("--behind", type=int, default=20, help="routine studies queued before the STAT one")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 120), help="CT columns rows slices")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="radserve-bench-bridge-"))
    repo = workdir / "models"
    shutil.copytree(ROOT / "models" / "lung_nodule_ct", repo / "lung_nodule_ct", ignore=shutil.ignore_patterns("*.py"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit.strip(),
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}",
        "input": f"CT {args.shape[0]}x{args.shape[1]}x{args.shape[2]} DICOM (int16, one file per slice)",
        "model": "lung_nodule_ct:1 on the CPU",
    }
    server = ServerProcess(models=repo, device="cpu", log_path=workdir / "server.log")
    try:
        server.start()
        studies = Studies(workdir / "studies", tuple(args.shape))
        results["throughput"] = throughput(workdir / "t", server, studies, args.studies, args.concurrency)
        print(json.dumps(results["throughput"]), flush=True)
        results["stat"] = []
        for behind, rules in ((0, STAT_RULE), (args.behind, STAT_RULE), (args.behind, None)):
            run = stat_lag(
                workdir / f"s{behind}{'r' if rules else 'n'}", server, studies, behind, args.concurrency, rules
            )
            print(json.dumps(run), flush=True)
            results["stat"].append(run)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    path = args.out / f"bridge-{results['date']}-{results['commit']}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
