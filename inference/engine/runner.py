"""One loaded model version: its Task, its Backend and its DynamicBatcher.

A read runs prepare (decode-side CPU work, in the I/O thread pool), then hands its work items to the
batcher, whose worker thread runs ``backend.forward`` + ``task.split_outputs`` on batches mixed from
many reads, then finalize (in the I/O pool). The event loop itself never does heavy work.

Out of GPU memory (``torch.OutOfMemoryError``) anywhere in a read's GPU work is handled here and nowhere else:

* stacking the items into a batch, or the forward pass (:meth:`ModelRunner._forward`): the backend's cache is
  emptied and the batch retried in halves down to single items; a single item that still does not fit runs on a
  CPU copy of the network when ``oom_cpu_fallback`` allows, else its read alone fails with
  :class:`LimitExceededError` (RESOURCE_EXHAUSTED). The other reads of the batch and later reads go on.
* preparing the study (:meth:`ModelRunner._prepare`: preprocessing on the device, patch extraction): the cache is
  emptied and the read fails with :class:`LimitExceededError`; it holds no other read's work.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from inference.backends.base import Backend
from inference.engine.batcher import DynamicBatcher
from inference.engine.scheduler import Priority
from inference.errors import LimitExceededError
from inference.io.volume import Volume
from inference.modelrepo.schema import ModelConfig
from inference.outputs.finding import Finding, FindingMask
from inference.platform import OOM_ERRORS
from inference.tasks.base import PreparedStudy, Task

logger = logging.getLogger(__name__)


@dataclass
class ReadResult:
    """A read's outcome: the task's findings and masks together, the study's geometry, timings and warnings."""

    findings: list[Finding]
    timing_ms: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    masks: list[FindingMask] | None = None  # masks[n]: the voxels of findings[n] (segmentation); None: boxes only
    # The study without its voxels (:func:`without_voxels`): what the SR, SEG and FHIR outputs need of it.
    volume: Volume | None = None


def without_voxels(volume: Volume) -> Volume:
    """``volume`` with its voxels released: a read-only, zero-stride stand-in of the same shape (4 bytes).

    Once a study is prepared, only its geometry (shape, affine, source references) is needed (finalize, SR,
    SEG); dropping the decoded float32 voxels (2x the study's 16-bit bytes) while the model runs is most of the
    per-read memory (docs/decisions.md, "Memory per read").
    """
    return dataclasses.replace(volume, voxels=np.broadcast_to(np.zeros((), dtype=np.float32), volume.shape))


