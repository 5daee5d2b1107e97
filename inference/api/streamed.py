"""Reading a NIfTI or RAW upload while it arrives (docs/decisions.md, "Progressive reading").

A :class:`StreamedRead` is made for every streamed NIFTI or RAW read. Each chunk, as it arrives
(:func:`inference.api.upload.receive`'s ``chunk_added``), goes to the read's
:class:`~inference.io.streaming.PlaneStream` in an I/O thread, one chunk after another in arrival order, which
converts every plane the chunk completes (a NIfTI's z-slices, a RAW array's x-planes). The header states the
grid, so no ``expected_instances`` is needed: once the stream has read it, ``start_slabs`` (the servicer's
:func:`~inference.api.progressive.slab_starter`) may start a slab read, which preprocesses and infers each patch as
soon as its planes are in.

When the upload ends, :meth:`StreamedRead.finish` returns the decoded volume (and the slab read's findings) when
the stream could prove it is what the whole-payload reader returns; otherwise the whole-study path reads the upload
in its decode worker, for its own answer or its own error and message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.api.progressive import StartSlabs
from inference.api.upload import MODALITIES, raw_description
from inference.engine.progressive import SlabRead
from inference.engine.runner import ReadResult
from inference.errors import RadserveError
from inference.io.limits import InputLimits
from inference.io.streaming import NiftiPlaneStream, PlaneStream, RawPlaneStream
from inference.io.volume import Volume

logger = logging.getLogger(__name__)

__all__ = ["StreamedRead", "plane_stream"]


def plane_stream(
    header: pb.ReadHeader, limits: InputLimits, reserve: Callable[[int], None] | None
) -> PlaneStream | None:
    """The :class:`PlaneStream` of a streamed NIFTI or RAW read; None for another payload or a modality the
    whole-study path refuses (it says why)."""
    modality = header.modality or "CT"
    if modality not in MODALITIES:
        return None
    if header.payload == pb.NIFTI:
        return NiftiPlaneStream(modality, limits, reserve)
    if header.payload == pb.RAW:
        return RawPlaneStream(**raw_description(header.raw), modality=modality, limits=limits, reserve=reserve)
    return None


class StreamedRead:
    """One streamed NIfTI or RAW read's payload, decoded as it arrives; see the module docstring."""

    def __init__(
        self,
        stream: PlaneStream,
        *,
        request_id: str,
        io_executor: Executor,
        start_slabs: StartSlabs,
        stack: contextlib.AsyncExitStack,
    ) -> None:
        self.stream = stream
        self.request_id = request_id
        self._io = io_executor
        self._start_slabs = start_slabs
        self.stack = stack  # the slab read's model lease and compute admission
        self.slabs: SlabRead | None = None
        self._lock = asyncio.Lock()  # one chunk at a time, in arrival order (waiters are woken first in, first out)
        self._tasks: list[asyncio.Task] = []
        self._starting: asyncio.Task | None = None
        self._more_files = False

    def chunk_added(self, index: int, data: bytes) -> None:
        """Chunk ``data`` of file ``index`` arrived: feed it to the stream (on the running loop, without waiting)."""
        if index != 0:  # a second file: the whole-study path refuses it, with its message
            self._more_files = True
            return
        self._tasks.append(asyncio.get_running_loop().create_task(self._feed(data)))

    async def _feed(self, data: bytes) -> None:
        async with self._lock:
            loop = asyncio.get_running_loop()
            placed = await loop.run_in_executor(self._io, self.stream.feed, data)
        stream = self.stream
        if stream.failed is not None:
            if self.slabs is not None:  # its answer would be discarded: stop its work now
                self.slabs.cancel()
            return
        if stream.grid is not None and self._starting is None:
            self._starting = asyncio.get_running_loop().create_task(self._start())
        if placed and self.slabs is not None:
            self.slabs.slices_arrived(placed)

    async def _start(self) -> None:
        stream = self.stream
        first = Volume(voxels=np.zeros((0, 0, 0), np.float32), affine=stream.grid.affine, modality=stream.modality)
        try:
            self.slabs = await self._start_slabs(first, stream.grid, stream.plane)
        except RadserveError as exc:  # the whole-study path, at the end, raises it again for the right reason
            logger.debug("request %s: no progressive read (%s)", self.request_id, type(exc).__name__)
            await self.stack.aclose()
            return
        if self.slabs is not None and stream.failed is None:
            self.slabs.slices_arrived(list(range(stream.planes_done)))

    async def finish(self) -> tuple[Volume | None, ReadResult | None]:
        """After the last byte: ``(volume, result)`` when the slab read answered; ``(volume, None)`` for the
        whole-study path with the decoded volume; ``(None, None)`` when the whole-study path must decode the upload."""
        await asyncio.gather(*self._tasks)
        if self._starting is not None:
            await self._starting
        volume = None if self._more_files else self.stream.volume()
        if volume is None:
            why = "more than one file" if self._more_files else self.stream.failed or "incomplete"
            logger.debug("request %s: whole-payload decode (%s)", self.request_id, why)
            await self.aclose()
            return None, None
        slabs = self.slabs
        if slabs is None:
            await self.aclose()
            return volume, None
        result = await slabs.finish(volume)
        result.timing_ms["patches_before_upload_end"] = float(slabs.patches_before_end)
        return volume, result

    async def aclose(self) -> None:
        """Stop what is still running and release the slab read's lease and compute admission."""
        for task in [*self._tasks, *([self._starting] if self._starting is not None else [])]:
            task.cancel()
        if self.slabs is not None:
            self.slabs.cancel()
        await self.stack.aclose()
