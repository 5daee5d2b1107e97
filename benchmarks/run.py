"""The benchmark runs: ``make bench`` (``--profile quick``, CPU), the GPU benchmark (``--profile gpu``,
benchmarks/gpu_run.sh) and a smoke profile (``--profile tiny``, seconds; tests/benchmarks/test_bench_smoke.py and
``gpu_run.sh --dry-run``).

One run: materialize the profile's studies (benchmarks/workloads.py; cached under ``--cache``), start the real
server on a free port, then per workload run the ``direct`` baseline, the load generator at each concurrency and
the ``naive`` baseline, in this process on the same studies and device; then measure ingest (streamed, shared
memory, file) and memory per in-flight study on a 512x512x300 int16 CT, and stop the server. Prints a table with
the lines ``service/direct: <ratio>`` and ``batching x8/x1 (chest_xray): <ratio>``; writes ``<out>/<profile>.json``
and ``<out>/<profile>.md``. A model whose weights are missing is skipped with a note, not failed.

Built to leave figures behind whatever happens (the GPU run has one short session): the JSON and Markdown are
rewritten after every row and once more in a ``finally``, also when SIGTERM (``timeout``) ends the run; a part that
raises (a baseline, a row, materializing a study) is recorded as an error in its workload and the run goes on with
the next; failed reads are counted in their row; ``--budget-s`` bounds the whole run: rows stop early and parts
that would start after it are skipped with a note. The exit status is 1 when any read or part failed.

    python -m benchmarks.run --profile quick                                  # what `make bench` runs
    python -m benchmarks.run --profile gpu --device cuda --out "$OUT" --budget-s 200   # benchmarks/gpu_run.sh
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import ingest as ingest_bench
from benchmarks.baselines import (
    check_direct_matches_run_direct,
    load_task,
    run_direct_baseline,
    run_naive_baseline,
)
from benchmarks.loadgen import format_row, run_load
from benchmarks.workloads import PROFILES, VOLUMES, Workload, materialize

ROOT = Path(__file__).resolve().parents[1]

# Targets (the "Performance" issue): printed as PASS / MISS next to each figure. Not asserted anywhere.
TARGETS = {
    "cpu": {"service_over_direct": 0.85, "batching_x8_over_x1": 1.5},
    "cuda": {"service_over_direct": 0.90, "service_over_naive": 5.0, "xray_images_per_s": 1000.0},
    "memory_over_raw": 3.0,
    "stream_gb_per_s": 0.3,
    "zero_copy_gb_per_s": 1.0,
}
INGEST = {  # per profile: (study shape, repeats, streamed chunk sizes in MiB); tiny: no warm-up read
    "tiny": ((64, 64, 32), 1, (4,)),
    "quick": ((512, 512, 300), 2, (1, 4)),
    "gpu": ((512, 512, 300), 2, (1, 4)),
}
MEMORY_CONCURRENCY = {"tiny": (2,), "quick": (1, 4), "gpu": (1, 8)}
SERVER_START_TIMEOUT_S = 900.0


class RunInterruptedError(BaseException):
    """SIGTERM (``timeout`` ending the run): unwind through the ``finally`` blocks, which write what was measured and
    stop the server. A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the way holds it."""


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def commit() -> str:
    """The commit measured: ``$RADSERVE_COMMIT`` where the tree came without git (the GPU machine), else git's."""
    if os.environ.get("RADSERVE_COMMIT"):
        return os.environ["RADSERVE_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode == 0:
            info["gpu"] = out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def available_models(models: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Newest loadable version directory per model name, and why the others cannot load."""
    from inference.modelrepo.repository import scan_repository, version_key

    scan = scan_repository(models)
    found: dict[str, Path] = {}
    for config in sorted(scan.configs, key=lambda c: version_key(c.version)):
        found[config.name] = config.directory  # type: ignore[assignment]
    missing = {key.split(":")[0]: reason for key, reason in scan.failures.items() if key.split(":")[0] not in found}
    return found, missing


def _cycle(items: list[Any], n: int) -> list[Any]:
    return [items[i % len(items)] for i in range(n)] if items else []


def error_text(exc: BaseException) -> str:
    """One line naming an exception, for the report (its first line, shortened)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


class Budget:
    """The run's time limit (``--budget-s``): what is left, and whether a part may still start."""

    def __init__(self, seconds: float | None) -> None:
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def left_s(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def allows(self, part: str, report: dict[str, Any], reserve_s: float = 0.0) -> bool:
        left = self.left_s()
        if left is None or left > reserve_s:
            return True
        note = f"{part}: skipped, the run's budget was spent"
        report["notes"].append(note)
        log(note)
        return False

    def cap(self, seconds: float | None) -> float | None:
        """``seconds`` shortened to what is left (at least 1 s)."""
        left = self.left_s()
        if left is None:
            return seconds
        return max(1.0, left if seconds is None else min(seconds, left))


def new_report(args: argparse.Namespace, device: Any) -> dict[str, Any]:
    return {
        "profile": args.profile,
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": commit(),
        "device": str(device),
        "machine": machine(),
        "load_avg_before": [round(v, 2) for v in os.getloadavg()],
        "budget_s": args.budget_s,
        "workloads": {},
        "notes": [],
    }


def write_report(report: dict[str, Any], out: Path, started: float) -> None:
    """(Re)write ``<out>/<profile>.json`` and ``.md`` from what has been measured so far."""
    report["load_avg_after"] = [round(v, 2) for v in os.getloadavg()]
    report["wall_s"] = round(time.time() - started, 1)
    report["summary"] = summarize(report)
    text = table(report)
    profile = report["profile"]
    for name, body in ((f"{profile}.json", json.dumps(report, indent=2)), (f"{profile}.md", text + "\n")):
        partial = out / (name + ".partial")
        partial.write_text(body)
        partial.replace(out / name)  # never a half-written file, even if the run is killed while writing


def attempt(entry: dict[str, Any], part: str, fn: Callable[[], Any]) -> Any:
    """Run one part of a workload; if it raises, record the error in ``entry["errors"]`` and return None."""
    try:
        return fn()
    except Exception as exc:
        entry.setdefault("errors", []).append({"part": part, "error": error_text(exc)})
        log(f"{part} failed: {error_text(exc)}")
        return None


def run(args: argparse.Namespace, report: dict[str, Any], save: Callable[[], None]) -> None:
    """Measure the profile into ``report``, calling ``save()`` after every row."""
    from inference.serverproc import ServerProcess, free_port

    budget = Budget(args.budget_s)
    device = report["device"]
    models, missing = available_models(args.models)
    workloads: list[Workload] = []
    for workload in PROFILES[args.profile]:
        if args.only and workload.name not in args.only:
            continue
        if workload.model not in models:
            reason = missing.get(workload.model, "not in the model repository")
            note = f"{workload.name}: skipped, model {workload.model} cannot load ({reason})"
            report["notes"].append(note)
            log(note)
            continue
        workloads.append(workload)

    env = {"RADSERVE_INGEST_SHARED_MEMORY": "1"}
    if args.io_threads:
        env["RADSERVE_IO_THREADS"] = str(args.io_threads)
    extra = ["--compile"] if args.compile else []
    studies: dict[str, list[Any]] = {}
    with tempfile.TemporaryDirectory(prefix="radserve-bench-") as ingest_root:
        env["RADSERVE_INGEST_ROOTS"] = ingest_root
        log(f"starting the server on {device} ({args.models})")
        server = ServerProcess(
            models=args.models,
            device=args.device,
            env=env,
            log_path=args.out / "server.log",
            extra_args=extra,
            metrics_port=free_port(),
        )
        try:
            server.spawn()  # loads and warms up the models while the studies are written
            for workload in workloads:
                if not budget.allows(f"{workload.name} (materializing)", report, reserve_s=30.0):
                    break
                log(f"materializing {workload.name} ({len(workload.specs)} studies {workload.size_label})")
                chosen = attempt(
                    report["workloads"].setdefault(workload.name, {}),
                    "materialize",
                    lambda w=workload: [materialize(spec, args.cache) for spec in w.specs],
                )
                if chosen:
                    studies[workload.name] = chosen
                    report["workloads"][workload.name].update(_describe(workload, chosen))
            save()
            server.wait_serving(timeout_s=SERVER_START_TIMEOUT_S)
            pid = server.process.pid  # type: ignore[union-attr]
            report["server"] = {"target": server.target, "pid": pid}
            metrics_url = f"http://{server.host}:{server.metrics_port}/metrics"
            # Per workload, direct, then the service rows, then naive, close together in time: on a shared
            # machine the load changes from minute to minute (each row records the load average it ran under).
            for workload in workloads:
                if workload.name not in studies or not budget.allows(workload.name, report, reserve_s=10.0):
                    continue
                _run_workload(args, workload, studies[workload.name], models, report, server.target, pid, budget, save)
            if "lung_nodule_ct" in models and not args.no_ingest and budget.allows("ingest", report, reserve_s=10.0):
                _run_ingest(args, report, server.target, pid, Path(ingest_root), metrics_url, budget, save)
        finally:
            save()  # first: stopping the server can take its grace period, and a SIGTERM'd run has seconds left
            interrupted = isinstance(sys.exc_info()[1], RunInterruptedError)
            code = server.stop(timeout_s=5.0 if interrupted else 60.0)
            if code:
                report["notes"].append(f"server exited with code {code}; see server.log")
            for group in studies.values():
                for study in group:
                    study.close()


def _run_workload(
    args: argparse.Namespace,
    workload: Workload,
    chosen: list[Any],
    models: dict[str, Path],
    report: dict[str, Any],
    target: str,
    pid: int,
    budget: Budget,
    save: Callable[[], None],
) -> None:
    from inference.platform import select_device

    entry = report["workloads"][workload.name]
    loaded = attempt(entry, "load model", lambda: load_task(models[workload.model], select_device(args.device)))
    task, network = loaded if loaded else (None, None)
    if task is not None and workload.baseline_studies and budget.allows(f"{workload.name} direct", report):
        log(f"direct: {workload.name}, {workload.baseline_studies} studies")
        load = round(os.getloadavg()[0], 2)
        direct = attempt(
            entry, "direct", lambda: run_direct_baseline(task, network, _cycle(chosen, workload.baseline_studies))
        )
        if direct is not None:
            entry["direct"] = direct.summary() | {"load_avg_1m_start": load}
            entry["direct"]["max_center_diff_vs_run_direct_mm"] = attempt(
                entry, "direct check", lambda: check_direct_matches_run_direct(task, network, chosen[0])
            )
        save()
    entry["service"] = []
    for concurrency in workload.concurrency:
        if not budget.allows(f"{workload.name} service c={concurrency}", report):
            break
        result = attempt(
            entry,
            f"service c={concurrency}",
            lambda c=concurrency: run_load(
                target,
                chosen,
                concurrency=c,
                count=max(workload.reads, c),
                duration_s=budget.cap(workload.max_s),
                warmup_reads=workload.warmup_reads,
                server_pid=pid,
                label=workload.name,
                keep_findings=False,
            ),
        )
        if result is not None:
            entry["service"].append(result.summary())
            log(format_row(entry["service"][-1]))
        save()
    run_naive = task is not None and workload.naive_studies and not args.no_naive
    if run_naive and budget.allows(f"{workload.name} naive", report):
        log(f"naive: {workload.name}, {workload.naive_studies} studies")
        load = round(os.getloadavg()[0], 2)
        naive = attempt(
            entry, "naive", lambda: run_naive_baseline(task, network, _cycle(chosen, workload.naive_studies))
        )
        if naive is not None:
            entry["naive"] = naive.summary() | {"load_avg_1m_start": load}
        save()


def _run_ingest(
    args: argparse.Namespace,
    report: dict[str, Any],
    target: str,
    pid: int,
    ingest_root: Path,
    metrics_url: str,
    budget: Budget,
    save: Callable[[], None],
) -> None:
    shape, repeats, chunks = INGEST[args.profile]
    log(f"ingest: {'x'.join(map(str, shape))} int16, streamed / shared memory / file")
    errors: dict[str, Any] = {}
    ingest = attempt(
        errors,
        "ingest",
        lambda: ingest_bench.run_ingest(
            target, ingest_root, shape=shape, repeats=repeats, chunk_mib=chunks, warmup=args.profile != "tiny"
        ),
    )
    if ingest is not None:
        report["ingest"] = ingest
    save()
    report["memory"] = []
    for concurrency in MEMORY_CONCURRENCY[args.profile]:
        if not budget.allows(f"memory c={concurrency}", report):
            break
        log(f"memory: {'x'.join(map(str, shape))} int16 streamed at concurrency {concurrency}")
        row = attempt(
            errors,
            f"memory c={concurrency}",
            lambda c=concurrency: ingest_bench.memory_run(
                target, pid, shape=shape, concurrency=c, count=max(2, c), metrics_url=metrics_url
            ),
        )
        if row is not None:
            report["memory"].append(row)
        save()
    if not report["memory"]:
        del report["memory"]
    if errors.get("errors"):
        report.setdefault("errors", []).extend(errors["errors"])


def _describe(workload: Workload, studies: list[Any]) -> dict[str, Any]:
    spec = workload.specs[0]
    return {
        "model": workload.model,
        "modality": workload.modality,
        "input": f"{spec.modality} {spec.size_label} {'16-bit ' if spec.modality not in VOLUMES else ''}"
        f"{spec.payload.upper()}, spacing {'/'.join(map(str, spec.spacing_mm))} mm",
        "studies": len(studies),
        "payload_mb": round(sum(s.payload_bytes for s in studies) / len(studies) / 1e6, 2),
        "images_per_study": spec.n_images,
        "direct_from": workload.direct_from,
    }


def _best_service(entry: dict[str, Any], concurrency: int | None = None) -> dict[str, Any] | None:
    rows = [r for r in entry.get("service", []) if concurrency is None or r["concurrency"] == concurrency]
    return max(rows, key=lambda r: r["studies_per_s"] or 0.0) if rows else None


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The headline ratios, with the workload each comes from and PASS / MISS against the targets."""
    kind = "cuda" if report["device"].startswith("cuda") else "cpu"
    targets = TARGETS[kind]
    summary: dict[str, Any] = {}
    ratios = []
    for name, entry in report["workloads"].items():
        source = report["workloads"].get(entry.get("direct_from") or name, {})
        service = _best_service(entry, 8) or _best_service(entry)
        if "direct" not in source or service is None:
            continue
        ratio = service["studies_per_s"] / source["direct"]["studies_per_s"]
        item = {
            "workload": name,
            "concurrency": service["concurrency"],
            "ratio": round(ratio, 3),
            "target": targets["service_over_direct"],
            "pass": ratio >= targets["service_over_direct"],
        }
        if "naive" in source:
            item["over_naive"] = round(service["studies_per_s"] / source["naive"]["studies_per_s"], 2)
        ratios.append(item)
    summary["service_over_direct_by_workload"] = ratios
    ct = [r for r in ratios if report["workloads"][r["workload"]]["modality"] == "CT"]
    if ct:  # the headline: the first CT workload of the profile (DICOM, the archive's path)
        summary["service_over_direct"] = ct[0]
        if "over_naive" in ct[0]:
            ratio = ct[0]["over_naive"]
            summary["service_over_naive"] = {"workload": ct[0]["workload"], "ratio": ratio}
            if "service_over_naive" in targets:
                summary["service_over_naive"] |= {
                    "target": targets["service_over_naive"],
                    "pass": ratio >= targets["service_over_naive"],
                }
    dx = [name for name, e in report["workloads"].items() if e.get("model") == "chest_xray"]
    if dx:
        name = dx[0]  # the smallest X-ray size comes first in every profile
        entry = report["workloads"][name]
        one, eight = _best_service(entry, 1), _best_service(entry, 8)
        if one and eight:
            ratio = eight["images_per_s"] / one["images_per_s"]
            target = TARGETS["cpu"]["batching_x8_over_x1"]
            summary["batching_x8_over_x1"] = {
                "workload": name,
                "ratio": round(ratio, 3),
                "target": target,
                "pass": ratio >= target,
            }
        rows = [_best_service(e) for e in report["workloads"].values() if e.get("model") == "chest_xray"]
        best = max((r for r in rows if r), key=lambda r: r["images_per_s"] or 0.0, default=None)
        if kind == "cuda" and best is not None:
            name = next(n for n, e in report["workloads"].items() if best in e.get("service", []))
            summary["xray_images_per_s"] = {
                "workload": name,
                "concurrency": best["concurrency"],
                "images_per_s": best["images_per_s"],
                "target": targets["xray_images_per_s"],
                "pass": best["images_per_s"] >= targets["xray_images_per_s"],
            }
    else:
        summary["batching_x8_over_x1"] = {"skipped": "; ".join(n for n in report["notes"] if "chest_xray" in n)}
    if report.get("memory"):
        worst = max(report["memory"], key=lambda m: m["peak_per_in_flight_over_raw"] or 0.0)
        summary["memory_over_raw"] = {
            "per_concurrency": {m["concurrency"]: m["peak_per_in_flight_over_raw"] for m in report["memory"]},
            "per_concurrency_excluding_pinned": {
                m["concurrency"]: m.get("peak_per_in_flight_excluding_pinned_over_raw") for m in report["memory"]
            },
            "worst": worst["peak_per_in_flight_over_raw"],
            "target": TARGETS["memory_over_raw"],
            "pass": (worst["peak_per_in_flight_over_raw"] or 0.0) <= TARGETS["memory_over_raw"],
        }
    if "ingest" in report:
        paths = report["ingest"]["paths"]
        streamed = max((v["gb_per_s"] for k, v in paths.items() if k.startswith("stream")), default=0.0)
        zero_copy = max((paths[k]["gb_per_s"] for k in ("shm", "file") if k in paths), default=0.0)
        summary["ingest_stream_gb_per_s"] = {
            "value": streamed,
            "target": TARGETS["stream_gb_per_s"],
            "pass": streamed >= TARGETS["stream_gb_per_s"],
        }
        summary["ingest_zero_copy_gb_per_s"] = {
            "value": zero_copy,
            "target": TARGETS["zero_copy_gb_per_s"],
            "pass": zero_copy >= TARGETS["zero_copy_gb_per_s"],
        }
    return summary


def _verdict(item: dict[str, Any]) -> str:
    if "pass" not in item:
        return ""
    return "PASS" if item["pass"] else "MISS"


def table(report: dict[str, Any]) -> str:
    """The printed table (also the body of <profile>.md)."""
    m = report["machine"]
    lines = [
        f"radserve benchmark, profile {report['profile']}: {report['device']}, {m['cpus']} CPUs"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f"; load average {report['load_avg_before'][0]} before, {report.get('load_avg_after', ['?'])[0]} after;"
        f" commit {report['commit']}; {report['date']}",
        "",
        "| workload | input | path | concurrency | studies/s | images/s | p50 ms | p95 ms | p99 ms | CPU s/study"
        " | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in report["workloads"].items():
        rows = [("direct", entry["direct"])] if "direct" in entry else []
        rows += [("service", row) for row in entry.get("service", [])]
        rows += [("naive", entry["naive"])] if "naive" in entry else []
        for path, row in rows:
            lat = row["latency_ms"]
            cpu = row.get("cpu") or {}
            errors = f" ({row['errors']} errors)" if row.get("errors") else ""
            tail = f"{lat['p95']:.0f} | {lat['p99']:.0f}" if path == "service" else " | "
            load = cpu.get("load_avg_1m_start", row.get("load_avg_1m_start", ""))
            per_study = cpu.get("cpu_s_per_study")
            lines.append(
                f"| {name} | {entry.get('input', '?')} | {path}{errors} | {row.get('concurrency', 1)} "
                f"| {row['studies_per_s']:.3f} | {row['images_per_s']:.1f} | {lat['p50']:.0f} | {tail} "
                f"| {'' if per_study is None else f'{per_study:.2f}'} | {load} |"
            )
    lines += [
        "",
        "CPU s/study: CPU time per study of the server and the load generator together (service), of the benchmark "
        "process (direct, naive). load: the 1-minute load average when the row started.",
        "",
    ]
    stage_rows = []
    for name, entry in report["workloads"].items():
        for row in entry.get("service", []):
            stages = ", ".join(f"{k} {v:.0f}" for k, v in row["stages_ms"].items())
            stage_rows.append(f"- {name} c={row['concurrency']}: {stages}")
    if stage_rows:
        lines += ["Server stages (mean ms per read, from the server's timing_ms):", "", *stage_rows, ""]
    s = report["summary"]
    if "service_over_direct" in s:
        item = s["service_over_direct"]
        lines.append(f"service/direct: {item['ratio']:.2f}")
        lines.append(
            f"  ({item['workload']}, service at concurrency {item['concurrency']} vs direct; "
            f"target >= {item['target']}: {_verdict(item)})"
        )
    for item in s.get("service_over_direct_by_workload", []):
        if item is not s.get("service_over_direct"):
            lines.append(
                f"  service/direct ({item['workload']}, concurrency {item['concurrency']}): {item['ratio']:.2f} "
                f"(target >= {item['target']}: {_verdict(item)})"
            )
    if "service_over_naive" in s:
        item = s["service_over_naive"]
        target = f"; target >= {item['target']}: {_verdict(item)}" if "target" in item else ""
        lines.append(f"service/naive: {item['ratio']:.2f}  ({item['workload']}{target})")
    item = s.get("batching_x8_over_x1", {})
    if "ratio" in item:
        lines.append(f"batching x8/x1 (chest_xray): {item['ratio']:.2f}")
        lines.append(
            f"  ({item['workload']} images/s, concurrency 8 vs 1; target >= {item['target']}: {_verdict(item)})"
        )
    elif "skipped" in item:
        lines.append(f"batching x8/x1 (chest_xray): skipped ({item['skipped'] or 'no X-ray workload'})")
    if "xray_images_per_s" in s:
        item = s["xray_images_per_s"]
        lines.append(
            f"chest_xray images/s over gRPC: {item['images_per_s']:.0f} ({item['workload']}, concurrency "
            f"{item['concurrency']}; target >= {item['target']:.0f}: {_verdict(item)})"
        )
    if "memory_over_raw" in s:
        item = s["memory_over_raw"]
        per = ", ".join(f"concurrency {c}: {v or 0.0:.2f}x" for c, v in item["per_concurrency"].items())
        size = "x".join(map(str, INGEST[report["profile"]][0]))
        lines.append(
            f"memory per in-flight study: {per} its raw voxel bytes ({size} int16 streamed; "
            f"target <= {item['target']}x: {_verdict(item)})"
        )
        pinned = [m for m in report["memory"] if m.get("pinned_mb_after") is not None]
        if pinned:
            lines.append(
                "  the server's resident memory includes the pinned staging buffers of GPU preprocessing (rounded up "
                "to a power of two, kept between reads): "
                + ", ".join(f"{m['pinned_mb_after']:.0f} MiB after concurrency {m['concurrency']}" for m in pinned)
                + "; without what they grew by during each run: "
                + ", ".join(
                    f"concurrency {m['concurrency']}: {m['peak_per_in_flight_excluding_pinned_over_raw']:.2f}x"
                    for m in pinned
                )
            )
    if "ingest" in report:
        study = report["ingest"]["study"]
        size = "x".join(map(str, study["shape"]))
        paths = ", ".join(f"{k} {v['gb_per_s']:.2f}" for k, v in report["ingest"]["paths"].items())
        lines.append(f"ingest GB/s (server receive+decode, {size} int16): {paths}")
        lines.append(
            f"  (streamed target >= {TARGETS['stream_gb_per_s']}: {_verdict(s['ingest_stream_gb_per_s'])}; "
            f"zero-copy target >= {TARGETS['zero_copy_gb_per_s']}: {_verdict(s['ingest_zero_copy_gb_per_s'])})"
        )
    for name, item in (report.get("compile") or {}).items():
        if "error" in item:
            lines.append(f"torch.compile ({name}): failed: {item['error']}")
        else:
            lines.append(
                f"torch.compile ({name}, batch {item['batch_size']}, {item['autocast']}): "
                f"{item['compiled_batches_per_s']:.1f} vs {item['eager_batches_per_s']:.1f} batches/s eager "
                f"(x{item['speedup']:.2f}), compiled in {item['compile_s']:.0f} s"
            )
    for name, entry in report["workloads"].items():
        lines += [f"error: {name} {item['part']} failed: {item['error']}" for item in entry.get("errors", [])]
    lines += [f"error: {item['part']} failed: {item['error']}" for item in report.get("errors", [])]
    lines += [f"note: {n}" for n in report["notes"]]
    lines.append(f"wall time {report['wall_s']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--device", default="cpu", help="auto|cpu|cuda, for the server and the baselines")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench", help="results folder (gitignored)")
    parser.add_argument(
        "--cache", type=Path, default=ROOT / "runs" / "bench-cache", help="the studies, written once (not results)"
    )
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting parts after this long")
    parser.add_argument("--io-threads", type=int, default=0, help="server io_threads (default: its own)")
    parser.add_argument("--compile", action="store_true", help="serve with torch.compile (CUDA)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these workloads")
    parser.add_argument("--no-naive", action="store_true")
    parser.add_argument("--no-ingest", action="store_true")
    args = parser.parse_args(argv)
    from inference.platform import select_device

    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    report = new_report(args, select_device(args.device))

    def save() -> None:
        write_report(report, args.out, started)

    def stop(signum: int, frame: Any) -> None:
        # Write what was measured first: the step's SIGKILL follows within seconds, and on a loaded machine the
        # unwinding (stopping the server, a baseline's thread) may not get that far.
        error = RunInterruptedError(f"signal {signal.Signals(signum).name}")
        report["stopped"] = error_text(error)
        report["notes"].append(f"run stopped early: {error_text(error)}")
        save()
        raise error

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        run(args, report, save)
    except (Exception, KeyboardInterrupt, RunInterruptedError) as exc:  # what was measured is still written
        if "stopped" not in report:  # (the SIGTERM handler has said so already)
            report["stopped"] = error_text(exc)
            report["notes"].append(f"run stopped early: {error_text(exc)}")
        log(f"run stopped early: {error_text(exc)}")
    finally:
        signal.signal(signal.SIGTERM, previous)
        save()
    print(table(report))
    log(f"wrote {args.out / (args.profile + '.json')} and {args.out / (args.profile + '.md')}")
    if "stopped" in report:  # the server is stopped and the results written: end now, whatever thread still runs
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    failed_reads = sum(sum(r["errors"].values()) for e in report["workloads"].values() for r in e.get("service", []))
    failed_parts = sum(len(e.get("errors", [])) for e in report["workloads"].values()) + len(report.get("errors", []))
    return 1 if failed_reads or failed_parts or "stopped" in report else 0


if __name__ == "__main__":
    raise SystemExit(main())
