"""Work-item queues for one model version: priorities, FIFO order, deadlines, admission control.

A read is split upstream into same-shape work items (sliding-window patches of a 3-D study, or whole
2-D images). The :class:`Scheduler` holds the items waiting for a forward pass and decides which go
next; the :class:`~inference.engine.batcher.DynamicBatcher` owns the waiting and the forward pass.

API::

    Priority.STAT, Priority.ROUTINE, Priority.SHADOW         # lower value runs first
    RequestHandle(request_id, num_items, future, priority=Priority.ROUTINE, deadline_s=None)
        .done / .expired(now_s) / .set_item_result(index, value) -> bool / .fail(exc) -> bool
    WorkItem(request, index, tensor)                         # enqueued_s is stamped by Scheduler.add
    Scheduler(max_queue_size, *, name="model")
        .add(request, items)               # OverloadedError when full; LimitExceededError if it never fits
        .next_batch(max_batch_size) -> list[WorkItem]
        .discard(request) -> int           # drop a request's waiting items (cancelled or failed)
        .clear() -> list[RequestHandle]    # drop everything; returns the live requests it held
        .oldest_enqueued_s() -> float | None
        len(scheduler)                     # items waiting (queue depth)

Semantics:

* STAT items go before ROUTINE items, and both before SHADOW items (a shadow version's copy of a live read,
  inference.serving.shadow); within a priority, items go in arrival order (FIFO), so the items
  of one request stay together and several requests share a batch when one does not fill it.
* Items whose request is already done (completed, failed, cancelled) are dropped, never returned.
* A request whose deadline (``time.monotonic()`` seconds) has passed gets :class:`DeadlineExceededError`
  on its future at the next ``next_batch`` call, and all its waiting items are dropped, wherever they
  are in the queue.
* ``add`` admits a request whole or not at all.

Not thread-safe: use it from the event-loop thread only. The per-request future is an asyncio future,
but nothing here awaits.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from inference.errors import DeadlineExceededError, LimitExceededError, OverloadedError

logger = logging.getLogger(__name__)


class Priority(enum.IntEnum):
    """Reading priority; a lower value runs first."""

    STAT = 0
    ROUTINE = 1
    SHADOW = 2  # below all live work: a shadow version's comparison reads


@dataclass(eq=False)  # identity semantics: a handle is hashable and two reads never compare equal
class RequestHandle:
    """One read on one model: its priority, deadline and per-item result slots.

    ``future`` resolves to the list of per-item results, in item order, once every item has one; or to
    the request's own exception.
    """

    request_id: str
    num_items: int
    future: asyncio.Future[list[Any]]
    priority: Priority = Priority.ROUTINE
    deadline_s: float | None = None  # absolute, time.monotonic()
    results: list[Any] = field(init=False, repr=False)
    remaining: int = field(init=False)
    _filled: list[bool] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.num_items < 1:
            raise ValueError(f"request {self.request_id!r}: num_items must be >= 1, got {self.num_items!r}")
        self.priority = Priority(self.priority)
        if self.deadline_s is not None and math.isnan(self.deadline_s):
            raise ValueError(f"request {self.request_id!r}: deadline_s must be a number, got {self.deadline_s!r}")
        self.results = [None] * self.num_items
        self.remaining = self.num_items
        self._filled = [False] * self.num_items

    @property
    def done(self) -> bool:
        """Completed, failed or cancelled: its items must not be forwarded any more."""
        return self.future.done()

    def expired(self, now_s: float) -> bool:
        return self.deadline_s is not None and now_s >= self.deadline_s

    def set_item_result(self, index: int, value: Any) -> bool:
        """Store one item's result; resolves the future with the last one. False if already done."""
        if self.future.done() or self._filled[index]:
            return False
        self.results[index] = value
        self._filled[index] = True
        self.remaining -= 1
        if self.remaining == 0:
            self.future.set_result(self.results)
        return True

    def fail(self, exc: BaseException) -> bool:
        """Fail the whole request with its own exception. False if it was already done."""
        if self.future.done():
            return False
        self.future.set_exception(exc)
        return True


@dataclass(eq=False)
class WorkItem:
    """One patch or image: ``tensor`` is (C, *spatial), the same shape for every item of a model."""

    request: RequestHandle
    index: int  # position within the request's items
    tensor: torch.Tensor
    enqueued_s: float = 0.0  # time.monotonic(), stamped by Scheduler.add

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.request.num_items:
            raise ValueError(
                f"request {self.request.request_id!r}: item index {self.index} out of range "
                f"[0, {self.request.num_items})"
            )


