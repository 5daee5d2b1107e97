"""DynamicBatcher and Scheduler: cross-read batching, poisoned reads, priorities, delay, admission, deadlines.

Every work item is a constant tensor whose value encodes its read (``100 * read + item``), and the forward
returns each item's mean, so a result tells which item produced it and the recorded forward calls tell
which reads shared a batch. Forwards that must hold the loop wait on a threading.Event in the worker.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import torch

from inference.engine.batcher import DynamicBatcher
from inference.engine.scheduler import Priority, RequestHandle, Scheduler, WorkItem
from inference.errors import (
    DeadlineExceededError,
    EngineDeadError,
    InvalidInputError,
    LimitExceededError,
    OverloadedError,
    RadserveError,
    ShuttingDownError,
)
from inference.modelrepo.schema import BatchingConfig

ITEM_SHAPE = (1, 4, 4, 4)  # (C, *roi_size): every patch of the model, whatever the study's shape


def items(read: int, n: int, *, shape: tuple[int, ...] = ITEM_SHAPE) -> list[torch.Tensor]:
    return [torch.full(shape, float(100 * read + i)) for i in range(n)]


def values(n: int, read: int) -> list[float]:
    return [float(100 * read + i) for i in range(n)]


class Forward:
    """Records each call's item values; the per-item result is the item's mean (its value)."""

    def __init__(self, *, gate: threading.Event | None = None, fail_on_nan: bool = False) -> None:
        self.calls: list[list[float]] = []
        self.entered = threading.Event()
        self.gate = gate
        self.fail_on_nan = fail_on_nan

    def __call__(self, batch: torch.Tensor) -> list[Any]:
        self.calls.append(batch.flatten(1)[:, 0].tolist())
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(5.0)  # bounded, so a failing test cannot hang the worker thread
        if self.fail_on_nan and torch.isnan(batch).any():
            raise ValueError("NaN in batch")
        return [float(v) for v in batch.mean(dim=(1, 2, 3, 4))]

    def reads(self) -> list[set[int]]:
        """The reads that went into each forward call."""
        return [{int(v) // 100 for v in call} for call in self.calls]

    def all_values(self) -> set[float]:
        return {v for call in self.calls for v in call}


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=10.0))


async def until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.002)


async def wait_entered(forward: Forward) -> None:
    await until(forward.entered.is_set)


def config(max_batch_size: int = 4, max_queue_delay_ms: float = 20.0, max_queue_size: int = 64) -> BatchingConfig:
    return BatchingConfig(max_batch_size, max_queue_delay_ms, max_queue_size)


# (a) -------------------------------------------------------------------------------------------------


def test_reads_of_different_study_shapes_share_batches_and_get_their_own_results() -> None:
    # A small study cut into 3 patches and a larger one into 5, all of the model's roi size.
    forward = Forward()

    async def body() -> None:
        async with DynamicBatcher("lung", forward, config(max_batch_size=4)) as batcher:
            small, large = await asyncio.gather(batcher.submit("r1", items(1, 3)), batcher.submit("r2", items(2, 5)))
            assert small == values(3, 1)
            assert large == values(5, 2)
            assert any(reads == {1, 2} for reads in forward.reads()), forward.calls
            assert sum(size * n for size, n in batcher.stats.batch_sizes.items()) == 8
            assert batcher.stats.items_run == 8
            assert batcher.item_shape == ITEM_SHAPE

    run(body())


def test_mismatched_item_shape_fails_alone() -> None:
    forward = Forward()

    async def body() -> None:
        async with DynamicBatcher("lung", forward, config(), item_shape=ITEM_SHAPE) as batcher:
            bad = batcher.submit("bad", items(1, 2, shape=(1, 4, 4, 5)))
            good = batcher.submit("good", items(2, 2))
            results = await asyncio.gather(bad, good, return_exceptions=True)
            assert isinstance(results[0], InvalidInputError)
            assert "(1, 4, 4, 5)" in str(results[0]) and "(1, 4, 4, 4)" in str(results[0])
            assert results[1] == values(2, 2)
            assert 100.0 not in forward.all_values()

    run(body())


# (b) -------------------------------------------------------------------------------------------------


def test_poisoned_read_fails_alone_and_the_others_in_its_batch_succeed() -> None:
    forward = Forward(fail_on_nan=True)
    poison = items(3, 2)
    poison[1][0, 1, 1, 1] = float("nan")

    async def body() -> None:
        async with DynamicBatcher("lung", forward, config(max_batch_size=8)) as batcher:
            results = await asyncio.gather(
                batcher.submit("r1", items(1, 2)),
                batcher.submit("poisoned", poison),
                batcher.submit("r2", items(2, 3)),
                return_exceptions=True,
            )
            assert results[0] == values(2, 1)
            assert results[2] == values(3, 2)
            err = results[1]
            assert isinstance(err, RadserveError) and not isinstance(err, ValueError)
            assert isinstance(err.__cause__, ValueError)
            assert "NaN" not in str(err)  # generic for the client; the details are in the log
            assert forward.reads()[0] == {1, 3, 2}  # all three shared the failing batch
            assert sorted(map(sorted, forward.reads()[1:])) == [[1], [2], [3]]  # then one read at a time
            assert batcher.stats.forward_errors == 2
            assert batcher.stats.requests_failed == 1
            # The batcher keeps serving.
            assert await batcher.submit("r4", items(4, 1)) == values(1, 4)

    run(body())


def test_engine_dead_fails_every_read_and_later_submits() -> None:
    def forward(batch: torch.Tensor) -> list[Any]:
        raise EngineDeadError("device lost")

    async def body() -> None:
        async with DynamicBatcher("lung", forward, config(max_batch_size=8)) as batcher:
            results = await asyncio.gather(
                batcher.submit("r1", items(1, 2)), batcher.submit("r2", items(2, 2)), return_exceptions=True
            )
            assert all(isinstance(r, EngineDeadError) for r in results), results
            assert batcher.dead_error is not None
            with pytest.raises(EngineDeadError):
                await batcher.submit("r3", items(3, 1))

    run(body())


# (c) -------------------------------------------------------------------------------------------------


def test_stat_items_run_before_routine_and_fifo_within_a_priority() -> None:
    gate = threading.Event()
    forward = Forward(gate=gate)

    async def body() -> None:
        async with DynamicBatcher("lung", forward, config(max_batch_size=2, max_queue_delay_ms=0)) as batcher:
            try:
                blocker = asyncio.create_task(batcher.submit("blocker", items(0, 1)))
                await wait_entered(forward)
                routine1 = asyncio.create_task(batcher.submit("routine1", items(1, 2)))
                await asyncio.sleep(0)
                routine2 = asyncio.create_task(batcher.submit("routine2", items(2, 2)))
                await asyncio.sleep(0)
                stat = asyncio.create_task(batcher.submit("stat", items(3, 2), priority=Priority.STAT))
                await until(lambda: batcher.queue_depth == 6)
            finally:
                gate.set()
            assert await stat == values(2, 3)
            assert await routine1 == values(2, 1)
            assert await routine2 == values(2, 2)
            assert await blocker == values(1, 0)
            assert forward.reads() == [{0}, {3}, {1}, {2}]

    run(body())


@pytest.mark.parametrize(
    ("queued", "sizes"), [(9, [4, 3, 2]), (5, [3, 2]), (7, [4, 3]), (8, [4, 4]), (12, [4, 4, 4]), (3, [3])]
)
def test_the_two_batches_that_drain_the_queue_are_balanced(queued: int, sizes: list[int]) -> None:
    """No straggler of one item (a padded pair on the CPU), and never more forward passes than filling each."""

    async def body() -> list[int]:
        scheduler = Scheduler(32, name="lung")
        handle = RequestHandle("r", queued, asyncio.get_running_loop().create_future(), Priority.ROUTINE, None)
        scheduler.add(handle, [WorkItem(handle, i, torch.zeros(ITEM_SHAPE)) for i in range(queued)])
        drained = []
        while batch := scheduler.next_batch(4):
            drained.append(len(batch))
        return drained

    assert run(body()) == sizes
    assert len(sizes) == -(-queued // 4)


def test_scheduler_orders_by_priority_then_arrival_and_drops_expired_reads() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        scheduler = Scheduler(8, name="lung")

        def add(read_id: str, n: int, priority: Priority, deadline_s: float | None = None) -> RequestHandle:
            handle = RequestHandle(read_id, n, loop.create_future(), priority, deadline_s)
            scheduler.add(handle, [WorkItem(handle, i, torch.zeros(ITEM_SHAPE)) for i in range(n)])
            return handle

        routine = add("routine", 2, Priority.ROUTINE)
        expired = add("expired", 2, Priority.STAT, deadline_s=time.monotonic() + 0.01)
        stat = add("stat", 1, Priority.STAT)
        assert len(scheduler) == 5
        await asyncio.sleep(0.02)
        batch = scheduler.next_batch(2)
        assert [(w.request.request_id, w.index) for w in batch] == [("stat", 0), ("routine", 0)]
        assert isinstance(expired.future.exception(), DeadlineExceededError)
        assert len(scheduler) == 1
        assert [(w.request.request_id, w.index) for w in scheduler.next_batch(2)] == [("routine", 1)]
        assert scheduler.next_batch(2) == [] and len(scheduler) == 0
        assert not routine.done and not stat.done

    run(body())


# (d) -------------------------------------------------------------------------------------------------


def test_lone_item_waits_for_the_delay_and_a_full_batch_goes_at_once() -> None:
    forward = Forward()
    forward(torch.zeros((2, *ITEM_SHAPE)))  # warm torch up outside the timed part
    forward.calls.clear()

    async def body() -> None:
        async with DynamicBatcher("lung", forward, config(max_batch_size=8, max_queue_delay_ms=50)) as batcher:
            t0 = time.monotonic()
            assert await batcher.submit("lone", items(1, 1)) == values(1, 1)
            elapsed_s = time.monotonic() - t0
            assert 0.045 <= elapsed_s < 0.05 + 0.25, elapsed_s

        async with DynamicBatcher("lung", forward, config(max_batch_size=4, max_queue_delay_ms=5000)) as batcher:
            t0 = time.monotonic()
            first, second = await asyncio.gather(batcher.submit("a", items(2, 2)), batcher.submit("b", items(3, 2)))
            elapsed_s = time.monotonic() - t0
            assert (first, second) == (values(2, 2), values(2, 3))
            assert elapsed_s < 1.0, elapsed_s  # far below the 5 s delay
            assert dict(batcher.stats.batch_sizes) == {4: 1}

    run(body())


# (e) -------------------------------------------------------------------------------------------------


def test_full_queue_refuses_with_overloaded_and_keeps_serving() -> None:
    gate = threading.Event()
    forward = Forward(gate=gate)

    async def body() -> None:
        cfg = config(max_batch_size=1, max_queue_delay_ms=0, max_queue_size=3)
        async with DynamicBatcher("lung", forward, cfg) as batcher:
            try:
                blocker = asyncio.create_task(batcher.submit("blocker", items(0, 1)))
                await wait_entered(forward)
                a = asyncio.create_task(batcher.submit("a", items(1, 2)))
                b = asyncio.create_task(batcher.submit("b", items(2, 1)))
                await until(lambda: batcher.queue_depth == 3)
                with pytest.raises(OverloadedError, match=r"queue for model lung is full \(3 items waiting, limit 3\)"):
                    await batcher.submit("c", items(3, 1))
                with pytest.raises(LimitExceededError):  # could never fit: not worth a retry
                    await batcher.submit("huge", items(4, 4))
            finally:
                gate.set()
            assert await blocker == values(1, 0)
            assert await a == values(2, 1)
            assert await b == values(1, 2)
            assert await batcher.submit("d", items(5, 3)) == values(3, 5)
            assert 300.0 not in forward.all_values()

    run(body())


# (f) -------------------------------------------------------------------------------------------------


def test_passed_deadline_fails_the_read_and_its_items_are_never_forwarded() -> None:
    gate = threading.Event()
    forward = Forward(gate=gate)

    async def body() -> None:
        async with DynamicBatcher("lung", forward, config(max_batch_size=2, max_queue_delay_ms=0)) as batcher:
            with pytest.raises(DeadlineExceededError):
                await batcher.submit("late", items(1, 1), deadline_s=time.monotonic() - 1.0)
            try:
                blocker = asyncio.create_task(batcher.submit("blocker", items(0, 1)))
                await wait_entered(forward)
                t0 = time.monotonic()
                with pytest.raises(DeadlineExceededError, match="deadline"):
                    await batcher.submit("x", items(2, 2), deadline_s=time.monotonic() + 0.05)
                assert time.monotonic() - t0 < 1.0  # fails on time, while the forward is still busy
                assert batcher.queue_depth == 0
                ok = asyncio.create_task(batcher.submit("ok", items(3, 1), deadline_s=time.monotonic() + 30))
            finally:
                gate.set()
            assert await blocker == values(1, 0)
            assert await ok == values(1, 3)
            assert forward.all_values().isdisjoint(values(1, 1) + values(2, 2))

    run(body())


# (g) -------------------------------------------------------------------------------------------------


def test_cancelled_read_drops_its_items() -> None:
    gate = threading.Event()
    forward = Forward(gate=gate)

    async def body() -> None:
        async with DynamicBatcher("lung", forward, config(max_batch_size=2, max_queue_delay_ms=0)) as batcher:
            try:
                blocker = asyncio.create_task(batcher.submit("blocker", items(0, 1)))
                await wait_entered(forward)
                gone = asyncio.create_task(batcher.submit("gone", items(1, 2)))
                stays = asyncio.create_task(batcher.submit("stays", items(2, 1)))
                await until(lambda: batcher.queue_depth == 3)
                gone.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await gone
                assert batcher.queue_depth == 1
            finally:
                gate.set()
            assert await blocker == values(1, 0)
            assert await stays == values(1, 2)
            assert forward.all_values().isdisjoint(values(2, 1))

    run(body())


# (h) -------------------------------------------------------------------------------------------------


def test_stop_with_drain_finishes_queued_work_without_waiting_out_the_delay() -> None:
    forward = Forward()

    async def body() -> None:
        batcher = DynamicBatcher("lung", forward, config(max_batch_size=8, max_queue_delay_ms=10_000))
        await batcher.start()
        a = asyncio.create_task(batcher.submit("a", items(1, 2)))
        b = asyncio.create_task(batcher.submit("b", items(2, 1)))
        await until(lambda: batcher.queue_depth == 3)
        t0 = time.monotonic()
        await batcher.stop(drain=True)
        assert time.monotonic() - t0 < 2.0
        assert await a == values(2, 1)
        assert await b == values(1, 2)
        with pytest.raises(ShuttingDownError):
            await batcher.submit("late", items(3, 1))

    run(body())


def test_stop_without_drain_fails_queued_reads_and_finishes_the_running_forward() -> None:
    gate = threading.Event()
    forward = Forward(gate=gate)

    async def body() -> None:
        batcher = DynamicBatcher("lung", forward, config(max_batch_size=1, max_queue_delay_ms=0))
        await batcher.start()
        try:
            running = asyncio.create_task(batcher.submit("running", items(0, 1)))
            await wait_entered(forward)
            queued = asyncio.create_task(batcher.submit("queued", items(1, 2)))
            await until(lambda: batcher.queue_depth == 2)
            stopping = asyncio.create_task(batcher.stop(drain=False))
            with pytest.raises(ShuttingDownError):
                await queued
        finally:
            gate.set()
        await stopping
        assert await running == values(1, 0)
        assert forward.all_values().isdisjoint(values(2, 1))

    run(body())