class ModelRunner:
    def __init__(
        self,
        config: ModelConfig,
        task: Task,
        backend: Backend,
        io_executor: Executor | None = None,
        *,
        oom_cpu_fallback: bool = True,
        weights_sha256: str = "",
    ) -> None:
        self.config = config
        self.task = task
        self.backend = backend
        self._io_executor = io_executor
        self.oom_cpu_fallback = oom_cpu_fallback
        # SHA-256 of the weights file this runner loaded ("" when unknown, e.g. on Triton): part of the identity of the
        # DICOM outputs it produces (their UIDs, inference.outputs.uids).
        self.weights_sha256 = weights_sha256
        # torch.compile the network at warm-up (model.yaml `compile`, or the server's --compile for all models).
        self.compile = config.compile
        self.batcher = DynamicBatcher(
            f"{config.name}:{config.version}",
            self._forward,
            config.batching,
            item_shape=task.item_shape,
            stack_items=False,  # _forward stacks them, within its out-of-memory handling
        )

    @property
    def key(self) -> str:
        return f"{self.config.name}:{self.config.version}"

    @property
    def device(self) -> torch.device:
        return self.backend.device

    def _forward(self, items: Sequence[torch.Tensor]) -> list[Any]:
        """Stack ``items`` into a batch, forward it and split the outputs per item (in the batcher's worker
        thread), surviving out-of-memory errors in the stack as in the forward pass. A lone item the backend
        runs faster as a pair (:meth:`~inference.backends.base.Backend.pairs_lone_item`) is forwarded twice over."""
        n = len(items)
        try:
            if n == 1 and self.backend.pairs_lone_item(items[0]):  # the CPU's slow batch of one 3-D item
                return self.task.split_outputs(self.backend.forward(torch.stack([items[0], items[0]])), 2)[:1]
            return self.task.split_outputs(self.backend.forward(torch.stack(list(items))), n)
        except OOM_ERRORS:
            pass  # recover outside the except block, so that the error's frames and their tensors are freed
        self.backend.release_cached_memory()
        if n > 1:
            logger.warning("model %s: out of memory on a batch of %d items; retrying in halves", self.key, n)
            return self._forward(items[: n // 2]) + self._forward(items[n // 2 :])
        if self.oom_cpu_fallback and self.backend.can_fall_back_to_cpu:
            logger.warning("model %s: out of memory on a single item; running it on a CPU copy", self.key)
            try:  # the item is copied to the host and batched there: nothing more is allocated on the GPU
                return self.task.split_outputs(self.backend.forward_on_cpu(items[0].to("cpu")[None]), 1)
            except OOM_ERRORS:
                pass
        raise LimitExceededError(
            f"model {self.key} ran out of memory on a single work item (batch of 1); retry later or on a larger device"
        )

    def _prepare(self, volume: Volume) -> PreparedStudy:
        """``task.prepare`` (in an I/O thread). Out of GPU memory there (preprocessing on the device, patches)
        fails this read alone with RESOURCE_EXHAUSTED, once the cached blocks are returned."""
        try:
            return self.task.prepare(volume)
        except OOM_ERRORS:
            pass  # outside the except block: the error's frames, holding the study's device tensors, are freed
        self.backend.release_cached_memory()
        shape = "x".join(str(s) for s in volume.shape)
        raise LimitExceededError(
            f"model {self.key} ran out of GPU memory preparing a {shape} study; retry later or on a larger device"
        )

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self, *, drain: bool = True) -> None:
        await self.batcher.stop(drain=drain)
        self.backend.close()

    def warmup(self) -> float:
        """Forward passes on zeros (allocator, kernels, lazy init). Returns their time in ms.

        A compiled network (``torch.compile``) is warmed up with batch sizes 1, 2 and ``max_batch_size``: 1 is
        specialised, 2 makes the batch dimension dynamic, which then covers every size up to the largest. If
        compilation fails (e.g. no C compiler for Triton), the network runs eagerly and the error is logged.
        """
        start = time.perf_counter()
        if self.compile:
            self.backend.enable_compile()
        sizes = [1]
        if self.backend.compiled:
            sizes = sorted({1, min(2, self.config.batching.max_batch_size), self.config.batching.max_batch_size})
        try:
            for size in sizes:
                self._forward([torch.zeros(self.task.item_shape, device=self.backend.device)] * size)
        except Exception:
            if not self.backend.compiled:
                raise
            logger.exception("model %s: torch.compile failed during warm-up; running eagerly", self.key)
            self.backend.disable_compile()
            self._forward([torch.zeros(self.task.item_shape, device=self.backend.device)])
        elapsed_ms = (time.perf_counter() - start) * 1e3
        logger.info(
            "model %s warmed up on %s in %.0f ms (batch sizes %s%s)",
            self.key,
            self.backend.device,
            elapsed_ms,
            sizes,
            ", compiled" if self.backend.compiled else "",
        )
        return elapsed_ms

    async def read(
        self,
        volume: Volume,
        *,
        request_id: str,
        priority: Priority = Priority.ROUTINE,
        deadline_s: float | None = None,
    ) -> ReadResult:
        """Prepare, batch and finalize one study. The runner is the one place that lets go of its voxels: once it
        is prepared, only its geometry is kept (``ReadResult.volume``); a caller should not hold the study meanwhile."""
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        prepared = await loop.run_in_executor(self._io_executor, self._prepare, volume)
        volume = without_voxels(volume)  # prepared: from here on only the geometry is needed
        timing = {"preprocess": (time.perf_counter() - start) * 1e3, **prepared.timing_ms}
        start = time.perf_counter()
        results = await self.batcher.submit(request_id, prepared.items, priority=priority, deadline_s=deadline_s)
        timing["infer"] = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        output = await loop.run_in_executor(self._io_executor, self.task.finalize, volume, prepared, results)
        timing["postprocess"] = (time.perf_counter() - start) * 1e3
        logger.debug("request %s: %d items, %d findings", request_id, len(prepared.items), len(output.findings))
        return ReadResult(output.findings, timing, list(volume.warnings), output.masks, volume)

    async def read_in_background(
        self,
        volume: Volume,
        *,
        request_id: str,
        executor: Executor,
        wait_turn: Callable[[], Awaitable[None]],
        items_per_turn: int = 1,
    ) -> ReadResult:
        """A read below all live work (a shadow version's copy of a live read, inference.serving.shadow): prepare and
        finalize run in ``executor`` (not the I/O threads live reads use), and the work items go to the batcher at
        :attr:`Priority.SHADOW`, ``items_per_turn`` at a time, each only after ``await wait_turn()`` (no live read
        computing). A live read arriving meanwhile waits for at most that many items' forward pass, already under way.
        The caller holds ``volume`` (its voxels) until this returns."""
        loop = asyncio.get_running_loop()
        await wait_turn()
        start = time.perf_counter()
        prepared = await loop.run_in_executor(executor, self._prepare, volume)
        volume = without_voxels(volume)
        timing = {"preprocess": (time.perf_counter() - start) * 1e3}
        start = time.perf_counter()
        results: list[Any] = []
        for first in range(0, len(prepared.items), items_per_turn):
            await wait_turn()
            chunk = prepared.items[first : first + items_per_turn]
            results += await self.batcher.submit(request_id, chunk, priority=Priority.SHADOW)
        timing["infer"] = (time.perf_counter() - start) * 1e3
        await wait_turn()
        output = await loop.run_in_executor(executor, self.task.finalize, volume, prepared, results)
        return ReadResult(output.findings, timing, list(volume.warnings), output.masks, volume)
