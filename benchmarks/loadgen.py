"""Load generator: drives a real radserve server over gRPC and reports what it sustained.

Each of ``concurrency`` workers streams studies (header + 4 MiB chunks, built once per study) over its own
channel, back to back, until ``count`` reads completed or ``duration_s`` passed, after one warm-up round. A mix
is a list of studies (repeat one to weight it), drawn round-robin.

Reported: reads/s (studies/s) and images/s (one per projection X-ray, one per slice for CT), latency p50/p95/p99,
the server's own per-stage ``timing_ms`` (mean over reads: receive, decode, preprocess, infer, postprocess,
total), the server process's resident memory (``/proc/<pid>/status``: VmHWM reset before the run when the kernel
allows it, and VmRSS sampled every 20 ms), and GPU memory and utilisation sampled with ``nvidia-smi`` when it
exists (``torch.cuda`` in this process cannot see the server's allocations). Progress goes to stderr.

Standalone, against a running server (``--server-pid`` for the memory figures)::

    python -m benchmarks.loadgen --server 127.0.0.1:50051 --server-pid 1234 --studies ct:160x160x56 \\
        --concurrency 8 --count 16 --json out.json

or ``--spawn`` to start one (``inference.serverproc.ServerProcess``) on a free port.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.client import MAX_MESSAGE_BYTES

MIB = 1024 * 1024
PINNED_METRIC = "radserve_pinned_host_memory_bytes"
STAGES = ("receive", "decode", "preprocess", "infer", "postprocess", "encode", "total")

# Client channel options. Measured on loopback (benchmarks/ingest.py): grpc's BDP probing already grows the
# HTTP/2 window, so fixed window settings did not help beyond noise; one connection per worker.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.use_local_subchannel_pool", 1),
]


# -- process and GPU monitors -----------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM... of ``pid`` in bytes (empty if the process is gone)."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key.startswith("Vm") and rest.strip().endswith("kB"):
                    values[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return values


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used (``/proc/<pid>/stat``), in seconds; 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, ``echo 5 > /proc/PID/clear_refs``); False if not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryMonitor:
    """Samples a process's VmRSS in a thread; the peak is max(VmHWM after a reset, sampled max)."""

    def __init__(self, pid: int | None, interval_s: float = 0.02) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.idle_rss = 0
        self.sampled_max = 0
        self.server_cpu_s: float | None = None
        self.client_cpu_s = 0.0
        self.hwm_reset = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> MemoryMonitor:
        self.load_avg_start = round(os.getloadavg()[0], 2)
        times = os.times()
        self.client_cpu_start = times.user + times.system
        if self.pid is None:
            return self
        self.server_cpu_start = cpu_seconds(self.pid)
        self.hwm_reset = reset_peak_rss(self.pid)
        self.idle_rss = proc_status(self.pid).get("VmRSS", 0)
        self._thread = threading.Thread(target=self._run, name="rss-monitor", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sampled_max = max(self.sampled_max, proc_status(self.pid).get("VmRSS", 0))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        times = os.times()
        self.client_cpu_s = times.user + times.system - self.client_cpu_start
        self.server_cpu_s = cpu_seconds(self.pid) - self.server_cpu_start if self.pid is not None else None

    def cpu(self) -> dict[str, Any]:
        """CPU seconds used during the run by the server and by this client process, and the load average."""
        return {
            "server_cpu_s": None if self.server_cpu_s is None else round(self.server_cpu_s, 2),
            "client_cpu_s": round(self.client_cpu_s, 2),
            "load_avg_1m_start": self.load_avg_start,
            "load_avg_1m_end": round(os.getloadavg()[0], 2),
        }

    def report(self) -> dict[str, Any] | None:
        if self.pid is None:
            return None
        status = proc_status(self.pid)
        hwm = status.get("VmHWM", 0) if self.hwm_reset else 0
        peak = max(hwm, self.sampled_max)
        return {
            "pid": self.pid,
            "rss_idle_mb": round(self.idle_rss / MIB, 1),
            "rss_peak_mb": round(peak / MIB, 1),
            "peak_source": "VmHWM (reset before the run) and VmRSS sampled every 20 ms"
            if self.hwm_reset
            else "VmRSS sampled every 20 ms (VmHWM reset not permitted)",
        }


class GpuMonitor:
    """``nvidia-smi --query-gpu=memory.used,utilization.gpu -lms 200`` in the background, when it exists."""

    def __init__(self, interval_ms: int = 200) -> None:
        self.interval_ms = interval_ms
        self.samples: list[tuple[float, float]] = []  # (memory used MiB, utilisation %)
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("nvidia-smi") is not None

    def __enter__(self) -> GpuMonitor:
        if not self.available():
            return self
        query = ["nvidia-smi", "--query-gpu=memory.used,utilization.gpu", "--format=csv,noheader,nounits"]
        self._proc = subprocess.Popen(
            [*query, "-lms", str(self.interval_ms)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self._thread = threading.Thread(target=self._read, name="gpu-monitor", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:  # type: ignore[union-attr]
            try:
                memory, util = (float(v) for v in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((memory, util))

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def report(self) -> dict[str, Any] | None:
        if not self.samples:
            return None
        memory = np.array([s[0] for s in self.samples])
        util = np.array([s[1] for s in self.samples])
        return {
            "memory_used_mib_max": float(memory.max()),
            "utilization_pct_mean": round(float(util.mean()), 1),
            "utilization_pct_max": float(util.max()),
            "samples": len(self.samples),
            "source": "nvidia-smi (whole GPU, all processes)",
        }


def scrape_gauge(metrics_url: str | None, name: str, timeout_s: float = 5.0) -> float | None:
    """The value of the unlabelled gauge ``name`` on a server's Prometheus endpoint; None when absent or unreachable
    (e.g. ``radserve_pinned_host_memory_bytes`` on the CPU)."""
    if not metrics_url:
        return None
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout_s) as response:  # the server's own loopback URL
            text = response.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    return None


# -- the load ---------------------------------------------------------------------------------------------------


@dataclass
class ReadRecord:
    study: str
    start_s: float
    latency_ms: float
    ok: bool
    code: str = "OK"
    timing_ms: dict[str, float] = field(default_factory=dict)
    findings: list[list[float]] = field(default_factory=list)


@dataclass
class LoadResult:
    label: str
    concurrency: int
    wall_s: float
    records: list[ReadRecord]
    images_per_read: dict[str, int]
    raw_voxel_bytes: dict[str, int]
    payload_bytes: dict[str, int]
    max_in_flight: int
    memory: dict[str, Any] | None = None
    gpu: dict[str, Any] | None = None
    cpu: dict[str, Any] | None = None

    @property
    def ok(self) -> list[ReadRecord]:
        return [r for r in self.records if r.ok]

    def summary(self) -> dict[str, Any]:
        ok = self.ok
        latencies = np.asarray([r.latency_ms for r in ok] or [0.0])
        images = sum(self.images_per_read[r.study] for r in ok)
        stages = {}
        for stage in sorted({k for r in ok for k in r.timing_ms}):
            values = [r.timing_ms[stage] for r in ok if stage in r.timing_ms]
            stages[stage] = round(float(np.mean(values)), 1)
        memory = dict(self.memory) if self.memory else None
        if memory and ok:
            largest = max(self.raw_voxel_bytes[r.study] for r in ok)
            in_flight = max(1, self.max_in_flight)
            per_study = max(0.0, memory["rss_peak_mb"] - memory["rss_idle_mb"]) / in_flight
            memory.update(
                {
                    "max_in_flight": self.max_in_flight,
                    "peak_per_in_flight_study_mb": round(per_study, 1),
                    "raw_voxel_mb": round(largest / MIB, 1),
                    "peak_per_in_flight_over_raw": round(per_study * MIB / largest, 2),
                }
            )
        return {
            "label": self.label,
            "concurrency": self.concurrency,
            "reads_ok": len(ok),
            "errors": dict(Counter(r.code for r in self.records if not r.ok)),
            "wall_s": round(self.wall_s, 3),
            "studies_per_s": round(len(ok) / self.wall_s, 4) if self.wall_s else None,
            "images_per_s": round(images / self.wall_s, 3) if self.wall_s else None,
            "latency_ms": {
                "p50": round(float(np.percentile(latencies, 50)), 1),
                "p95": round(float(np.percentile(latencies, 95)), 1),
                "p99": round(float(np.percentile(latencies, 99)), 1),
                "mean": round(float(latencies.mean()), 1),
                "max": round(float(latencies.max()), 1),
            },
            "stages_ms": stages,
            "server_memory": memory,
            "gpu": self.gpu,
            "cpu": self._cpu_summary(len(ok)),
            "studies": sorted(self.images_per_read),
            "payload_mb": {k: round(v / 1e6, 2) for k, v in sorted(self.payload_bytes.items())},
        }

    def _cpu_summary(self, n_ok: int) -> dict[str, Any] | None:
        if self.cpu is None:
            return None
        cpu = dict(self.cpu)
        total = (cpu["server_cpu_s"] or 0.0) + cpu["client_cpu_s"]
        cpu["cpu_s_per_study"] = round(total / n_ok, 3) if n_ok else None
        return cpu


READ_METHOD = f"/{pb.DESCRIPTOR.services_by_name['ReadingService'].full_name}/Read"


def wire(study: Any) -> list[bytes]:
    """A study's Read messages serialized once: the load generator sends bytes, so that its own CPU (which shares
    the machine with the server) goes to sending, not to re-serializing the same messages for every read."""
    cached = getattr(study, "_wire", None)
    if cached is None:
        cached = [m.SerializeToString() for m in study.requests]
        study._wire = cached
    return cached


def _centers(response: pb.ReadResponse) -> list[list[float]]:
    return [list(f.center_mm) for f in response.findings]


class _Progress:
    def __init__(self, label: str, total: int | None, duration_s: float | None, enabled: bool) -> None:
        self.label, self.total, self.duration_s, self.enabled = label, total, duration_s, enabled
        self.start = time.perf_counter()
        self.last = 0.0
        self.lock = threading.Lock()

    def update(self, records: Sequence[ReadRecord], force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < 2.0):
            return
        self.last = now
        ok = [r for r in records if r.ok]
        elapsed = now - self.start
        p50 = np.percentile([r.latency_ms for r in ok], 50) / 1e3 if ok else 0.0
        goal = f"/{self.total}" if self.total else ""
        goal += f" in {elapsed:.0f}/{self.duration_s:.0f} s" if self.duration_s else ""
        print(
            f"[loadgen] {self.label}: {len(records)}{goal} reads, {len(ok) / max(elapsed, 1e-9):.2f} reads/s, "
            f"p50 {p50:.2f} s, errors {len(records) - len(ok)}",
            file=sys.stderr,
            flush=True,
        )


def run_load(
    target: str,
    studies: Sequence[Any],
    *,
    concurrency: int,
    count: int | None = None,
    duration_s: float | None = None,
    warmup_reads: int | None = None,
    timeout_s: float = 600.0,
    server_pid: int | None = None,
    label: str = "load",
    progress: bool = True,
    keep_findings: bool = True,
) -> LoadResult:
    """Drive ``target`` with ``studies`` (:class:`benchmarks.workloads.Study`, cycled) at ``concurrency``, until
    ``count`` reads are done or ``duration_s`` has passed, whichever comes first (give one or both).

    ``warmup_reads`` (default: one per worker) run first, unmeasured, so that batch sizes, allocators and
    connections are warm."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if count is None and duration_s is None:
        raise ValueError("give count, duration_s or both")
    channels = [grpc.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(concurrency)]
    stubs = [
        c.stream_unary(READ_METHOD, request_serializer=None, response_deserializer=pb.ReadResponse.FromString)
        for c in channels
    ]
    for study in studies:
        wire(study)
    try:
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=30)
        warmup_reads = concurrency if warmup_reads is None else warmup_reads
        if warmup_reads:
            _drive(stubs, studies, min(concurrency, warmup_reads), warmup_reads, None, timeout_s, None, False)
        with MemoryMonitor(server_pid) as memory, GpuMonitor() as gpu:
            prog = _Progress(label, count, duration_s, progress)
            start = time.perf_counter()
            records, max_in_flight = _drive(stubs, studies, concurrency, count, duration_s, timeout_s, prog, True)
            wall_s = max(r.start_s + r.latency_ms / 1e3 for r in records) - start if records else 0.0
            prog.update(records, force=True)
        if not keep_findings:
            for r in records:
                r.findings = []
        return LoadResult(
            label=label,
            concurrency=concurrency,
            wall_s=wall_s,
            records=records,
            images_per_read={s.name: s.spec.n_images for s in studies},
            raw_voxel_bytes={s.name: s.spec.raw_voxel_bytes for s in studies},
            payload_bytes={s.name: s.payload_bytes for s in studies},
            max_in_flight=max_in_flight,
            memory=memory.report(),
            gpu=gpu.report(),
            cpu=memory.cpu(),
        )
    finally:
        for channel in channels:
            channel.close()


def _drive(
    stubs: Sequence[Any],
    studies: Sequence[Any],
    concurrency: int,
    count: int | None,
    duration_s: float | None,
    timeout_s: float,
    prog: _Progress | None,
    record: bool,
) -> tuple[list[ReadRecord], int]:
    lock = threading.Lock()
    records: list[ReadRecord] = []
    state = {"next": 0, "in_flight": 0, "max_in_flight": 0}
    deadline = None if duration_s is None else time.perf_counter() + duration_s

    def claim() -> int | None:
        with lock:
            i = state["next"]
            if count is not None and i >= count:
                return None
            if deadline is not None and time.perf_counter() >= deadline:
                return None
            state["next"] += 1
            state["in_flight"] += 1
            state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
            return i

    def worker(stub: Any) -> None:
        while (i := claim()) is not None:
            study = studies[i % len(studies)]
            start = time.perf_counter()
            try:
                response = stub(iter(wire(study)), timeout=timeout_s)
                rec = ReadRecord(
                    study.name,
                    start,
                    (time.perf_counter() - start) * 1e3,
                    True,
                    timing_ms=dict(response.timing_ms),
                    findings=_centers(response),
                )
            except grpc.RpcError as exc:
                rec = ReadRecord(study.name, start, (time.perf_counter() - start) * 1e3, False, exc.code().name)
                print(f"[loadgen] {study.name}: {exc.code().name}: {exc.details()}", file=sys.stderr, flush=True)
            with lock:
                state["in_flight"] -= 1
                if record:
                    records.append(rec)
            if prog is not None:
                prog.update(records)

    threads = [threading.Thread(target=worker, args=(stubs[w],), name=f"loadgen-{w}") for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(records, key=lambda r: r.start_s), state["max_in_flight"]


# -- printing ---------------------------------------------------------------------------------------------------


def format_row(summary: dict[str, Any]) -> str:
    lat = summary["latency_ms"]
    mem = summary.get("server_memory") or {}
    ratio = mem.get("peak_per_in_flight_over_raw")
    return (
        f"{summary['label']:<28} c={summary['concurrency']:<3} {summary['studies_per_s']:>8.3f} st/s "
        f"{summary['images_per_s']:>9.1f} img/s  "
        f"p50 {lat['p50']:>8.0f}  p95 {lat['p95']:>8.0f}  p99 {lat['p99']:>8.0f} ms"
        + (f"  rss/in-flight {ratio:.2f}x raw" if ratio is not None else "")
        + (f"  errors {summary['errors']}" if summary["errors"] else "")
    )


def main(argv: list[str] | None = None) -> int:
    from benchmarks.workloads import StudySpec, materialize

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help="HOST:PORT of a running server")
    where.add_argument("--spawn", action="store_true", help="start a server (ServerProcess) for the run")
    parser.add_argument("--server-pid", type=int, default=None, help="the server's pid, for memory figures")
    parser.add_argument("--models", type=Path, default=Path("models"), help="model repository (with --spawn)")
    parser.add_argument("--device", default="auto", help="server device (with --spawn)")
    parser.add_argument(
        "--studies",
        nargs="+",
        required=True,
        help="mix, e.g. ct:160x160x56@0.9,2.5 dx:512x512@0.8 (repeat one to weight it); payload with +raw",
    )
    parser.add_argument("--seeds", type=int, default=2, help="distinct phantoms per study kind")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--count", type=int, default=None)
    parser.add_argument("--duration-s", type=float, default=None)
    parser.add_argument("--cache", type=Path, default=Path("runs/bench/cache"), help="studies (gitignored)")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    args = parser.parse_args(argv)

    specs = []
    for text in args.studies:
        kind, _, rest = text.partition(":")
        payload = "raw" if rest.endswith("+raw") else "dicom"
        size, _, spacing = rest.removesuffix("+raw").partition("@")
        shape = tuple(int(v) for v in size.split("x"))
        default_spacing = "0.8,2.5" if kind.lower() == "ct" else "0.8"
        spacings = tuple(float(v) for v in (spacing or default_spacing).split(","))
        for seed in range(args.seeds):
            specs.append(StudySpec(kind.upper(), shape, spacings, seed, payload))
    studies = [materialize(s, args.cache) for s in specs]
    count = args.count if args.count is not None or args.duration_s is not None else 4 * args.concurrency

    server = None
    if args.spawn:
        from inference.serverproc import ServerProcess

        server = ServerProcess(models=args.models, device=args.device).start()
        target, pid = server.target, server.process.pid
    else:
        target, pid = args.server, args.server_pid
    try:
        result = run_load(
            target,
            studies,
            concurrency=args.concurrency,
            count=count,
            duration_s=args.duration_s,
            server_pid=pid,
            label="+".join(sorted({s.spec.modality.lower() + "-" + s.spec.size_label for s in studies})),
        )
    finally:
        if server is not None:
            server.stop()
    summary = result.summary()
    print(format_row(summary))
    print("stages (mean ms): " + ", ".join(f"{k} {v:.0f}" for k, v in summary["stages_ms"].items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    return 0 if not summary["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
