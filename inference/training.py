"""What the training scripts (``models/*/train.py``) share: seeded random streams, padded crops, the learning-rate
schedule, one-to-one matching by score, reading-time measurement, the run's machine and writing ``model.yaml``.

A development tool on top of the server's packages (it imports torch and the engine), never imported by the server.
Each script keeps what is its own: data, augmentation, losses, threshold tuning, metrics and its model card. Moving a
helper here must not change what a script writes: the same seed still gives the same weights and metrics.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from inference.io.volume import Volume
from inference.modelrepo.schema import ModelConfig
from inference.tasks.base import Task
from inference.tasks.direct import run_direct

# One independent random stream per use, so that e.g. more validation studies leave the training data unchanged.
RNG_STREAMS = {"train": 0, "crops": 1, "val": 2, "test": 3, "timing": 4}


def rng_stream(seed: int, stream: str) -> np.random.Generator:
    """The generator of ``stream`` (a key of RNG_STREAMS) for ``seed``."""
    return np.random.default_rng([seed, RNG_STREAMS[stream]])


def setup(threads: int) -> None:
    """INFO logging with timestamps, and the torch thread count the run's timings are stated for."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(threads)


def crop_with_padding(image: torch.Tensor, origin: np.ndarray, size: Sequence[int], pad_value: float) -> torch.Tensor:
    """``image[:, origin : origin + size]`` where the window may reach outside the image (filled with pad_value)."""
    out = torch.full((image.shape[0], *size), pad_value, dtype=torch.float32)
    shape = np.asarray(image.shape[1:])
    src_lo = np.maximum(origin, 0)
    src_hi = np.minimum(origin + np.asarray(size), shape)
    if np.all(src_hi > src_lo):
        dst_lo = src_lo - origin
        dst_hi = dst_lo + (src_hi - src_lo)
        out[(slice(None), *(slice(a, b) for a, b in zip(dst_lo, dst_hi, strict=True)))] = image[
            (slice(None), *(slice(a, b) for a, b in zip(src_lo, src_hi, strict=True)))
        ].float()
    return out


def warmup_cosine(step: int, *, warmup: int, total: int, floor: float = 0.02) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay from 1 to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def match_by_score(
    finding_centers: Sequence[Sequence[float]],
    scores: Sequence[float],
    lesion_centers: Sequence[Sequence[float]],
    tolerance_mm: float,
) -> tuple[list[int | None], list[float | None], int]:
    """One-to-one matching at a fixed distance, findings taken by decreasing score.

    Each finding takes the unmatched lesion within ``tolerance_mm`` of its center (the last of equally near ones);
    a finding that finds none is a false positive. Returns, per lesion, the index of its finding and their distance
    (None: missed), and the number of false positives. ``inference.evaluation`` holds the service's own rule
    (radius-scaled, per label); this is the training scripts' validation and test rule.
    """
    order = sorted(range(len(finding_centers)), key=lambda n: -scores[n])
    matched: list[int | None] = [None] * len(lesion_centers)
    distances: list[float | None] = [None] * len(lesion_centers)
    false_positives = 0
    for n in order:
        best, best_d = None, tolerance_mm
        for m, lesion_center in enumerate(lesion_centers):
            d = float(np.linalg.norm(np.subtract(finding_centers[n], lesion_center)))
            if matched[m] is None and d <= best_d:
                best, best_d = m, d
        if best is None:
            false_positives += 1
        else:
            matched[best], distances[best] = n, best_d
    return matched, distances, false_positives


def time_reads(task: Task, network: torch.nn.Module, volumes: Sequence[Volume], batch_size: int) -> list[float]:
    """Wall time of ``run_direct`` (the service's prepare, batched forward and finalize) on each volume, after one
    warm-up read of the first."""
    run_direct(task, network, volumes[0], batch_size=batch_size)
    times = []
    for volume in volumes:
        start = time.perf_counter()
        run_direct(task, network, volume, batch_size=batch_size)
        times.append(time.perf_counter() - start)
    return times


def machine_info() -> dict[str, Any]:
    """The machine a run's timings come from, as metrics.json states it."""
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__}


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or f"{platform.machine()} CPU"


def write_model_yaml(path: Path, data: Mapping[str, Any], header: str) -> ModelConfig:
    """Write ``data`` as model.yaml under the comment ``header`` (lines starting with #) and load it back validated."""
    path.write_text(header + yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=None, width=120))
    return ModelConfig.from_yaml(path)
