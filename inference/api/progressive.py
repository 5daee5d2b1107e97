"""Reading a DICOM upload while it arrives (docs/decisions.md, "Progressive reading").

A :class:`ProgressiveRead` is made for every streamed DICOM_FILES read. As each file completes
(:func:`inference.api.upload.receive`'s ``file_done``), it is decoded on its own in the decode workers, under their
time bound (:func:`inference.io.dicom.read_dicom_file`), and its header is parsed again in an I/O thread for the
series check at the end (bounded: the worker already read it). Decoded slices count against the memory budget.

With ``header.expected_instances``, the slices are placed on the grid the series will have
(:class:`~inference.io.assembly.SliceAssembly`); once that grid is fixed, ``start_slabs`` (the servicer's: model
lease, permission, minimum input, compute admission) may return a :class:`~inference.engine.progressive.SlabRead`,
which preprocesses and infers each patch as soon as its slices are in.

When the upload ends, :meth:`ProgressiveRead.finish` runs the series reader over every file with the decoded pixels
and parsed headers (every check, the same statuses as a whole-study read) and either finishes the slab read (the
reader agrees with the expected grid: same shape, affine, each slice where it was placed) or returns the volume for
the whole-study path. A file that failed to decode sends the read down the whole-study path too, so that its error is
the one a whole-study read gives; a decode that overran its time or crashed its worker fails the read at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor

import numpy as np

from inference.api.admission import Admission, check_for_model, estimate_peak_bytes
from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.api.interceptors import call_record_var
from inference.api.security import check_model_allowed
from inference.engine.progressive import SlabRead, start_slab_read
from inference.engine.runner import ReadResult, without_voxels
from inference.engine.scheduler import Priority
from inference.errors import (
    DeadlineExceededError,
    InvalidInputError,
    LimitExceededError,
    OverloadedError,
    RadserveError,
)
from inference.io.assembly import ExpectedGrid, SliceAssembly
from inference.io.dicom import read_dicom_file, read_dicom_header, read_dicom_series
from inference.io.limits import InputLimits
from inference.io.volume import Volume
from inference.io.workers import DecodeJob, DecodeTimeoutError, DecodeWorkers, WorkerCrashedError
from inference.serving.registry import ModelRegistry

logger = logging.getLogger(__name__)

__all__ = ["ProgressiveRead", "StartSlabs", "expected_instances", "slab_starter"]

_FATAL = (DecodeTimeoutError, WorkerCrashedError, DeadlineExceededError, OverloadedError)
_DEFLATED = b"1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: its inflate budget is per study

# start_slabs(first, grid, plane): the first decoded Volume (its modality and metadata), the grid the slab read fills
# and plane(k), its slice k once arrived.
StartSlabs = Callable[[Volume, ExpectedGrid, Callable[[int], np.ndarray]], Awaitable[SlabRead | None]]


def expected_instances(header: pb.ReadHeader, limits: InputLimits) -> int | None:
    """``header.expected_instances`` checked, or None when absent: 0 or another payload than DICOM files is
    INVALID_ARGUMENT; more than ``max_files`` is the file limit's RESOURCE_EXHAUSTED, before any file is sent."""
    if not header.HasField("expected_instances"):
        return None
    n = header.expected_instances
    if header.payload not in (pb.PAYLOAD_KIND_UNSPECIFIED, pb.DICOM_FILES):
        raise InvalidInputError("header.expected_instances applies to DICOM_FILES payloads only")
    if n < 1:
        raise InvalidInputError(f"header.expected_instances must be at least 1, got {n}")
    if n > limits.max_files:
        raise LimitExceededError(
            f"header.expected_instances declares {n} files, more than the limit of {limits.max_files} files per study"
        )
    return n


