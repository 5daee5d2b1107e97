"""Out of real GPU memory (skipped without CUDA): a per-process memory cap
(``torch.cuda.set_per_process_memory_fraction``) makes CUDA raise where the forward pass, the stack of a batch or
GPU preprocessing needs more than the cap allows. The runner halves a batch that does not fit, runs a single item
that does not fit on its CPU copy, and fails only the read that cannot be helped with RESOURCE_EXHAUSTED.
tests/engine/test_oom.py injects the same exception type on the CPU.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from inference.backends.torch import TorchBackend
from inference.engine.runner import ModelRunner
from inference.errors import LimitExceededError
from inference.modelrepo.schema import ModelConfig
from inference.phantoms import make_chest_ct
from inference.tasks import task_class

ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
pytestmark = pytest.mark.cuda


@pytest.fixture
def cuda() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture
def memory_cap(cuda):
    """``cap(limit_bytes)`` or ``cap(headroom_bytes=n)``: no more than that reserved by this process's caching
    allocator (``headroom_bytes``: above what its live tensors hold once the cache is emptied) until the test ends;
    ``cap(None)`` lifts it."""
    total = torch.cuda.get_device_properties(cuda).total_memory

    def cap(limit_bytes: int | None, *, headroom_bytes: int | None = None) -> None:
        torch.cuda.synchronize(cuda)
        torch.cuda.empty_cache()
        if headroom_bytes is not None:
            limit_bytes = int(torch.cuda.memory_reserved(cuda)) + headroom_bytes
        fraction = 1.0 if limit_bytes is None else min(1.0, limit_bytes / total)
        torch.cuda.set_per_process_memory_fraction(fraction, cuda)

    yield cap
    torch.cuda.set_per_process_memory_fraction(1.0, cuda)
    torch.cuda.empty_cache()


@pytest.fixture
def runner(cuda) -> ModelRunner:
    """lung_nodule_ct in fp32 on the GPU (autocast off, so that results compare closely across batch sizes), its
    score threshold lowered so that every patch has boxes to compare."""
    path = ROOT / "models" / "lung_nodule_ct" / "1" / "model.yaml"
    config = dataclasses.replace(ModelConfig.from_yaml(path), autocast="none")
    if not config.weights_path.is_file():
        pytest.skip("lung_nodule_ct has no weights; train it first")
    task = task_class(config)(config, cuda, score_threshold=0.05)
    backend = TorchBackend.from_weights(task.build_network(), config.weights_path, cuda)
    return ModelRunner(config, task, backend)


def _items(runner: ModelRunner, shape=(160, 160, 40)) -> list[torch.Tensor]:
    """A CT study's patches on the GPU: 2 x 2 x 1 of 96^3 at 1.5 mm, one full batch (max_batch_size 4)."""
    volume = make_chest_ct(3, shape=shape, pixel_spacing_mm=1.0, slice_spacing_mm=2.5, n_nodules=1).volume
    items = runner.task.prepare(volume).items
    assert len(items) == runner.config.batching.max_batch_size and items[0].is_cuda
    return items


def _peak_reserved(cuda, fn) -> tuple[object, int]:
    torch.cuda.synchronize(cuda)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(cuda)
    result = fn()
    torch.cuda.synchronize(cuda)
    return result, int(torch.cuda.max_memory_reserved(cuda))


def _same_detections(got, want) -> int:
    """Per item, the same boxes and scores (fp32, other batch sizes); returns the boxes compared."""
    compared = 0
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(torch.as_tensor(a.scores).cpu(), torch.as_tensor(b.scores).cpu(), atol=1e-3, rtol=0)
        torch.testing.assert_close(torch.as_tensor(a.boxes).cpu(), torch.as_tensor(b.boxes).cpu(), atol=0.05, rtol=0)
        compared += len(b)
    return compared


def test_a_batch_over_the_cap_is_retried_in_halves_with_the_same_results(runner, cuda, memory_cap, caplog):
    items = _items(runner) * 4  # a batch of 16 (the runner's batcher makes at most 4): far apart from one item
    _, peak_one = _peak_reserved(cuda, lambda: runner._forward(items[:1]))
    want, peak_all = _peak_reserved(cuda, lambda: runner._forward(items))
    assert peak_all - peak_one >= 64 * MIB, f"a batch of 16 needs only {(peak_all - peak_one) / MIB:.0f} MiB more"
    memory_cap((peak_one + peak_all) // 2)
    with caplog.at_level(logging.WARNING, logger="inference.engine.runner"):
        got = runner._forward(items)
    messages = [r.getMessage() for r in caplog.records]
    assert any("out of memory on a batch of 16 items; retrying in halves" in m for m in messages), messages
    assert not any("CPU copy" in m for m in messages), messages  # a single item fits under this cap
    assert len(got) == len(items)
    assert _same_detections(got, want) >= 16


def test_a_single_item_over_the_cap_runs_on_the_cpu_copy(runner, cuda, memory_cap, caplog):
    items = _items(runner)
    want = runner._forward(items[:1])
    memory_cap(None, headroom_bytes=2 * MIB)  # what the live tensors hold, and nothing for activations
    with caplog.at_level(logging.WARNING, logger="inference.engine.runner"):
        got = runner._forward(items[:1])
    messages = [r.getMessage() for r in caplog.records]
    assert any("running it on a CPU copy" in m for m in messages), messages
    assert runner.backend._cpu_network is not None  # the copy was made, on the host
    scores_want = torch.as_tensor(want[0].scores).cpu()
    scores_got = torch.as_tensor(got[0].scores).cpu()
    assert len(got[0]) == len(want[0]) >= 1
    torch.testing.assert_close(scores_got, scores_want, atol=2e-3, rtol=0)  # cuDNN and the CPU's kernels differ


def test_reads_that_cannot_fit_fail_with_resource_exhausted_and_the_next_read_succeeds(runner, cuda, memory_cap):
    """Under a cap, a large study's preprocessing (its voxels alone are 210 MB on the device) and a forward pass
    with the CPU fallback off each fail their read with RESOURCE_EXHAUSTED; without the cap, the next read runs."""
    runner.oom_cpu_fallback = False
    large = make_chest_ct(4, shape=(512, 512, 200), pixel_spacing_mm=0.7, slice_spacing_mm=1.5, n_nodules=1).volume
    small = make_chest_ct(3, shape=(160, 160, 40), pixel_spacing_mm=1.0, slice_spacing_mm=2.5, n_nodules=1).volume

    async def go() -> list[BaseException | object]:
        outcomes: list[BaseException | object] = []
        await runner.start()
        try:
            memory_cap(None, headroom_bytes=64 * MIB)
            with pytest.raises(LimitExceededError) as preprocessing:
                await runner.read(large, request_id="large")
            outcomes.append(preprocessing.value)
            memory_cap(None)
            prepared = runner.task.prepare(small)  # its patches on the GPU, then no room for the forward pass
            memory_cap(None, headroom_bytes=2 * MIB)
            with pytest.raises(LimitExceededError) as forward:
                await runner.batcher.submit("no-room", prepared.items)
            outcomes.append(forward.value)
            memory_cap(None)
            outcomes.append(await runner.read(small, request_id="next"))
        finally:
            await runner.stop()
        return outcomes

    preprocessing, forward, result = asyncio.run(go())
    for error in (preprocessing, forward):
        assert grpc.StatusCode[error.code] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "ran out of GPU memory preparing a 512x512x200 study" in preprocessing.message
    assert "ran out of memory on a single work item" in forward.message
    assert runner.batcher.dead_error is None
    assert isinstance(result.findings, list) and np.isfinite(result.timing_ms["infer"])
