"""Dynamic batching of work items across reads, one batcher per loaded model version.

A read is split upstream into same-shape work items (sliding-window patches of a 3-D study, or whole
2-D images). :meth:`DynamicBatcher.submit` queues all items of one read and waits for their results;
a single loop task fills each forward pass with items drawn from several reads.

API::

    DynamicBatcher(name, forward, config, *, item_shape=None, executor=None, stack_items=True)
        forward(batch: Tensor (B, C, *spatial)) -> Sequence of B per-item results   # synchronous
        forward(items: list of B Tensors (C, *spatial)) -> ...                       # stack_items=False
    await batcher.start();  await batcher.stop(*, drain=True);  async with batcher: ...
    await batcher.submit(request_id, tensors, *, priority=Priority.ROUTINE, deadline_s=None) -> list[Any]
    batcher.queue_depth, batcher.item_shape, batcher.stats (BatcherStats), batcher.dead_error

The engine step is three calls (vLLM ``EngineCore.step``): next batch from the :class:`Scheduler`,
backend forward, scatter results to each request's future. Between steps the loop waits, Ray Serve
style, until either ``max_batch_size`` items are queued (the "batch full" event, set by ``submit``) or
``max_queue_delay_ms`` has elapsed since the oldest waiting item arrived (a shrinking wait on
``time.monotonic()``). A forward already running holds the loop, so items arriving meanwhile batch up.

Semantics:

* ``forward`` runs in one worker thread (``loop.run_in_executor``; the batcher's own single-thread pool
  unless ``executor`` is given), one call at a time, so the event loop never blocks on the model. The
  items are stacked there too, or, with ``stack_items=False``, handed over as a list for ``forward`` to stack
  (``ModelRunner`` does, so that running out of GPU memory in the stack meets the forward's own handling).
  ``forward`` must return exactly B results, in batch order.
* Every item must have this batcher's item shape and dtype (``item_shape``, else the first admitted
  read fixes them); a read that does not fails alone with :class:`InvalidInputError` before it is queued.
* Admission: a read that would overflow ``max_queue_size`` gets :class:`OverloadedError` (retriable); one
  with more items than ``max_queue_size`` could never fit and gets :class:`LimitExceededError`.
* STAT before ROUTINE, FIFO within a priority (see :mod:`inference.engine.scheduler`).
* ``deadline_s`` is absolute ``time.monotonic()`` seconds. Past it the read fails with
  :class:`DeadlineExceededError` at once (even while a forward runs) and its waiting items are dropped;
  items already in a running forward finish there and their results are discarded.
* Cancelling the task awaiting ``submit`` (the client went away) drops the read's waiting items.
* A failing forward does not fail the whole batch: the batch's items are forwarded again one read at a
  time, so only a read whose own items still fail gets an exception (a poisoned read fails alone). A
  batch holding a single read is not retried. The read's exception is the forward's own if it is a
  :class:`RadserveError`, else a generic ``RadserveError`` (INTERNAL) chained to the original; the
  details go to the log with the request id.
* ``forward`` raising :class:`EngineDeadError` is unrecoverable: every read in flight or queued fails
  with ``EngineDeadError``, the loop stops, and later submits raise ``EngineDeadError``.
* ``stop(drain=True)`` stops admitting (:class:`ShuttingDownError`) and runs the queued items without
  waiting out the delay; ``drain=False`` fails the queued reads with ``ShuttingDownError`` and lets only
  the forward already running finish.

Use a batcher from one event loop; it is not thread-safe.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch

from inference.engine.scheduler import Priority, RequestHandle, Scheduler, WorkItem
from inference.errors import (
    DeadlineExceededError,
    EngineDeadError,
    InvalidInputError,
    RadserveError,
    ShuttingDownError,
)
from inference.modelrepo.schema import BatchingConfig

logger = logging.getLogger(__name__)

__all__ = ["BatcherStats", "DynamicBatcher", "Priority"]


@dataclass
class BatcherStats:
    """Counters for metrics and tests."""

    batches_run: int = 0  # engine steps: batches taken from the scheduler
    items_run: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)  # batch size -> number of batches
    forward_calls: int = 0  # including the one-read-at-a-time retries
    forward_errors: int = 0
    requests_failed: int = 0  # reads failed by a forward error (not deadlines, cancels or shutdown)


@dataclass(frozen=True)
class _Failed:
    """Outcome of an item whose read failed in the forward pass."""

    error: BaseException


_SKIPPED = object()  # outcome of an item whose read was already done when it came to retry it


class DynamicBatcher:
    """Batches the work items of concurrent reads into forward passes; see the module docstring."""

    def __init__(
        self,
        name: str,
        forward: Callable[[torch.Tensor], Sequence[Any]],
        config: BatchingConfig,
        *,
        item_shape: Sequence[int] | None = None,
        executor: concurrent.futures.Executor | None = None,
        stack_items: bool = True,
    ) -> None:
        if not name:
            raise ValueError("batcher name must be non-empty")
        if item_shape is not None:
            item_shape = tuple(item_shape)
            if len(item_shape) < 2 or any(int(s) != s or s < 1 for s in item_shape):
                raise ValueError(f"item_shape must be (C, *spatial) with positive integers, got {item_shape!r}")
        self.name = name
        self.config = config
        self.stats = BatcherStats()
        self._forward_fn = forward
        self._stack_items = stack_items
        self._item_shape: tuple[int, ...] | None = None if item_shape is None else tuple(int(s) for s in item_shape)
        self._item_dtype: torch.dtype | None = None
        self._delay_s = config.max_queue_delay_ms / 1000.0
        self._scheduler = Scheduler(config.max_queue_size, name=name)
        self._executor = executor
        self._owns_executor = executor is None
        self._task: asyncio.Task[None] | None = None
        self._items_ready = asyncio.Event()  # something is queued (asyncio binds the loop on first use)
        self._batch_full = asyncio.Event()  # max_batch_size items are queued, or stop()
        self._stopping = False
        self._dead: EngineDeadError | None = None
        self._inflight: list[WorkItem] = []

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None or self._stopping:
            raise RuntimeError(f"batcher for model {self.name} was already started")
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"batcher-{self.name}"
            )
        self._task = asyncio.create_task(self._run(), name=f"batcher-{self.name}")
        logger.info(
            "model %s: batcher started (max_batch_size=%d, max_queue_delay_ms=%s, max_queue_size=%d)",
            self.name,
            self.config.max_batch_size,
            self.config.max_queue_delay_ms,
            self.config.max_queue_size,
        )

    async def stop(self, *, drain: bool = True) -> None:
        """Stop admitting reads; finish (``drain``) or fail the queued ones; wait for the loop to end."""
        self._stopping = True
        if not drain:
            dropped = self._scheduler.clear()
            for request in dropped:
                request.fail(ShuttingDownError(f"model {self.name} is shutting down"))
            if dropped:
                logger.info("model %s: stop failed %d queued reads", self.name, len(dropped))
        self._items_ready.set()
        self._batch_full.set()
        if self._task is not None:
            await asyncio.wait((self._task,))
        if self._owns_executor and self._executor is not None:
            self._executor.shutdown(wait=False)
        logger.info("model %s: batcher stopped (drain=%s)", self.name, drain)

    async def __aenter__(self) -> DynamicBatcher:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop(drain=exc_type is None)

    # -- introspection --------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Work items waiting for a forward pass."""
        return len(self._scheduler)

    @property
    def item_shape(self) -> tuple[int, ...] | None:
        return self._item_shape

    @property
    def dead_error(self) -> EngineDeadError | None:
        """The unrecoverable error that stopped this batcher, if any (health turns NOT_SERVING)."""
        return self._dead

    # -- requests -------------------------------------------------------------------------------------

    async def submit(
        self,
        request_id: str,
        tensors: Sequence[torch.Tensor],
        *,
        priority: Priority = Priority.ROUTINE,
        deadline_s: float | None = None,
    ) -> list[Any]:
        """Queue one read's items and wait for their results, returned in item order.

        Raises the read's own exception: InvalidInputError, OverloadedError, LimitExceededError,
        DeadlineExceededError, ShuttingDownError, EngineDeadError, or the forward's failure.
        """
        if self._dead is not None:
            raise EngineDeadError(f"model {self.name} cannot serve reads any more")
        if self._stopping:
            raise ShuttingDownError(f"model {self.name} is shutting down")
        if self._task is None:
            raise RuntimeError(f"batcher for model {self.name} is not started")
        tensors = self._validate(request_id, tensors)
        if deadline_s is not None and time.monotonic() >= deadline_s:
            raise DeadlineExceededError(f"read {request_id} passed its deadline before model {self.name} queued it")

        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        request = RequestHandle(request_id, len(tensors), future, Priority(priority), deadline_s)
        self._scheduler.add(request, [WorkItem(request, i, t) for i, t in enumerate(tensors)])
        self._items_ready.set()
        if len(self._scheduler) >= self.config.max_batch_size:
            self._batch_full.set()

        timeout_s = None if deadline_s is None else max(0.0, deadline_s - time.monotonic())
        try:
            await asyncio.wait((future,), timeout=timeout_s)
        except asyncio.CancelledError:
            future.cancel()
            dropped = self._scheduler.discard(request)
            logger.info("model %s: read %s was cancelled; dropped %d queued items", self.name, request_id, dropped)
            raise
        if not future.done():
            done = request.num_items - request.remaining
            request.fail(
                DeadlineExceededError(
                    f"read {request_id} passed its deadline on model {self.name} "
                    f"({done} of {request.num_items} items done)"
                )
            )
            dropped = self._scheduler.discard(request)
            logger.info(
                "model %s: read %s passed its deadline; dropped %d queued items", self.name, request_id, dropped
            )
        return list(future.result())

    def _validate(self, request_id: str, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        tensors = list(tensors)
        if not tensors:
            raise InvalidInputError(f"read {request_id} has no work items for model {self.name}")
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise InvalidInputError(f"read {request_id}: work item {i} is a {type(t).__name__}, not a tensor")
        shape = self._item_shape if self._item_shape is not None else tuple(tensors[0].shape)
        dtype = self._item_dtype if self._item_dtype is not None else tensors[0].dtype
        if len(shape) < 2:
            raise InvalidInputError(f"read {request_id}: work items must be (C, *spatial), got shape {shape}")
        for i, t in enumerate(tensors):
            if tuple(t.shape) != shape:
                raise InvalidInputError(
                    f"read {request_id}: work item {i} has shape {tuple(t.shape)}, model {self.name} takes {shape}"
                )
            if t.dtype != dtype:
                raise InvalidInputError(
                    f"read {request_id}: work item {i} has dtype {t.dtype}, model {self.name} takes {dtype}"
                )
        self._item_shape, self._item_dtype = shape, dtype
        return tensors

    # -- the loop -------------------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                if not len(self._scheduler):
                    if self._stopping:
                        return
                    self._items_ready.clear()
                    await self._items_ready.wait()
                    continue
                await self._wait_for_batch()
                await self._step()
        except EngineDeadError as exc:
            self._die(exc)
        except asyncio.CancelledError:
            self._stopping = True
            self._fail_all(ShuttingDownError(f"model {self.name} is shutting down"))
            raise
        except Exception as exc:
            logger.exception("model %s: batcher loop crashed", self.name)
            err = EngineDeadError(f"batcher loop of model {self.name} crashed")
            err.__cause__ = exc
            self._die(err)

    async def _wait_for_batch(self) -> None:
        """Return once max_batch_size items wait, the oldest has waited max_queue_delay_ms, or on stop."""
        while not self._stopping and len(self._scheduler) < self.config.max_batch_size:
            oldest_s = self._scheduler.oldest_enqueued_s()
            if oldest_s is None:
                return
            remaining_s = oldest_s + self._delay_s - time.monotonic()
            if remaining_s <= 0:
                return
            self._batch_full.clear()
            try:
                async with asyncio.timeout(remaining_s):
                    await self._batch_full.wait()
            except TimeoutError:
                return

    async def _step(self) -> None:
        """The engine step: next batch from the scheduler, backend forward, scatter results."""
        batch = self._scheduler.next_batch(self.config.max_batch_size)
        if not batch:
            return
        self.stats.batches_run += 1
        self.stats.items_run += len(batch)
        self.stats.batch_sizes[len(batch)] += 1
        self._inflight = batch  # left set if the step raises, so that _run can fail these reads too
        outcomes = await self._execute(batch)
        self._scatter(batch, outcomes)
        self._inflight = []

    async def _execute(self, batch: list[WorkItem]) -> list[Any]:
        """Forward the batch; if that fails, forward each read's items alone. One outcome per item."""
        try:
            return await self._forward(batch)
        except EngineDeadError:
            raise
        except Exception as exc:
            batch_error = exc

        groups: dict[RequestHandle, list[int]] = {}
        for i, item in enumerate(batch):
            groups.setdefault(item.request, []).append(i)
        outcomes: list[Any] = [_SKIPPED] * len(batch)
        if len(groups) == 1:
            ((request, indices),) = groups.items()
            failure = self._failure(request, batch_error)
            for i in indices:
                outcomes[i] = failure
            return outcomes

        logger.warning(
            "model %s: forward of %d items from %d reads failed (%s); retrying each read alone",
            self.name,
            len(batch),
            len(groups),
            type(batch_error).__name__,
        )
        for request, indices in groups.items():
            if request.done:
                continue
            try:
                outputs = await self._forward([batch[i] for i in indices])
            except EngineDeadError:
                raise
            except Exception as exc:
                failure = self._failure(request, exc)
                for i in indices:
                    outcomes[i] = failure
            else:
                for i, output in zip(indices, outputs, strict=True):
                    outcomes[i] = output
        return outcomes

    async def _forward(self, items: list[WorkItem]) -> list[Any]:
        self.stats.forward_calls += 1
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._forward_sync, [item.tensor for item in items])
        except Exception:
            self.stats.forward_errors += 1
            raise

    def _forward_sync(self, tensors: list[torch.Tensor]) -> list[Any]:
        """Runs in the worker thread."""
        outputs = list(self._forward_fn(torch.stack(tensors) if self._stack_items else tensors))
        if len(outputs) != len(tensors):
            raise RuntimeError(
                f"forward of model {self.name} returned {len(outputs)} results for a batch of {len(tensors)}"
            )
        return outputs

    def _failure(self, request: RequestHandle, exc: Exception) -> _Failed:
        """The read's own error for a forward failure; the details go to the log."""
        logger.exception(
            "model %s: forward failed for read %s (%d items)",
            self.name,
            request.request_id,
            request.num_items,
            exc_info=exc,
        )
        if isinstance(exc, RadserveError):
            return _Failed(exc)
        err = RadserveError(f"inference failed on model {self.name} for read {request.request_id}")
        err.__cause__ = exc
        return _Failed(err)

    def _scatter(self, batch: list[WorkItem], outcomes: list[Any]) -> None:
        for item, outcome in zip(batch, outcomes, strict=True):
            request = item.request
            if request.done or outcome is _SKIPPED:
                continue
            if isinstance(outcome, _Failed):
                if request.fail(outcome.error):
                    self.stats.requests_failed += 1
                self._scheduler.discard(request)
            else:
                request.set_item_result(item.index, outcome)

    def _die(self, exc: EngineDeadError) -> None:
        logger.error("model %s: engine is dead, failing every read", self.name, exc_info=exc)
        self._dead = exc
        err = EngineDeadError(f"model {self.name} cannot serve reads any more")
        err.__cause__ = exc
        self._fail_all(err)

    def _fail_all(self, template: RadserveError) -> None:
        """Fail every read in flight or queued with a fresh copy of ``template`` each."""
        requests = dict.fromkeys(item.request for item in self._inflight)
        requests.update(dict.fromkeys(self._scheduler.clear()))
        for request in requests:
            err = type(template)(template.message)
            err.__cause__ = template.__cause__
            request.fail(err)
