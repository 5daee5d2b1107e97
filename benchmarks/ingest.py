"""Ingest throughput: how fast a study gets from the client into a decoded Volume in the server.

The figure is the server's own ``receive + decode`` time (``timing_ms``) for one study, by path:

* ``stream-<n>MiB``: streamed over gRPC in chunks of n MiB (the archive's path; client channel options below);
* ``shm``: a POSIX shared-memory segment named in the header (``ReadHeader.shared_memory``);
* ``file``: a file under the server's ingest root named in the header (``ReadHeader.file``).

The study is a 512x512x300 int16 RAW array (157 MB) by default, at a pixel size that makes it one 96^3 patch
after resampling, so each read is quick after ingest. Run::

    python -m benchmarks.ingest --models models --json runs/bench/ingest.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.client import MAX_MESSAGE_BYTES

MIB = 1024 * 1024
READ_METHOD = f"/{pb.DESCRIPTOR.services_by_name['ReadingService'].full_name}/Read"

# Client-side HTTP/2 settings tried for the streamed path. grpc's BDP probe already grows the flow-control
# window on its own; these pin it large from the start.
STREAM_OPTIONS: dict[str, list[tuple[str, Any]]] = {
    "default": [],
    "window-64MiB": [
        ("grpc.http2.lookahead_bytes", 64 * MIB),
        ("grpc.http2.bdp_probe", 0),
        ("grpc.initial_window_size", 64 * MIB),  # not a public arg on every version; ignored if unknown
    ],
}


def _study(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(-600, 300, size=shape), -1024, 3000).astype(np.int16)


def _channel(target: str, extra: list[tuple[str, Any]]) -> grpc.Channel:
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.use_local_subchannel_pool", 1),
        *extra,
    ]
    return grpc.insecure_channel(target, options=options)


def _stream_requests(header: pb.ReadHeader, data: bytes, chunk_bytes: int) -> list[pb.ReadRequest]:
    view = memoryview(data)
    chunks = [view[o : o + chunk_bytes] for o in range(0, len(data), chunk_bytes)]
    return [pb.ReadRequest(header=header)] + [pb.ReadRequest(chunk=pb.Chunk(data=bytes(c))) for c in chunks]


def run_ingest(
    target: str,
    ingest_root: Path | None,
    *,
    shape: tuple[int, int, int] = (512, 512, 300),
    spacing_mm: tuple[float, float, float] = (0.18, 0.18, 0.3),
    repeats: int = 3,
    chunk_mib: tuple[int, ...] = (1, 4),
    options: tuple[str, ...] = ("default",),
    model: str = "lung_nodule_ct",
    progress: bool = True,
    warmup: bool = True,
) -> dict[str, Any]:
    """Measure each path ``repeats`` times (after one warm-up read); medians of the server's timings."""
    voxels = _study(shape)
    data = voxels.tobytes()
    raw = pb.RawArray(dtype="int16", shape=shape, spacing_mm=list(spacing_mm))

    def header(**ref: Any) -> pb.ReadHeader:
        return pb.ReadHeader(model=model, payload=pb.RAW, modality="CT", raw=raw, **ref)

    variants: dict[str, tuple[list[tuple[str, Any]], list[pb.ReadRequest]]] = {}
    for option in options:
        for mib in chunk_mib:
            name = f"stream-{mib}MiB" + ("" if option == "default" else f"-{option}")
            variants[name] = (STREAM_OPTIONS[option], _stream_requests(header(), data, mib * MIB))
    shm = shared_memory.SharedMemory(create=True, size=len(data))
    shm.buf[: len(data)] = data
    shm_ref = pb.SharedMemoryRef(name=shm.name, size_bytes=len(data))
    variants["shm"] = ([], [pb.ReadRequest(header=header(shared_memory=shm_ref))])
    if ingest_root is not None:
        path = Path(ingest_root) / "ingest_study.raw"
        path.write_bytes(data)
        variants["file"] = ([], [pb.ReadRequest(header=header(file=pb.FileRef(paths=[str(path)])))])
    results: dict[str, Any] = {}
    try:
        for name, (extra, requests) in variants.items():
            channel = _channel(target, extra)
            read = channel.stream_unary(
                READ_METHOD, request_serializer=None, response_deserializer=pb.ReadResponse.FromString
            )
            serialized = [m.SerializeToString() for m in requests]  # once: the client's CPU is not what is measured
            rows = []
            for i in range(repeats + int(warmup)):
                start = time.perf_counter()
                response = read(iter(serialized), timeout=600)
                wall_ms = (time.perf_counter() - start) * 1e3
                if i or not warmup:  # the first read warms the path up
                    rows.append({**dict(response.timing_ms), "wall": wall_ms})
            channel.close()
            receive = float(np.median([r["receive"] for r in rows]))
            decode = float(np.median([r["decode"] for r in rows]))
            ingest = float(np.median([r["receive"] + r["decode"] for r in rows]))
            results[name] = {
                "receive_ms": round(receive, 1),
                "decode_ms": round(decode, 1),
                "ingest_ms": round(ingest, 1),
                "gb_per_s": round(len(data) / 1e9 / (ingest / 1e3), 3),
                "repeats": repeats,
            }
            if progress:
                print(f"[ingest] {name}: {results[name]}", file=sys.stderr, flush=True)
    finally:
        shm.close()
        shm.unlink()
    return {
        "study": {"shape": list(shape), "dtype": "int16", "bytes": len(data), "spacing_mm": list(spacing_mm)},
        "paths": results,
        "voxels_mb": round(math.prod(shape) * 2 / 1e6, 1),
    }


