"""GPU out-of-memory in the forward pass: halve the batch, then a CPU copy, else RESOURCE_EXHAUSTED for one read;
in stacking the batch, the same; in GPU preprocessing, RESOURCE_EXHAUSTED for that read.

There is no GPU here, so a backend wrapper injects ``torch.OutOfMemoryError`` (what CUDA raises) around the
real lung nodule network on the CPU, and torch.stack and the host-to-device copy of preprocessing raise it
where CUDA would: mocking what cannot run, not the model. tests/benchmarks/test_gpu_oom.py runs out of real GPU
memory on CUDA. The network is seeded and its
classification layer re-drawn wide (no trained weights needed), so that the patches have detections to compare.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from inference.backends.base import Backend
from inference.backends.torch import DeviceWork, TorchBackend
from inference.engine.runner import ModelRunner, ReadResult
from inference.errors import LimitExceededError
from inference.phantoms import make_chest_ct

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
def parts(wide_lung_network):
    config, task, network = wide_lung_network
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


# -- out of memory outside the forward pass: stacking the batch, preprocessing on the device --------------------
# The real exception type is raised where CUDA would raise it: in torch.stack of the batch (the runner stacks the
# batcher's items) and in the host-to-device copy of GPU preprocessing (DeviceWork.to_device).


def oom_in_stack(monkeypatch: pytest.MonkeyPatch, item_shape: tuple[int, ...], *, above: int) -> list[int]:
    """Make torch.stack of work items raise torch.OutOfMemoryError for more than ``above`` items; returns the sizes
    of the stacks of work items tried. Stacks of anything else (MONAI's, the decoder's) run as usual."""
    real = torch.stack
    sizes: list[int] = []

    def stack(tensors, *args, **kwargs):
        tensors = list(tensors)
        if tensors and tuple(tensors[0].shape) == tuple(item_shape):
            sizes.append(len(tensors))
            if len(tensors) > above:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 54.00 MiB (injected)")
        return real(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "stack", stack)
    return sizes


def oom_in_preprocessing(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make GPU preprocessing's host-to-device copy raise torch.OutOfMemoryError; returns the sizes tried."""
    sizes: list[int] = []

    def to_device(self, array):
        sizes.append(int(np.asarray(array).size))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 300.00 MiB (injected in preprocessing)")

    monkeypatch.setattr(DeviceWork, "to_device", to_device)
    return sizes


def test_oom_while_stacking_a_batch_retries_in_halves_with_the_same_results(parts, reference, monkeypatch):
    config, task, backend, volume = parts
    injector = OomInjector(backend, max_batch=99)  # the forward itself never runs out
    sizes = oom_in_stack(monkeypatch, task.item_shape, above=1)
    result = read(ModelRunner(config, task, injector), volume)
    assert sizes[:3] == [4, 2, 1] and sorted(sizes) == [1, 1, 1, 1, 2, 2, 4], sizes
    assert injector.batch_sizes == [1, 1, 1, 1]  # only the single items were stacked, and forwarded
    assert injector.releases == 3
    np.testing.assert_allclose(summary(result), reference, rtol=1e-4, atol=1e-3)


def test_an_item_that_cannot_be_stacked_on_the_gpu_is_batched_on_the_host_for_the_cpu_copy(
    parts, reference, monkeypatch
):
    config, task, backend, volume = parts
    injector = OomInjector(backend, max_batch=99, cpu_fallback=True)
    sizes = oom_in_stack(monkeypatch, task.item_shape, above=0)
    result = read(ModelRunner(config, task, injector), volume)
    assert sorted(sizes) == [1, 1, 1, 1, 2, 2, 4]
    assert injector.batch_sizes == [] and injector.cpu_items == 4
    np.testing.assert_allclose(summary(result), reference, rtol=1e-4, atol=1e-3)


