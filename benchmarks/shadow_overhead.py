"""What a shadow version costs live reads: live read latency with a shadow at fraction 1.0 against none.

Starts the real server on a copy of models/lung_nodule_ct/1 with version 2, an identical copy (`promote: manual`),
and reads CT phantoms (RAW float32, ``--shape``) one at a time with ``--gap-s`` between the end of one read and the
start of the next (a server busy about half the time when the gap is one read's time). Phases alternate, shadow off
then on, ``--rounds`` times, ``--reads`` reads each; before each "off" phase the shadow reads of the previous "on"
phase are waited for, so that they do not run into it. A last phase with no gap (the server saturated by one client)
shows the shadow starving, as it must, rather than slowing live reads. Prints one JSON object.

    python -m benchmarks.shadow_overhead --reads 10 --rounds 3 --gap-s 1.0
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.client import ReadingClient
from inference.phantoms import make_chest_ct
from inference.serverproc import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
NAME = "lung_nodule_ct"
TOKEN = "shadow-bench-operator"


def _repo(root: Path) -> None:
    shutil.copytree(ROOT / "models" / NAME / "1", root / NAME / "1", ignore=shutil.ignore_patterns("*.md", "*.json"))
    shutil.copytree(root / NAME / "1", root / NAME / "2")
    config = yaml.safe_load((root / NAME / "2" / "model.yaml").read_text())
    config["promote"] = "manual"
    (root / NAME / "2" / "model.yaml").write_text(yaml.safe_dump(config))


def _studies(shape: tuple[int, int, int], n: int) -> list[tuple[bytes, pb.RawArray]]:
    out = []
    for seed in range(n):
        volume = make_chest_ct(
            np.random.default_rng(seed), shape=shape, pixel_spacing_mm=1.5, slice_spacing_mm=2.5
        ).volume
        raw = pb.RawArray(dtype="float32", shape=volume.shape, affine=volume.affine.ravel().tolist())
        out.append((volume.voxels.astype(np.float32).tobytes(), raw))
    return out


def _shadow_done(client: ReadingClient) -> int:
    model = next(m for m in client.list_models().models if m.name == NAME)
    version = next(v for v in model.versions if v.version == "2")
    s = version.shadow
    return s.reads_compared + s.reads_skipped + s.reads_failed


def _agreement(client: ReadingClient) -> dict:
    model = next(m for m in client.list_models().models if m.name == NAME)
    s = next(v for v in model.versions if v.version == "2").shadow
    return {
        "compared": s.reads_compared,
        "skipped": s.reads_skipped,
        "failed": s.reads_failed,
        "live_found_share": round(s.live_found_share, 4),  # of the last "on" phase
        "shadow_found_share": round(s.shadow_found_share, 4),
    }


def _wait_shadow(client: ReadingClient, n: int, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _shadow_done(client) < n and time.monotonic() < deadline:
        time.sleep(0.2)


def _phase(client: ReadingClient, studies: list, reads: int, gap_s: float) -> list[float]:
    latencies = []
    for i in range(reads):
        data, raw = studies[i % len(studies)]
        start = time.perf_counter()
        response = client.read([data], payload_kind=pb.RAW, raw=raw, modality="CT", timeout_s=300)
        latencies.append((time.perf_counter() - start) * 1e3)
        assert response.model_version == "1", response.model_version
        time.sleep(gap_s)
    return latencies


def _summary(latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    return {
        "reads": len(ordered),
        "mean_ms": round(statistics.fmean(ordered), 1),
        "p50_ms": round(statistics.median(ordered), 1),
        "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=10, help="reads per phase")
    parser.add_argument("--rounds", type=int, default=3, help="off/on pairs of phases")
    parser.add_argument("--gap-s", type=float, default=1.0, help="pause after each read")
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 128, 48], help="CT phantom voxels X Y Z")
    parser.add_argument("--saturated-reads", type=int, default=10, help="reads of the last, gap-less phase")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _repo(root / "models")
        tokens = root / "tokens.yaml"
        tokens.write_text(yaml.safe_dump({"ops": {"token": TOKEN, "role": "operator"}}))
        server = ServerProcess(
            models=root / "models",
            log_path=root / "server.log",
            extra_args=["--model-poll-interval-s", "0", "--auth-tokens", str(tokens)],
        ).start()
        client = ReadingClient(server.target, token=TOKEN)
        try:
            studies = _studies(tuple(args.shape), 4)
            _phase(client, studies, 2, 0.0)  # warm the path
            client.shadow_model(NAME, "2", 1.0)
            _phase(client, studies, 2, args.gap_s)
            off: list[float] = []
            on: list[float] = []
            compared = {"compared": 0, "skipped": 0, "failed": 0}
            for _ in range(args.rounds):
                _wait_shadow(client, 2 if not on else args.reads)  # the last "on" phase's shadow reads
                if on:
                    compared = {k: compared[k] + _agreement(client)[k] for k in compared}
                client.shadow_model(NAME, "2", 0.0)  # ends the shadow (its counts start afresh when marked again)
                off += _phase(client, studies, args.reads, args.gap_s)
                client.shadow_model(NAME, "2", 1.0)
                on += _phase(client, studies, args.reads, args.gap_s)
            _wait_shadow(client, args.reads)
            last = _agreement(client)
            agreement = {**last, **{k: compared[k] + last[k] for k in compared}}
            before = _shadow_done(client)
            saturated = _phase(client, studies, args.saturated_reads, 0.0)
            saturated_shadow = _agreement(client)
            result = {
                "input": f"CT {'x'.join(map(str, args.shape))} RAW float32, spacing 1.5/2.5 mm",
                "gap_s": args.gap_s,
                "shadow_off": _summary(off),
                "shadow_on": _summary(on),
                "mean_ratio_on_off": round(statistics.fmean(on) / statistics.fmean(off), 3),
                "p50_ratio_on_off": round(statistics.median(on) / statistics.median(off), 3),
                "shadow_agreement": agreement,
                "saturated": {
                    **_summary(saturated),
                    "shadow_reads_done_during": _shadow_done(client) - before,
                    "shadow_skipped_total": saturated_shadow["skipped"],
                },
                "load_average": os.getloadavg(),
                "commit": subprocess.run(
                    ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
                ).stdout.strip(),
                "cpus": os.cpu_count(),
            }
        finally:
            client.close()
            server.stop()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
