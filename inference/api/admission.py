"""Who may read now: uploads apart from computing reads, a cap per client, and a memory budget.

A read passes three gates (docs/decisions.md, "Admission: uploads apart from compute, memory by estimate"):

1. **Upload** (:meth:`Admission.upload`), before a byte of the payload is received: refused with UNAVAILABLE when
   the server drains, when every compute slot is taken (no upload is received that could not run now), when
   ``max_uploads`` reads are already receiving, or when the client (its tenant with tokens, else its IP address)
   already has ``max_reads_per_client`` reads in progress. A read receiving its payload holds no compute slot, so
   slow or idle uploads cannot starve the reads being computed; the receive deadline
   (:class:`inference.api.upload.ReceiveDeadline`) ends the idle ones.
2. **Compute** (:meth:`Admission.compute`), once the payload is decoded: a compute slot (``max_in_flight``, UNAVAILABLE
   when none is free) and the read's estimated peak memory (:func:`estimate_peak_bytes`) from the memory budget. A
   read that does not fit now waits, in order, until it fits or its deadline (or ``max_admission_wait_s``) passes
   (UNAVAILABLE); one larger than the whole budget gets RESOURCE_EXHAUSTED at once.
   A read that computes while its upload goes on (a progressive read, :mod:`inference.api.progressive`) takes its
   slot and memory early, and holds them for as long as its client takes to upload: it gets them only when they are
   free at once, within :data:`PROGRESSIVE_SHARE` of the slots and of the budget and without overtaking a read that
   waits for memory (:meth:`Admission.compute_while_uploading`); otherwise it computes after its upload, here. So
   slow uploaders can never hold the slots that finished uploads need.
3. Before anything is built for the model: the preprocessed grid against ``InputLimits.max_grid_voxels`` and the
   study against the model's declared minimum input (FAILED_PRECONDITION), see :func:`check_for_model`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference.errors import InputTooSmallError, LimitExceededError, OverloadedError, ShuttingDownError
from inference.io.limits import InputLimits
from inference.io.volume import LPS_TO_RAS, Volume
from inference.modelrepo.schema import ModelConfig

logger = logging.getLogger(__name__)

GIB = 1024**3
# Bytes per voxel of the preprocessed grid at a read's peak: the resampling grid (3 float32 per voxel), its output,
# the normalised copy and the padded copy the patches are cut from (float32 each), and a segmentation's blended
# probabilities and weights; per voxel of the input: its float32 voxels, held until the study is prepared, and a
# segmentation's probability map resampled back onto the input grid. Upper estimates of what preprocess, patch
# extraction and finalize hold at once (RELIABILITY.md, "Memory admission", compares them with measured peaks).
GRID_BYTES_PER_VOXEL = 32
INPUT_BYTES_PER_VOXEL = 12
BASE_READ_BYTES = 16 * 1024**2  # per read, whatever its size: buffers, findings, the response
# The part of the compute slots (rounded down) and of the memory budget that reads computing while they upload may
# hold: the rest stays for reads whose upload has ended.
PROGRESSIVE_SHARE = 0.5


def machine_memory_bytes() -> int:
    """Physical memory, or the cgroup's memory limit when lower (a container)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")):
        try:
            text = limit_file.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def default_memory_budget_bytes() -> int:
    """Half of the machine's (or container's) memory: the rest is the models, the runtime and the decode workers."""
    return machine_memory_bytes() // 2


def client_key(tenant: str | None, peer: str) -> str:
    """Whose reads count together: the tenant with tokens, else the peer's IP address (a gRPC peer string such as
    ``ipv4:127.0.0.1:50312`` or ``ipv6:[::1]:50312`` without its port)."""
    if tenant is not None:
        return f"tenant {tenant}"
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        address = rest.rpartition(":")[0]
        return f"peer {address.strip('[]')}"
    return f"peer {kind or 'unknown'}"


