"""One loaded model version: its Task, its Backend and its DynamicBatcher.

A read runs prepare (decode-side CPU work, in the I/O thread pool), then hands its work items to the
batcher, whose worker thread runs ``backend.forward`` + ``task.split_outputs`` on batches mixed from
many reads, then finalize (in the I/O pool). The event loop itself never does heavy work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from inference.backends.base import Backend
from inference.engine.batcher import DynamicBatcher
from inference.engine.scheduler import Priority
from inference.engine.task import Task
from inference.io.volume import Volume
from inference.modelrepo.schema import ModelConfig
from inference.postprocess.finding import Finding

logger = logging.getLogger(__name__)


@dataclass
class ReadResult:
    findings: list[Finding]
    timing_ms: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    masks: dict[str, np.ndarray] | None = None  # label -> bool mask in the input grid (segmentation models)


class ModelRunner:
    def __init__(self, config: ModelConfig, task: Task, backend: Backend, io_executor: Executor | None = None) -> None:
        self.config = config
        self.task = task
        self.backend = backend
        self._io_executor = io_executor
        self.batcher = DynamicBatcher(
            f"{config.name}:{config.version}", self._forward, config.batching, item_shape=task.item_shape
        )

    @property
    def key(self) -> str:
        return f"{self.config.name}:{self.config.version}"

    @property
    def device(self) -> torch.device:
        return self.backend.device

    def _forward(self, batch: torch.Tensor) -> list[Any]:
        return self.task.split_outputs(self.backend.forward(batch), batch.shape[0])

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self, *, drain: bool = True) -> None:
        await self.batcher.stop(drain=drain)
        self.backend.close()

    def warmup(self) -> float:
        """Run one forward pass on zeros (allocator, kernels, lazy init). Returns its time in ms."""
        start = time.perf_counter()
        self._forward(torch.zeros((1, *self.task.item_shape), device=self.backend.device))
        elapsed_ms = (time.perf_counter() - start) * 1e3
        logger.info("model %s warmed up on %s in %.0f ms", self.key, self.backend.device, elapsed_ms)
        return elapsed_ms

    async def read(
        self,
        volume: Volume,
        *,
        request_id: str,
        priority: Priority = Priority.ROUTINE,
        deadline_s: float | None = None,
    ) -> ReadResult:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        prepared = await loop.run_in_executor(self._io_executor, self.task.prepare, volume)
        timing = {"preprocess": (time.perf_counter() - start) * 1e3, **prepared.timing_ms}
        start = time.perf_counter()
        results = await self.batcher.submit(request_id, prepared.items, priority=priority, deadline_s=deadline_s)
        timing["infer"] = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        findings = await loop.run_in_executor(self._io_executor, self.task.finalize, volume, prepared, results)
        timing["postprocess"] = (time.perf_counter() - start) * 1e3
        logger.debug("request %s: %d items, %d findings", request_id, len(prepared.items), len(findings))
        return ReadResult(findings, timing, list(volume.warnings), self.task.masks(prepared))