@dataclass(frozen=True)
class _MemorySpec:
    shape: tuple[int, int, int]

    @property
    def n_images(self) -> int:
        return self.shape[2]

    @property
    def raw_voxel_bytes(self) -> int:
        return 2 * math.prod(self.shape)


@dataclass
class _MemoryStudy:
    """What the load generator needs of a study (see benchmarks.workloads.Study)."""

    name: str
    spec: _MemorySpec
    requests: list[pb.ReadRequest]
    payload_bytes: int


def memory_run(
    target: str,
    server_pid: int,
    *,
    shape: tuple[int, int, int] = (512, 512, 300),
    spacing_mm: tuple[float, float, float] = (0.18, 0.18, 0.3),
    concurrency: int = 4,
    count: int = 4,
    model: str = "lung_nodule_ct",
    metrics_url: str | None = None,
) -> dict[str, Any]:
    """Peak server RSS per in-flight study, streaming the ingest study (int16 RAW) at ``concurrency``.

    On CUDA the server's resident memory also holds the pinned staging buffers of GPU preprocessing, which the
    allocator rounds up to a power of two and keeps between reads (``radserve_pinned_host_memory_bytes``, read from
    ``metrics_url``): the figure is given with them and, as ``..._excluding_pinned``, without what they grew by
    during the run. On the CPU there are none and both figures are the same.
    """
    from benchmarks.loadgen import PINNED_METRIC, run_load, scrape_gauge

    data = _study(shape).tobytes()
    raw = pb.RawArray(dtype="int16", shape=shape, spacing_mm=list(spacing_mm))
    header = pb.ReadHeader(model=model, payload=pb.RAW, modality="CT", raw=raw)
    requests = _stream_requests(header, data, 4 * MIB)
    study = _MemoryStudy("x".join(map(str, shape)), _MemorySpec(shape), requests, len(data))
    pinned_before = scrape_gauge(metrics_url, PINNED_METRIC)
    result = run_load(
        target,
        [study],
        concurrency=concurrency,
        count=count,
        warmup_reads=0,
        server_pid=server_pid,
        label=f"memory-{study.name}",
        keep_findings=False,
    )
    pinned_after = scrape_gauge(metrics_url, PINNED_METRIC)
    summary = result.summary()
    memory = summary["server_memory"] or {}
    pinned = {}
    if memory.get("peak_per_in_flight_study_mb") is not None and memory.get("max_in_flight"):
        grown_mb = max(0.0, ((pinned_after or 0.0) - (pinned_before or 0.0)) / MIB)
        per_study = max(0.0, memory["rss_peak_mb"] - memory["rss_idle_mb"] - grown_mb) / memory["max_in_flight"]
        pinned = {
            "pinned_mb_before": None if pinned_before is None else round(pinned_before / MIB, 1),
            "pinned_mb_after": None if pinned_after is None else round(pinned_after / MIB, 1),
            "peak_per_in_flight_study_excluding_pinned_mb": round(per_study, 1),
            "peak_per_in_flight_excluding_pinned_over_raw": round(per_study / memory["raw_voxel_mb"], 2),
        }
    return {
        "concurrency": concurrency,
        "reads_ok": summary["reads_ok"],
        "errors": summary["errors"],
        "rss_idle_mb": memory.get("rss_idle_mb"),
        "rss_peak_mb": memory.get("rss_peak_mb"),
        "max_in_flight": memory.get("max_in_flight"),
        "peak_per_in_flight_study_mb": memory.get("peak_per_in_flight_study_mb"),
        "raw_voxel_mb": memory.get("raw_voxel_mb"),
        "peak_per_in_flight_over_raw": memory.get("peak_per_in_flight_over_raw"),
        **pinned,
        "stages_ms": summary["stages_ms"],
    }


def format_rows(report: dict[str, Any]) -> list[str]:
    study = report["study"]
    size = "x".join(map(str, study["shape"]))
    lines = []
    for name, row in report["paths"].items():
        lines.append(
            f"ingest {name:<22} {size} int16  receive {row['receive_ms']:>7.0f} ms  decode {row['decode_ms']:>6.0f} ms"
            f"  -> {row['gb_per_s']:.2f} GB/s"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    from inference.serverproc import ServerProcess

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--shape", default="512x512x300")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-mib", default="1,4", help="streamed chunk sizes to try, MiB (at most 4)")
    parser.add_argument("--options", default="default", help=f"client channel option sets: {sorted(STREAM_OPTIONS)}")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split("x"))
    with tempfile.TemporaryDirectory(prefix="radserve-ingest-") as root:
        env = {"RADSERVE_INGEST_ROOTS": root, "RADSERVE_INGEST_SHARED_MEMORY": "1"}
        with ServerProcess(models=args.models, device=args.device, env=env) as server:
            report = run_ingest(
                server.target,
                Path(root),
                shape=shape,  # type: ignore[arg-type]
                repeats=args.repeats,
                chunk_mib=tuple(int(v) for v in args.chunk_mib.split(",")),
                options=tuple(args.options.split(",")),
            )
    print("\n".join(format_rows(report)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