class MemoryBudget:
    """Bytes reserved by reads against ``total_bytes``; waiters are served in arrival order."""

    def __init__(self, total_bytes: int) -> None:
        if total_bytes < 1:
            raise ValueError(f"the memory budget must be >= 1 byte, got {total_bytes!r}")
        self.total_bytes = total_bytes
        self.reserved_bytes = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def _wake(self) -> None:
        while self._waiters:
            size, future = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            if self.reserved_bytes + size > self.total_bytes:
                return
            self.reserved_bytes += size
            self._waiters.popleft()
            future.set_result(None)

    async def reserve(self, size: int, timeout_s: float) -> None:
        """Reserve ``size`` bytes, waiting up to ``timeout_s`` behind earlier waiters; raises TimeoutError."""
        if not self._waiters and self.reserved_bytes + size <= self.total_bytes:
            self.reserved_bytes += size
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((size, future))
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except BaseException:
            if future.done() and not future.cancelled():
                self.release(size)  # reserved just as the wait ended
            else:
                future.cancel()
            self._wake()
            raise

    @property
    def waiting(self) -> bool:
        """Whether a read is waiting for memory."""
        return any(not future.done() for _, future in self._waiters)

    def try_reserve(self, size: int) -> bool:
        """Reserve ``size`` bytes now if they fit (uploads, which cannot wait mid-stream); False if not."""
        if self.reserved_bytes + size > self.total_bytes:
            return False
        self.reserved_bytes += size
        return True

    def release(self, size: int) -> None:
        self.reserved_bytes -= size
        self._wake()


@dataclass(frozen=True)
class AdmissionConfig:
    max_in_flight: int = 64
    max_uploads: int = 256
    max_reads_per_client: int = 128
    memory_budget_bytes: int = 8 * GIB
    max_admission_wait_s: float = 120.0


class Admission:
    """The three gates of the module docstring; counters are read by metrics and the soak."""

    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config
        self.memory = MemoryBudget(config.memory_budget_bytes)
        self.uploading = 0
        self.computing = 0
        self.computing_while_uploading = 0
        self.bytes_while_uploading = 0
        self.by_client: Counter[str] = Counter()
        self.draining = False

    @contextlib.contextmanager
    def upload(self) -> Iterator[None]:
        """Admit a read into its upload phase (the client's count is :meth:`read`'s, for the whole read)."""
        config = self.config
        if self.computing >= config.max_in_flight:
            raise OverloadedError(f"server is at its limit of {config.max_in_flight} reads in flight; retry later")
        if self.uploading >= config.max_uploads:
            raise OverloadedError(f"server is receiving {self.uploading} uploads, its limit (max_uploads); retry later")
        self.uploading += 1
        try:
            yield
        finally:
            self.uploading -= 1

    @contextlib.contextmanager
    def read(self, client: str) -> Iterator[None]:
        """A read of ``client`` from its first message to its end: the per-client cap."""
        if self.draining:
            raise ShuttingDownError("server is shutting down; retry on another replica")
        if self.by_client[client] >= self.config.max_reads_per_client:
            raise OverloadedError(
                f"{client} has {self.by_client[client]} reads in progress, the per-client limit "
                f"(max_reads_per_client {self.config.max_reads_per_client}); retry when one ends"
            )
        self.by_client[client] += 1
        try:
            yield
        finally:
            self.by_client[client] -= 1
            if not self.by_client[client]:
                del self.by_client[client]

    @contextlib.asynccontextmanager
    async def compute(self, peak_bytes: int, deadline_s: float | None) -> AsyncIterator[None]:
        """A compute slot and ``peak_bytes`` of the memory budget for the rest of the read."""
        config = self.config
        if peak_bytes > self.memory.total_bytes:
            raise LimitExceededError(
                f"the read needs an estimated {peak_bytes / 1e6:.0f} MB, more than this server's whole memory budget "
                f"of {self.memory.total_bytes / 1e6:.0f} MB (memory_budget_gb)"
            )
        if self.computing >= config.max_in_flight:
            raise OverloadedError(f"server is at its limit of {config.max_in_flight} reads in flight; retry later")
        self.computing += 1
        try:
            wait_s = config.max_admission_wait_s
            if deadline_s is not None:
                wait_s = min(wait_s, max(deadline_s - time.monotonic(), 0.0))
            try:
                await self.memory.reserve(peak_bytes, wait_s)
            except TimeoutError:
                raise OverloadedError(
                    f"the read (an estimated {peak_bytes / 1e6:.0f} MB) waited {wait_s:.1f} s for memory that other "
                    f"reads hold ({self.memory.reserved_bytes / 1e6:.0f} of {self.memory.total_bytes / 1e6:.0f} MB); "
                    "retry later"
                ) from None
            try:
                yield
            finally:
                self.memory.release(peak_bytes)
        finally:
            self.computing -= 1

    @contextlib.contextmanager
    def compute_while_uploading(self, peak_bytes: int) -> Iterator[bool]:
        """Gate 2 for a read that computes while its upload goes on: a compute slot and ``peak_bytes`` of the budget
        if they are free now, within :data:`PROGRESSIVE_SHARE` of each and behind any read waiting for memory.
        Yields whether they were granted; a read refused goes on receiving and passes :meth:`compute` afterwards."""
        config = self.config
        granted = (
            self.computing < config.max_in_flight
            and self.computing_while_uploading < int(config.max_in_flight * PROGRESSIVE_SHARE)
            and self.bytes_while_uploading + peak_bytes <= self.memory.total_bytes * PROGRESSIVE_SHARE
            and not self.memory.waiting
            and self.memory.try_reserve(peak_bytes)
        )
        if not granted:
            yield False
            return
        self.computing += 1
        self.computing_while_uploading += 1
        self.bytes_while_uploading += peak_bytes
        try:
            yield True
        finally:
            self.memory.release(peak_bytes)
            self.bytes_while_uploading -= peak_bytes
            self.computing_while_uploading -= 1
            self.computing -= 1