class Scheduler:
    """Priority queues of work items for one model version; see the module docstring."""

    def __init__(self, max_queue_size: int, *, name: str = "model") -> None:
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size!r}")
        self.max_queue_size = max_queue_size
        self.name = name
        self._queues: dict[Priority, deque[WorkItem]] = {p: deque() for p in sorted(Priority)}
        # Requests with items in the queues -> how many; what the deadline sweep walks.
        self._waiting: dict[RequestHandle, int] = {}
        self._size = 0  # items in the deques, including those of requests that became done meanwhile

    def __len__(self) -> int:
        return self._size

    def add(self, request: RequestHandle, items: Sequence[WorkItem]) -> None:
        """Queue all of a request's items, or none (raises)."""
        if not items:
            raise ValueError(f"request {request.request_id!r} has no items")
        if request in self._waiting:
            raise ValueError(f"request {request.request_id!r} is already queued")
        if any(item.request is not request for item in items):
            raise ValueError(f"request {request.request_id!r}: every item must belong to that request")
        n = len(items)
        if n > self.max_queue_size:
            raise LimitExceededError(
                f"read has {n} work items, more than the queue limit of model {self.name} ({self.max_queue_size})"
            )
        if self._size + n > self.max_queue_size:
            self._sweep(time.monotonic())  # make room held by finished or expired requests first
        if self._size + n > self.max_queue_size:
            raise OverloadedError(
                f"queue for model {self.name} is full ({self._size} items waiting, limit {self.max_queue_size})"
            )
        now = time.monotonic()
        queue = self._queues[request.priority]
        for item in items:
            item.enqueued_s = now
            queue.append(item)
        self._waiting[request] = n
        self._size += n

    def next_batch(self, max_batch_size: int) -> list[WorkItem]:
        """Up to ``max_batch_size`` items: STAT, then ROUTINE, then SHADOW; FIFO within a priority. When two
        batches drain the queue, they are balanced (9 items at 4: 4, then 3 and 2; not 4, 4 and 1): as many forward
        passes, and no straggler of one item, which costs a padded pair on the CPU (docs/decisions.md)."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size!r}")
        self._sweep(time.monotonic())
        if max_batch_size < len(self) < 2 * max_batch_size:
            max_batch_size = (len(self) + 1) // 2
        batch: list[WorkItem] = []
        for queue in self._queues.values():
            while queue and len(batch) < max_batch_size:
                item = self._pop(queue)
                if not item.request.done:
                    batch.append(item)
            if len(batch) == max_batch_size:
                break
        return batch

    def discard(self, request: RequestHandle) -> int:
        """Drop the waiting items of one request; returns how many were dropped."""
        return self._discard({request})

    def clear(self) -> list[RequestHandle]:
        """Drop every waiting item; returns the requests that still had items queued and are not done."""
        live = [r for r in self._waiting if not r.done]
        for queue in self._queues.values():
            queue.clear()
        self._waiting.clear()
        self._size = 0
        return live

    def oldest_enqueued_s(self) -> float | None:
        """Arrival time of the oldest waiting item of a live request; None when nothing waits."""
        oldest: float | None = None
        for queue in self._queues.values():
            while queue and queue[0].request.done:
                self._pop(queue)
            if queue and (oldest is None or queue[0].enqueued_s < oldest):
                oldest = queue[0].enqueued_s
        return oldest

    def requests(self) -> Iterable[RequestHandle]:
        """Requests with items waiting (a snapshot)."""
        return list(self._waiting)

    def _pop(self, queue: deque[WorkItem]) -> WorkItem:
        item = queue.popleft()
        self._size -= 1
        left = self._waiting.get(item.request, 0) - 1
        if left > 0:
            self._waiting[item.request] = left
        else:
            self._waiting.pop(item.request, None)
        return item

    def _sweep(self, now_s: float) -> None:
        """Fail requests past their deadline; drop the items of every request that is done."""
        dead: set[RequestHandle] = set()
        for request in self._waiting:
            if request.expired(now_s) and request.fail(
                DeadlineExceededError(f"read {request.request_id} passed its deadline waiting for model {self.name}")
            ):
                logger.info("model %s: request %s passed its deadline in the queue", self.name, request.request_id)
            if request.done:
                dead.add(request)
        if dead:
            self._discard(dead)

    def _discard(self, requests: set[RequestHandle]) -> int:
        if not any(r in self._waiting for r in requests):
            return 0
        before = self._size
        for priority, queue in self._queues.items():
            kept = [item for item in queue if item.request not in requests]
            if len(kept) != len(queue):
                self._queues[priority] = deque(kept)
        for request in requests:
            self._waiting.pop(request, None)
        self._size = sum(len(q) for q in self._queues.values())
        return before - self._size
