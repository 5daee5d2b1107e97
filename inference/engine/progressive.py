"""A read whose patches go to the batcher while its study still arrives (docs/decisions.md, "Progressive reading").

:class:`SlabRead` holds one read's :class:`~inference.tasks.slabs.SlabPlan` and its preprocessed image. Each time
slices arrive (:meth:`SlabRead.slices_arrived`), the planes of the preprocessed grid those slices complete are filled
(in the I/O pool, one filler at a time), and every patch whose planes are all filled is submitted to the model's
batcher at the read's priority and deadline, batched with other reads' work as in the whole-study path. When
the upload has ended and the series' reader agreed with the expected grid, :meth:`SlabRead.finish` waits for the
patches still running and finalises the findings exactly as :meth:`ModelRunner.read` does. :meth:`SlabRead.cancel`
drops the patches still queued (a read cancelled or failed mid-upload, or a grid the reader did not confirm).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import numpy as np

from inference.engine.runner import ModelRunner, ReadResult, without_voxels
from inference.engine.scheduler import Priority
from inference.io.volume import Volume
from inference.tasks.base import PreparedStudy
from inference.tasks.slabs import SlabImage, SlabPlan

logger = logging.getLogger(__name__)

__all__ = ["SlabRead", "start_slab_read"]


def start_slab_read(
    runner: ModelRunner,
    shape: tuple[int, int, int],
    affine: np.ndarray,
    plane: Callable[[int], np.ndarray],
    *,
    request_id: str,
    priority: Priority,
    deadline_s: float | None,
    executor: Executor | None,
) -> SlabRead:
    """A :class:`SlabRead` of ``runner``'s model over the expected input grid ``shape``/``affine`` (in a worker
    thread: planning asks MONAI for the preprocessed grid)."""
    plan = SlabPlan.build(shape, affine, runner.config, runner.device)
    return SlabRead(
        runner, plan, plane, request_id=request_id, priority=priority, deadline_s=deadline_s, executor=executor
    )


class SlabRead:
    """One progressive read's patches; ``plane(k)`` returns input slice k (columns, rows) once it has arrived."""

    def __init__(
        self,
        runner: ModelRunner,
        plan: SlabPlan,
        plane: Callable[[int], np.ndarray],
        *,
        request_id: str,
        priority: Priority,
        deadline_s: float | None,
        executor: Executor | None,
    ) -> None:
        self.runner = runner
        self.plan = plan
        self.image = SlabImage(plan, runner.device)
        self._plane = plane
        self._request_id = request_id
        self._priority = priority
        self._deadline_s = deadline_s
        self._executor = executor
        self._arrived = np.zeros(plan.input_shape[2], dtype=bool)
        self._submitted = np.zeros(len(plan), dtype=bool)
        self._results: list[Any] = [None] * len(plan)
        self._lock = asyncio.Lock()
        self._fills: list[asyncio.Task] = []
        self._submits: list[asyncio.Task] = []
        self.preprocess_ms = 0.0
        self.patches_before_end = 0  # patches submitted before the upload ended

    def slices_arrived(self, ks: list[int]) -> None:
        """Slices ``ks`` are in: fill the planes they complete and submit the patches those complete (on the
        running loop, without waiting)."""
        self._arrived[ks] = True
        self._fills.append(asyncio.get_running_loop().create_task(self._fill()))

    def _fillable(self) -> list[int]:
        needs = self.plan.plane_needs
        return [
            p
            for p in range(self.plan.n_planes)
            if not self.image.filled[p] and self._arrived[needs[p][0] : needs[p][1] + 1].all()
        ]

    def _block(self, k0: int, k1: int) -> np.ndarray:
        return np.stack([self._plane(k) for k in range(k0, k1 + 1)], axis=0)

    def _fill_planes(self, planes: list[int]) -> list[tuple[int, Any]]:
        """Fill ``planes`` (runs of consecutive planes at a time); the patches now complete, cut (I/O thread)."""
        start = time.perf_counter()
        runs: list[list[int]] = []
        for p in planes:
            if runs and p == runs[-1][-1] + 1:
                runs[-1].append(p)
            else:
                runs.append([p])
        for run in runs:
            self.image.fill(run[0], run[-1], self._block)
        ready = [i for i in range(len(self.plan)) if not self._submitted[i] and self.image.ready(i)]
        self._submitted[ready] = True
        items = [(i, self.image.patch(i)) for i in ready]
        self.preprocess_ms += (time.perf_counter() - start) * 1e3
        return items

    async def _fill(self) -> None:
        async with self._lock:
            planes = self._fillable()
            if not planes:
                return
            loop = asyncio.get_running_loop()
            items = await loop.run_in_executor(self._executor, self._fill_planes, planes)
        if items:
            self._submits.append(asyncio.get_running_loop().create_task(self._submit(items)))

    async def _submit(self, items: list[tuple[int, Any]]) -> None:
        results = await self.runner.batcher.submit(
            self._request_id, [tensor for _, tensor in items], priority=self._priority, deadline_s=self._deadline_s
        )
        for (patch, _), result in zip(items, results, strict=True):
            self._results[patch] = result

    async def finish(self, volume: Volume) -> ReadResult:
        """The findings, once every patch has run: ``volume`` is the series as its reader assembled it (voxels may
        be released), which agreed with the expected grid."""
        self.patches_before_end = int(self._submitted.sum())
        self.slices_arrived(list(range(self.plan.input_shape[2])))
        start = time.perf_counter()
        try:
            await asyncio.gather(*self._fills)
            await asyncio.gather(*self._submits)
        except BaseException:
            self.cancel()
            raise
        if not self._submitted.all():
            raise RuntimeError(f"progressive read {self._request_id}: {int((~self._submitted).sum())} patches unfilled")
        wait_ms = (time.perf_counter() - start) * 1e3
        context = self.runner.task.slab_context(self.plan.affine, self.plan.plan)
        prepared = PreparedStudy(items=[], context=context)
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        output = await loop.run_in_executor(self._executor, self.runner.task.finalize, volume, prepared, self._results)
        timing = {
            "preprocess": self.preprocess_ms,
            "infer": wait_ms,  # after the last byte: what was still to fill, queued or running
            "postprocess": (time.perf_counter() - start) * 1e3,
        }
        logger.debug(
            "request %s: %d of %d patches submitted before the upload ended, %d findings",
            self._request_id,
            self.patches_before_end,
            len(self.plan),
            len(output.findings),
        )
        return ReadResult(output.findings, timing, list(volume.warnings), output.masks, volume=without_voxels(volume))

    def cancel(self) -> None:
        """Drop the work not yet done (the batcher discards a cancelled read's queued items)."""
        for task in [*self._fills, *self._submits]:
            task.cancel()
