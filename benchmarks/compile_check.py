"""Does ``torch.compile`` pay? The network forward alone, eager vs compiled, at the batch sizes the server uses.

For each model with weights: the time to compile (warm-up at batch sizes 1, 2 and ``max_batch_size``, as
``ModelRunner.warmup`` does), then forward passes per second at ``max_batch_size``, eager and compiled, under the
model's autocast. CUDA only (the CPU has nothing to gain for these small networks); returns None elsewhere.

    python -m benchmarks.compile_check --models models
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch


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


def compile_check(models: Path, device: torch.device) -> dict[str, Any] | None:
    from inference.backends.torch import TorchBackend
    from inference.modelrepo.registry import task_class
    from inference.modelrepo.repository import scan_repository

    if device.type != "cuda":
        return None
    report: dict[str, Any] = {}
    for config in scan_repository(models).configs:
        task = task_class(config)(config, device)
        size = config.batching.max_batch_size
        batch = torch.rand((size, *task.item_shape), device=device)
        eager = TorchBackend.from_weights(task.build_network(), config.weights_path, device, autocast=config.autocast)
        compiled = TorchBackend.from_weights(
            task.build_network(), config.weights_path, device, autocast=config.autocast, compile=True
        )
        entry: dict[str, Any] = {"batch_size": size, "autocast": config.autocast, "item_shape": list(task.item_shape)}
        try:
            start = time.perf_counter()
            for n in sorted({1, min(2, size), size}):
                compiled.forward(batch[:n])
            batch.sum().item()  # waits for the queued kernels
            entry["compile_s"] = round(time.perf_counter() - start, 1)
            _time_forward(eager, batch, 1.0)
            entry["eager_batches_per_s"] = round(_time_forward(eager, batch), 2)
            entry["compiled_batches_per_s"] = round(_time_forward(compiled, batch), 2)
            entry["speedup"] = round(entry["compiled_batches_per_s"] / entry["eager_batches_per_s"], 3)
        except Exception as exc:  # e.g. no C compiler for Triton on the machine
            entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        report[config.name] = entry
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from inference.platform import select_device

    report = compile_check(args.models, select_device("auto"))
    print(json.dumps(report, indent=2) if report is not None else "compile check: CUDA only; skipped")
    if args.json and report is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
