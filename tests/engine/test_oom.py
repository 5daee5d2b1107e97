"""GPU out-of-memory in the forward pass: halve the batch, then a CPU copy, else RESOURCE_EXHAUSTED for one read.

There is no GPU here, so a backend wrapper injects ``torch.OutOfMemoryError`` (what CUDA raises) around the
real lung nodule network on the CPU: mocking what cannot run, not the model. The network is seeded and its
classification layer re-drawn wide (no trained weights needed), so that the patches have detections to compare.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from inference.backends.base import Backend
from inference.backends.torch import TorchBackend
from inference.engine.runner import ModelRunner, ReadResult
from inference.errors import LimitExceededError
from inference.modelrepo.schema import ModelConfig
from inference.phantoms import make_chest_ct
from inference.tasks.detection import DetectionTask

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


class OomInjector(Backend):
    """Wraps a TorchBackend; raises torch.OutOfMemoryError for batches above ``max_batch`` (or always)."""

    def __init__(self, inner: TorchBackend, *, max_batch: int = 1, always: bool = False, cpu_fallback: bool = False):
        self.inner = inner
        self.max_batch = max_batch
        self.always = always
        self.cpu_fallback = cpu_fallback
        self.batch_sizes: list[int] = []
        self.cpu_items = 0
        self.releases = 0

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def forward(self, batch: torch.Tensor) -> Any:
        self.batch_sizes.append(int(batch.shape[0]))
        if self.always or batch.shape[0] > self.max_batch:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return self.inner.forward(batch)

    def release_cached_memory(self) -> None:
        self.releases += 1

    @property
    def can_fall_back_to_cpu(self) -> bool:  # pretend the model sits on a GPU
        return self.cpu_fallback

    def forward_on_cpu(self, batch: torch.Tensor) -> Any:
        self.cpu_items += int(batch.shape[0])
        return self.inner.forward_on_cpu(batch)


@pytest.fixture(scope="module")
def parts():
    config = ModelConfig.from_yaml(ROOT / "models" / "lung_nodule_ct" / "1" / "model.yaml")
    task = DetectionTask(config, CPU)
    torch.manual_seed(0)
    network = task.build_network()
    with torch.no_grad():  # freshly initialised, every score sits at the prior (0.01): spread them
        torch.nn.init.normal_(network.classification_head.cls_logits.weight, std=0.5)
        network.classification_head.cls_logits.bias.zero_()
    backend = TorchBackend(network, CPU)
    # 160 mm per side in-plane: 2 x 2 x 1 patches of 96^3 at 1.5 mm, i.e. one batch of 4 (max_batch_size 4).
    phantom = make_chest_ct(3, shape=(160, 160, 40), pixel_spacing_mm=1.0, slice_spacing_mm=2.5, n_nodules=1)
    return config, task, backend, phantom.volume


def read(runner: ModelRunner, volume, request_id: str = "r") -> ReadResult:
    async def go() -> ReadResult:
        await runner.start()
        try:
            return await runner.read(volume, request_id=request_id)
        finally:
            await runner.stop()

    return asyncio.run(go())


def summary(result: ReadResult) -> list[tuple[float, ...]]:
    return [(f.score, *f.center_mm, f.diameter_mm) for f in result.findings]


@pytest.fixture(scope="module")
def reference(parts):
    config, task, backend, volume = parts
    result = read(ModelRunner(config, task, backend), volume)
    assert result.findings, "the re-drawn classifier should give findings to compare"
    return summary(result)


def test_oom_on_a_batch_retries_in_halves_with_the_same_results(parts, reference):
    config, task, backend, volume = parts
    injector = OomInjector(backend, max_batch=1)
    result = read(ModelRunner(config, task, injector), volume)
    assert injector.batch_sizes[:3] == [4, 2, 1], injector.batch_sizes  # 4 -> OOM, 2 -> OOM, then items alone
    assert sorted(injector.batch_sizes) == [1, 1, 1, 1, 2, 2, 4]
    assert injector.releases == 3  # the cache is emptied after each out-of-memory error
    np.testing.assert_allclose(summary(result), reference, rtol=1e-4, atol=1e-3)


def test_a_single_item_that_still_ooms_runs_on_the_cpu_copy(parts, reference):
    config, task, backend, volume = parts
    injector = OomInjector(backend, always=True, cpu_fallback=True)
    result = read(ModelRunner(config, task, injector), volume)
    assert injector.cpu_items == 4
    np.testing.assert_allclose(summary(result), reference, rtol=1e-4, atol=1e-3)


def test_oom_without_fallback_fails_that_read_with_resource_exhausted_and_the_next_read_succeeds(parts, reference):
    config, task, backend, volume = parts
    injector = OomInjector(backend, always=True, cpu_fallback=True)
    runner = ModelRunner(config, task, injector, oom_cpu_fallback=False)

    async def go() -> tuple[BaseException, ReadResult]:
        await runner.start()
        try:
            with pytest.raises(LimitExceededError) as failed:
                await runner.read(volume, request_id="too-big")
            injector.always = False  # memory is available again
            return failed.value, await runner.read(volume, request_id="next")
        finally:
            await runner.stop()

    error, result = asyncio.run(go())
    assert grpc.StatusCode[error.code] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "out of memory" in error.message and "lung_nodule_ct:1" in error.message
    assert injector.cpu_items == 0  # fallback disabled
    assert runner.batcher.dead_error is None
    np.testing.assert_allclose(summary(result), reference, rtol=1e-4, atol=1e-3)


def test_the_cpu_copy_is_made_once_and_matches_the_network():
    torch.manual_seed(1)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2), torch.nn.ReLU())
    backend = TorchBackend(network, CPU)
    batch = torch.randn(2, 1, 6, 6, 6)
    assert torch.equal(backend.forward_on_cpu(batch), backend.forward(batch))
    first = backend._cpu_copy()
    assert backend._cpu_copy() is first and first is not network
    assert not backend.can_fall_back_to_cpu and backend.memory_allocated_bytes() is None
