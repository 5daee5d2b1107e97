"""Local PyTorch backend: the network on CUDA when available, else the CPU.

Also the host-to-device side of preprocessing (:func:`device_work`): on CUDA, a study's voxels are staged in
pinned host memory and copied, and preprocessed, on the calling thread's own stream, so that transfers and
preprocessing overlap the forward passes, which run on the default stream in the batcher's thread.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.backends.base import Backend
from inference.backends.weights import load_state_dict
from inference.platform import autocast_dtype, pairs_lone_item

logger = logging.getLogger(__name__)


class TorchBackend(Backend):
    name = "torch"

    def __init__(
        self, network: torch.nn.Module, device: torch.device, *, autocast: str = "none", compile: bool = False
    ) -> None:
        """``compile``: run the network through ``torch.compile`` (CUDA only; ignored on the CPU, where the
        small reference models gain nothing). Compilation happens on the first calls: warm up before serving."""
        self._device = device
        self._network = network.to(device).eval()
        self._autocast_dtype = autocast_dtype(device, autocast)
        self._compiled: Any = None
        if compile:
            self.enable_compile()
        self._cpu_network: torch.nn.Module | None = None  # made on the first out-of-memory fallback
        self._cpu_lock = threading.Lock()

    @classmethod
    def from_weights(
        cls,
        network: torch.nn.Module,
        weights: Path,
        device: torch.device,
        *,
        autocast: str = "none",
        compile: bool = False,
    ) -> TorchBackend:
        """The backend of ``network`` with the state dict in ``weights`` loaded (:mod:`inference.backends.weights`)."""
        return cls(load_state_dict(network, weights), device, autocast=autocast, compile=compile)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def compiled(self) -> bool:
        """Whether forward passes go through ``torch.compile`` (warm up with several batch sizes)."""
        return self._compiled is not None

    def enable_compile(self, *, on_cpu: bool = False) -> None:
        """Forward passes through ``torch.compile`` from now on (compiles on the next calls). CUDA only, unless
        ``on_cpu`` (benchmarks/compile_check.py's CPU rehearsal: the small reference models gain nothing there)."""
        if self._device.type != "cuda" and not on_cpu:
            logger.info("torch.compile applies on CUDA only; the network runs eagerly on %s", self._device)
        elif self._compiled is None:
            self._compiled = torch.compile(self._network)

    def disable_compile(self) -> None:
        """Back to eager execution (compilation failed, e.g. no C compiler for Triton)."""
        self._compiled = None

    def pairs_lone_item(self, item: torch.Tensor) -> bool:
        return pairs_lone_item(self._device, item)

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> Any:
        batch = batch.to(self._device, non_blocking=True)
        network = self._compiled if self._compiled is not None else self._network
        if self._autocast_dtype is None:
            return network(batch)
        with torch.autocast(device_type=self._device.type, dtype=self._autocast_dtype):
            return network(batch)

    # -- out of GPU memory (the policy is in ModelRunner._forward) ------------------------------------------

    @property
    def can_fall_back_to_cpu(self) -> bool:
        """Whether :meth:`forward_on_cpu` runs somewhere else than :meth:`forward` (the model is on a GPU)."""
        return self._device.type != "cpu"

    def release_cached_memory(self) -> None:
        """Return cached, unused GPU blocks to the driver (after an out-of-memory error)."""
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def memory_allocated_bytes(self) -> int | None:
        """GPU memory held by tensors on this backend's device; None on the CPU."""
        if self._device.type != "cuda":
            return None
        return int(torch.cuda.memory_allocated(self._device))

    def _cpu_copy(self) -> torch.nn.Module:
        """A CPU copy of the network, made once, parameter by parameter (no second copy on the GPU)."""
        with self._cpu_lock:
            if self._cpu_network is None:
                memo: dict[int, object] = {}
                for p in self._network.parameters():
                    memo[id(p)] = torch.nn.Parameter(p.detach().to("cpu"), requires_grad=p.requires_grad)
                for b in self._network.buffers():
                    memo[id(b)] = b.detach().to("cpu")
                self._cpu_network = copy.deepcopy(self._network, memo).eval()
                logger.warning("made a CPU copy of the network for out-of-memory fallback")
            return self._cpu_network

    @torch.inference_mode()
    def forward_on_cpu(self, batch: torch.Tensor) -> Any:
        """Run the network's CPU copy on ``batch`` (fp32); outputs are on the CPU."""
        return self._cpu_copy()(batch.to("cpu"))

    def close(self) -> None:
        self._cpu_network = None
        self._network.to("cpu")
        if self._device.type == "cuda":
            torch.cuda.empty_cache()


# -- host -> device for preprocessing ----------------------------------------------------------------------------


def pinned_host_memory_bytes() -> int | None:
    """Host memory held by torch's pinned (page-locked) allocator, its cached blocks included; None without CUDA.

    These are :meth:`DeviceWork.to_device`'s staging buffers. The allocator rounds each up to a power of two (a
    314 MB float32 CT takes 512 MiB) and keeps it for the next study, so the figure grows to about the largest
    studies preprocessed at once and stays there: part of the server's resident memory, not of any one read.
    """
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    stats = getattr(torch.cuda, "host_memory_stats", None)  # torch >= 2.7
    if stats is None:
        return None
    return int(stats().get("allocated_bytes.current", 0))


class DeviceWork:
    """What :func:`device_work` yields: ``to_device`` for host arrays, ``hand_off`` for the block's results."""

    def __init__(self, device: torch.device, stream: Any = None) -> None:
        self.device = device
        self._stream = stream

    def to_device(self, array: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A float32 host array on the device: no copy on the CPU; pinned staging and an async copy on CUDA."""
        if isinstance(array, np.ndarray):
            array = np.ascontiguousarray(array, dtype=np.float32)
        host = torch.as_tensor(array, dtype=torch.float32)
        if self.device.type != "cuda":
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

    def hand_off(self, *tensors: torch.Tensor) -> None:
        """Tensors made in the block will be used by forward passes on the default stream: tell the allocator."""
        if self._stream is None:
            return
        consumer = torch.cuda.default_stream(self.device)
        for tensor in tensors:
            if tensor.device.type == "cuda":
                tensor.record_stream(consumer)


_thread_streams = threading.local()


def _stream_for_this_thread(device: torch.device) -> Any:
    streams = getattr(_thread_streams, "by_device", None)
    if streams is None:
        streams = _thread_streams.by_device = {}
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return streams[device]


@contextlib.contextmanager
def device_work(device: torch.device | str) -> Iterator[DeviceWork]:
    """Run a block of preprocessing on ``device``: on CUDA on this thread's own stream (waited for on exit, so
    its results are complete before any other stream uses them); on the CPU, plainly."""
    device = torch.device(device)
    if device.type != "cuda":
        yield DeviceWork(device)
        return
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    stream = _stream_for_this_thread(device)
    with torch.cuda.stream(stream):
        yield DeviceWork(device, stream)
    stream.synchronize()