def test_oom_while_stacking_without_fallback_fails_that_read_with_resource_exhausted(parts, reference, monkeypatch):
    config, task, backend, volume = parts
    runner = ModelRunner(config, task, OomInjector(backend, max_batch=99, cpu_fallback=True), oom_cpu_fallback=False)

    async def go() -> tuple[BaseException, ReadResult]:
        await runner.start()
        try:
            with monkeypatch.context() as patch:
                oom_in_stack(patch, task.item_shape, above=0)
                with pytest.raises(LimitExceededError) as failed:
                    await runner.read(volume, request_id="too-big")
            return failed.value, await runner.read(volume, request_id="next")
        finally:
            await runner.stop()

    error, result = asyncio.run(go())
    assert grpc.StatusCode[error.code] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "lung_nodule_ct:1 ran out of memory on a single work item" in error.message
    assert runner.batcher.dead_error is None
    np.testing.assert_allclose(summary(result), reference, rtol=1e-4, atol=1e-3)


def test_oom_in_gpu_preprocessing_fails_that_read_with_resource_exhausted_and_the_next_read_succeeds(
    parts, reference, monkeypatch
):
    config, task, backend, volume = parts
    injector = OomInjector(backend, max_batch=99)
    runner = ModelRunner(config, task, injector)

    async def go() -> tuple[BaseException, list[int], ReadResult]:
        await runner.start()
        try:
            with monkeypatch.context() as patch:
                sizes = oom_in_preprocessing(patch)
                with pytest.raises(LimitExceededError) as failed:
                    await runner.read(volume, request_id="too-big")
            return failed.value, sizes, await runner.read(volume, request_id="next")
        finally:
            await runner.stop()

    error, sizes, result = asyncio.run(go())
    assert sizes == [int(np.prod(volume.shape))]  # the study's voxels were on their way to the device
    assert grpc.StatusCode[error.code] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.message == (
        "model lung_nodule_ct:1 ran out of GPU memory preparing a 160x160x40 study; retry later or on a larger device"
    )
    assert injector.releases == 1 and injector.batch_sizes == [4]  # cache returned; only the next read forwarded
    np.testing.assert_allclose(summary(result), reference, rtol=1e-4, atol=1e-3)


@pytest.mark.server
def test_out_of_gpu_memory_reaches_the_client_as_resource_exhausted(model_repo, monkeypatch):
    """Through the real servicer and error interceptor (in this process, so that the exception can be injected):
    an OOM in preprocessing and one in stacking the batch each give the client RESOURCE_EXHAUSTED with the
    runner's message, never INTERNAL, and the server goes on reading."""
    from inference.api.server import RadserveServer
    from inference.client import ReadingClient
    from inference.config import ServerConfig
    from inference.phantoms import write_dicom_series
    from inference.serverproc import free_port

    repo = model_repo("lung_nodule_ct")
    phantom = make_chest_ct(5, shape=(96, 96, 32), pixel_spacing_mm=1.5, slice_spacing_mm=3.0, n_nodules=1)
    files = write_dicom_series(phantom, repo.parent / "study")
    config = ServerConfig(
        port=free_port(), models=repo, device="cpu", metrics_port=0, model_poll_interval_s=0.0, io_threads=1
    )
    item_shape = (1, 96, 96, 96)

    async def go() -> list[tuple[grpc.StatusCode, str]]:
        server = RadserveServer(config)
        await server.start()
        client = ReadingClient(f"127.0.0.1:{server.port}")
        outcomes = []
        try:
            for inject in (oom_in_preprocessing, lambda p: oom_in_stack(p, item_shape, above=0), None):
                with monkeypatch.context() as patch:
                    if inject is not None:
                        inject(patch)
                    try:
                        response = await asyncio.to_thread(client.read, files, timeout_s=120)
                        outcomes.append((grpc.StatusCode.OK, f"{len(response.findings)} findings"))
                    except grpc.RpcError as exc:
                        outcomes.append((exc.code(), exc.details()))
        finally:
            client.close()
            await server.stop()
        return outcomes

    preprocessing, stacking, after = asyncio.run(go())
    assert preprocessing == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "model lung_nodule_ct:1 ran out of GPU memory preparing a 96x96x32 study; retry later or on a larger device",
    )
    assert stacking[0] == grpc.StatusCode.RESOURCE_EXHAUSTED, stacking
    assert "ran out of memory on a single work item" in stacking[1]
    assert after[0] == grpc.StatusCode.OK, after