class ProgressiveRead:
    """One streamed DICOM_FILES read's files, decoded as they arrive; see the module docstring."""

    def __init__(
        self,
        header: pb.ReadHeader,
        *,
        request_id: str,
        limits: InputLimits,
        io_executor: Executor,
        decode_workers: DecodeWorkers | None,
        deadline_s: float | None,
        reserve: Callable[[int], None],
        start_slabs: StartSlabs,
        stack: contextlib.AsyncExitStack,
    ) -> None:
        self.header = header
        self.request_id = request_id
        self.limits = limits
        self._io = io_executor
        self._workers = decode_workers
        self._deadline_s = deadline_s
        self._reserve = reserve
        self._start_slabs = start_slabs
        expected = expected_instances(header, limits)
        self.assembly = SliceAssembly(expected) if expected is not None and expected >= 2 else None
        self.decoded: dict[int, np.ndarray] = {}
        self.headers: dict[int, object] = {}
        self.failed: str | None = None  # why the whole-study path must read this upload
        self.fatal: BaseException | None = None
        self.slabs: SlabRead | None = None
        self._starting: asyncio.Task | None = None
        self._tasks: list[asyncio.Task] = []
        self.stack = stack  # the slab read's model lease and compute admission

    @property
    def series_uid(self) -> str | None:
        return self.header.series_instance_uid or None

    def file_done(self, index: int, data: bytes) -> None:
        """File ``index`` is complete: decode it now (on the running loop, without waiting)."""
        self._tasks.append(asyncio.get_running_loop().create_task(self._file(index, data)))

    async def _decode(self, data: bytes) -> Volume:
        kwargs = {"limits": self.limits, "series_instance_uid": self.series_uid}
        if self._workers is None:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._io, functools.partial(read_dicom_file, data, **kwargs))
        job = DecodeJob("inference.io.dicom:read_dicom_file", kwargs, single_payload=True, request_id=self.request_id)
        return await self._workers.run(job, [data], self._deadline_s)

    async def _file(self, index: int, data: bytes) -> None:
        try:
            volume = await self._decode(data)
            self._reserve(volume.voxels.nbytes)
            if _DEFLATED not in data[:1024]:
                loop = asyncio.get_running_loop()
                self.headers[index] = await loop.run_in_executor(
                    self._io, functools.partial(read_dicom_header, index, data, limits=self.limits)
                )
        except _FATAL as exc:
            self.fatal = self.fatal or exc
            return
        except RadserveError as exc:
            self.failed = self.failed or f"file {index}: {type(exc).__name__}"
            return
        if volume.voxels.size:
            self.decoded[index] = volume.voxels
        if self.assembly is None:
            return
        placed = self.assembly.add(index, volume)
        if self.assembly.grid is not None and self._starting is None and self.assembly.broken is None:
            self._starting = asyncio.get_running_loop().create_task(self._start(volume))
        if placed and self.slabs is not None:
            self.slabs.slices_arrived(placed)

    async def _start(self, first: Volume) -> None:
        try:
            self.slabs = await self._start_slabs(first, self.assembly.grid, self.assembly.plane)
        except RadserveError as exc:  # the whole-study path, at the end, raises it again for the right reason
            logger.debug("request %s: no progressive read (%s)", self.request_id, type(exc).__name__)
            await self.stack.aclose()
            return
        if self.slabs is not None:
            self.slabs.slices_arrived(list(self.assembly.placed))

    async def finish(self, files: list) -> tuple[Volume | None, ReadResult | None]:
        """After the last byte: ``(volume, result)`` when the slab read answered; ``(volume, None)`` for the
        whole-study path (``volume`` with its voxels); ``(None, None)`` when a file failed to decode (the caller
        decodes the upload as a whole-study read, for that read's own error)."""
        await asyncio.gather(*self._tasks)
        if self._starting is not None:
            await self._starting
        if self.fatal is not None:
            raise self.fatal
        if self.failed is not None:
            logger.debug("request %s: whole-study decode (%s)", self.request_id, self.failed)
            await self.aclose()
            return None, None
        loop = asyncio.get_running_loop()
        read = functools.partial(
            read_dicom_series,
            files,
            series_instance_uid=self.series_uid,
            limits=self.limits,
            decoded=self.decoded,
            headers=self.headers,
        )
        volume = await loop.run_in_executor(self._io, functools.partial(read, pixels=False))
        slabs = self.slabs
        if slabs is not None and self.assembly.agrees_with(volume):
            result = await slabs.finish(volume)
            result.timing_ms["patches_before_upload_end"] = float(slabs.patches_before_end)
            return volume, result
        if slabs is not None:
            logger.info("request %s: the series is not the expected grid; read as a whole study", self.request_id)
        await self.aclose()
        return await loop.run_in_executor(self._io, read), None

    async def aclose(self) -> None:
        """Stop what is still running (a cancelled or failed read, or the whole-study fall-back) and release the
        slab read's lease and compute admission."""
        for task in [*self._tasks, *([self._starting] if self._starting is not None else [])]:
            task.cancel()
        if self.slabs is not None:
            self.slabs.cancel()
        await self.stack.aclose()


def slab_starter(
    header: pb.ReadHeader,
    request_id: str,
    stack: contextlib.AsyncExitStack,
    *,
    registry: ModelRegistry,
    admission: Admission,
    limits: InputLimits,
    io_executor: Executor,
    deadline_s: float | None,
) -> StartSlabs:
    """The ``start_slabs`` of one read: it starts a slab read once the grid is fixed, after what a whole-study read
    checks before it computes: the model's lease and permission, the model's own ``progressive``, the minimum input
    and the compute admission (entered on ``stack``, which the read closes when it ends)."""
    priority = Priority.STAT if header.priority == pb.STAT else Priority.ROUTINE

    async def start_slabs(first: Volume, grid: ExpectedGrid, plane: Callable[[int], np.ndarray]) -> SlabRead | None:
        if header.model:
            check_model_allowed(header.model)
        runner = await stack.enter_async_context(
            registry.lease(header.model or None, header.model_version or None, first.modality)
        )
        check_model_allowed(runner.config.name)
        record = call_record_var.get()
        if record is not None:  # a read cancelled or failed while its patches run is counted under its model
            record.model, record.model_version = runner.config.name, runner.config.version
        if not runner.config.progressive:
            return None
        stand_in = dataclasses.replace(
            without_voxels(first), voxels=np.broadcast_to(np.float32(0), grid.shape), affine=grid.affine
        )
        check_for_model(stand_in, runner.config, limits)
        if not stack.enter_context(admission.compute_while_uploading(estimate_peak_bytes(stand_in, runner.config))):
            logger.info(
                "request %s: no compute share free while uploading; the read computes after its upload", request_id
            )
            return None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            io_executor,
            functools.partial(
                start_slab_read,
                runner,
                grid.shape,
                grid.affine,
                plane,
                request_id=request_id,
                priority=priority,
                deadline_s=deadline_s,
                executor=io_executor,
            ),
        )

    return start_slabs
