"""Does ``torch.compile`` pay? The network forward alone, eager vs compiled, at the batch sizes the server uses.

For each model with weights, smallest input first: the time to compile (warm-up at batch sizes 1, 2 and
``max_batch_size``, as ``ModelRunner.warmup`` does), the graphs dynamo compiled (so that a run which silently fell
back to eager cannot pass for a compiled one), then forward passes per second at ``max_batch_size``, eager and
compiled, under the model's autocast. CUDA by default; ``--device cpu`` runs the same steps on the CPU (the GPU
run's rehearsal, ``gpu_run.sh --dry-run``; figures there mean nothing).

The GPU run gives it its own step and timeout (compiling took 25-81 s per model on a 2-core CPU), and the JSON is
rewritten after every model and when SIGTERM ends the run, so a timeout keeps the models already measured.

    python -m benchmarks.compile_check --models models --json compile.json --budget-s 100
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch


def log(message: str) -> None:
    print(f"[compile] {message}", file=sys.stderr, flush=True)


def _time_forward(backend: Any, batch: torch.Tensor, seconds: float = 3.0) -> float:
    """Forward passes per second (each ends with a host copy of one output, as split_outputs makes)."""
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        out = backend.forward(batch)
        first = out[next(iter(out))][0] if isinstance(out, dict) else out[0]
        first.float().sum().item()
        n += 1
    return n / (time.perf_counter() - start)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process (``torch._dynamo``'s own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def check_model(config: Any, device: torch.device, *, max_batch: int | None = None, timing_s: float = 3.0) -> dict:
    """Compile one model's network and time it against the eager one (see the module docstring)."""
    from inference.backends.torch import TorchBackend
    from inference.tasks import task_class

    task = task_class(config)(config, device)
    size = config.batching.max_batch_size if max_batch is None else min(max_batch, config.batching.max_batch_size)
    batch = torch.rand((size, *task.item_shape), device=device)
    eager = TorchBackend.from_weights(task.build_network(), config.weights_path, device, autocast=config.autocast)
    compiled = TorchBackend.from_weights(task.build_network(), config.weights_path, device, autocast=config.autocast)
    compiled.enable_compile(on_cpu=True)
    entry: dict[str, Any] = {"batch_size": size, "autocast": config.autocast, "item_shape": list(task.item_shape)}
    try:
        graphs = compiled_graphs()
        start = time.perf_counter()
        for n in sorted({1, min(2, size), size}):
            compiled.forward(batch[:n])
        batch.sum().item()  # waits for the queued kernels
        entry["compile_s"] = round(time.perf_counter() - start, 1)
        entry["graphs_compiled"] = compiled_graphs() - graphs
        _time_forward(eager, batch, min(1.0, timing_s))
        entry["eager_batches_per_s"] = round(_time_forward(eager, batch, timing_s), 2)
        entry["compiled_batches_per_s"] = round(_time_forward(compiled, batch, timing_s), 2)
        entry["speedup"] = round(entry["compiled_batches_per_s"] / entry["eager_batches_per_s"], 3)
        if not entry["graphs_compiled"]:
            entry["error"] = "dynamo compiled no graph: the 'compiled' network ran eagerly"
    except Exception as exc:  # e.g. no C compiler for Triton on the machine
        entry["error"] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
    return entry


def compile_check(
    models: Path,
    device: torch.device,
    *,
    json_path: Path | None = None,
    budget_s: float | None = None,
    only: list[str] | None = None,
    max_batch: int | None = None,
    timing_s: float = 3.0,
) -> dict[str, Any]:
    """``{model: entry}`` for the models of ``models``, smallest input first; written to ``json_path`` after each."""
    from inference.modelrepo.repository import scan_repository

    deadline = None if budget_s is None else time.monotonic() + budget_s
    configs = [c for c in scan_repository(models).configs if not only or c.name in only]
    # 2-D first, then by the voxels of a full batch: the quickest compilations first
    configs.sort(key=lambda c: (len(c.inferer.roi_size), math.prod(c.inferer.roi_size) * c.batching.max_batch_size))
    report: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "models": {}, "notes": []}

    def save() -> None:
        if json_path is not None:
            partial = json_path.with_name(json_path.name + ".partial")
            partial.write_text(json.dumps(report, indent=2))
            partial.replace(json_path)

    for config in configs:
        if deadline is not None and time.monotonic() > deadline:
            report["notes"].append(f"{config.name}: skipped, the budget of {budget_s:.0f} s was spent")
            continue
        log(f"{config.name}: compiling for batch sizes 1, 2, max on {device}")
        try:
            entry = report["models"][config.name] = check_model(config, device, max_batch=max_batch, timing_s=timing_s)
        except KeyboardInterrupt:  # SIGTERM (main): keep the models done, say which one was cut
            report["notes"].append(f"{config.name}: stopped while compiling or timing (SIGTERM)")
            save()
            raise
        log(f"{config.name}: {entry}")
        save()
    save()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--device", default="cuda", help="cuda (the figures), or cpu (a rehearsal of the steps)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--budget-s", type=float, default=None, help="start no model after this long")
    parser.add_argument("--only", nargs="*", default=None, help="these models only")
    parser.add_argument("--max-batch", type=int, default=None, help="cap the batch size (a quick rehearsal)")
    parser.add_argument("--timing-s", type=float, default=3.0, help="seconds of forward passes per figure")
    args = parser.parse_args(argv)
    from inference.platform import select_device

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, stop)
    report: dict[str, Any] = {}
    try:
        report = compile_check(
            args.models,
            select_device(args.device),
            json_path=args.json,
            budget_s=args.budget_s,
            only=args.only,
            max_batch=args.max_batch,
            timing_s=args.timing_s,
        )
    except KeyboardInterrupt as exc:
        log(f"stopped: {exc}")
        sys.stderr.flush()
        os._exit(1)  # inductor's compile workers would hold the exit until the step's SIGKILL
    print(json.dumps(report, indent=2))
    return 1 if not report["models"] or any("error" in e for e in report["models"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
