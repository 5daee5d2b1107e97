"""Run a Task end to end in-process, without the server: training evaluation and benchmark baselines.

The same stages as a read through the service (prepare -> batched forward -> split_outputs -> finalize),
minus the queueing, so findings match what the service returns for the same weights.
"""

from __future__ import annotations

from typing import Any

import torch

from inference.io.volume import Volume
from inference.outputs.finding import Finding
from inference.platform import autocast_dtype, pairs_lone_item
from inference.tasks.base import Task, TaskResult

__all__ = ["forward_items", "load_network", "run_direct", "run_direct_result"]


def load_network(task: Task) -> torch.nn.Module:
    """The task's network with the model version's weights, in eval mode on the task's device."""
    return task.load_network()


def forward_items(task: Task, network: torch.nn.Module, items: list[torch.Tensor], batch_size: int = 4) -> list[Any]:
    """Forward ``items`` in batches of ``batch_size`` (autocast, and a lone 3-D item on the CPU as a pair, as the
    service does) and split the outputs."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = task.device
    dtype = autocast_dtype(device, task.config.autocast)
    results: list[Any] = []
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            n = len(chunk)
            if n == 1 and pairs_lone_item(device, chunk[0]):  # as the service does (ModelRunner._forward)
                chunk = [chunk[0], chunk[0]]
            batch = torch.stack(chunk).to(device)
            if dtype is None:
                outputs = network(batch)
            else:
                with torch.autocast(device_type=device.type, dtype=dtype):
                    outputs = network(batch)
            results.extend(task.split_outputs(outputs, batch.shape[0])[:n])
    return results


def run_direct(task: Task, network: torch.nn.Module, volume: Volume, batch_size: int = 4) -> list[Finding]:
    """Read one study: prepare, forward the items in batches of ``batch_size``, split, finalize. The findings."""
    return run_direct_result(task, network, volume, batch_size).findings


def run_direct_result(task: Task, network: torch.nn.Module, volume: Volume, batch_size: int = 4) -> TaskResult:
    """As :func:`run_direct`, with the masks of a task that segments."""
    prepared = task.prepare(volume)
    results = forward_items(task, network, prepared.items, batch_size)
    return task.finalize(volume, prepared, results)