# -- what a read will build ------------------------------------------------------------------------------------------


def grid_shape(volume: Volume, config: ModelConfig, *, padded: bool = True) -> tuple[int, ...]:
    """The shape of the grid the model's preprocessing resamples ``volume`` onto (3-D models: MONAI's Orientation to
    RAS then Spacing, then padded up to the ROI unless ``padded`` is False; projection models: their fixed input),
    computed from the geometry alone."""
    roi = tuple(int(s) for s in config.inferer.roi_size)
    if len(roi) == 2:
        return roi
    ras = LPS_TO_RAS @ volume.affine
    spacing = np.linalg.norm(ras[:3, :3], axis=0)
    shape = [1, 1, 1]
    for axis in range(3):
        world = int(np.argmax(np.abs(ras[:3, axis])))  # the RAS axis this voxel axis becomes after Orientation
        extent = volume.shape[axis] * spacing[axis]
        shape[world] = max(1, math.ceil(extent / float(config.preprocessing.spacing_mm[world]) - 1e-6))
    if not padded:
        return tuple(shape)
    return tuple(max(s, r) for s, r in zip(shape, roi, strict=True))


def estimate_peak_bytes(volume: Volume, config: ModelConfig) -> int:
    """What a read holds at its peak beyond its payload (reserved as it arrived): its input voxels and what
    preprocessing and the task build."""
    grid = math.prod(grid_shape(volume, config))
    inputs = math.prod(volume.shape)
    return BASE_READ_BYTES + INPUT_BYTES_PER_VOXEL * inputs + GRID_BYTES_PER_VOXEL * grid


def check_for_model(volume: Volume, config: ModelConfig, limits: InputLimits) -> None:
    """Before anything is built: the study is not smaller than the model's declared minimum input
    (FAILED_PRECONDITION) and the grid its preprocessing would build is within ``max_grid_voxels``."""
    minimum = config.input
    shape = volume.shape if len(config.inferer.roi_size) == 3 else volume.shape[:2]
    spacing = volume.spacing_mm[: len(shape)]
    what = f"model {config.name}:{config.version}"
    if minimum.min_shape and any(s < m for s, m in zip(shape, minimum.min_shape, strict=False)):
        raise InputTooSmallError(
            f"the study is {' x '.join(map(str, shape))} voxels; {what} reads studies of at least "
            f"{' x '.join(map(str, minimum.min_shape))} voxels (input.min_shape in its model.yaml)"
        )
    if minimum.min_extent_mm:
        extent = [s * d for s, d in zip(shape, spacing, strict=True)]
        if any(e < m for e, m in zip(extent, minimum.min_extent_mm, strict=False)):
            raise InputTooSmallError(
                f"the study covers {' x '.join(f'{e:.0f}' for e in extent)} mm; {what} reads studies of at least "
                f"{' x '.join(f'{m:g}' for m in minimum.min_extent_mm)} mm (input.min_extent_mm in its model.yaml)"
            )
    resampled = math.prod(grid_shape(volume, config, padded=False)) if len(config.inferer.roi_size) == 3 else 0
    limits.check_grid(
        grid_shape(volume, config), what, resampled_voxels=resampled, input_voxels=math.prod(volume.shape)
    )
