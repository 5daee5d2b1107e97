"""Decoding a streamed read while it arrives: which reader takes the upload (docs/decisions.md, "Progressive
reading").

:class:`Arrival` gives :func:`inference.api.upload.receive` its two hooks and starts, on the first call that
concerns it, a :class:`~inference.api.progressive.ProgressiveRead` for DICOM files (each file decoded once complete)
or a :class:`~inference.api.streamed.StreamedRead` for a NIfTI or RAW payload (each chunk as it arrives). Either may
start a slab read (:func:`~inference.api.progressive.slab_starter`) and is closed with the read (``held``).
:meth:`Arrival.finish` is theirs, or ``(None, None)`` (the whole-study path decodes the upload) when neither started.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import Executor

from inference.api.admission import Admission
from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.api.progressive import ProgressiveRead, StartSlabs, slab_starter
from inference.api.streamed import StreamedRead, plane_stream
from inference.api.upload import Upload
from inference.engine.progressive import SlabRead
from inference.engine.runner import ReadResult
from inference.io.limits import InputLimits
from inference.io.volume import Volume
from inference.io.workers import DecodeWorkers
from inference.serving.registry import ModelRegistry

__all__ = ["Arrival"]


class Arrival:
    """One streamed read's decode while it arrives; see the module docstring. ``reserve`` is the read's memory
    budget (decoded slices and planes count against it); ``held`` closes what was started when the read ends."""

    def __init__(
        self,
        *,
        registry: ModelRegistry,
        admission: Admission,
        limits: InputLimits,
        io_executor: Executor,
        decode_workers: DecodeWorkers | None,
        deadline_s: float | None,
        reserve: Callable[[int], None],
        held: contextlib.AsyncExitStack,
    ) -> None:
        self._registry = registry
        self._admission = admission
        self._limits = limits
        self._io = io_executor
        self._workers = decode_workers
        self._deadline_s = deadline_s
        self._reserve = reserve
        self._held = held
        self.progressive: ProgressiveRead | None = None
        self.streamed: StreamedRead | None = None
        self._stream_asked = False

    def _slab_starter(self, upload: Upload) -> tuple[contextlib.AsyncExitStack, StartSlabs]:
        stack = contextlib.AsyncExitStack()  # the slab read's model lease and compute admission
        start_slabs = slab_starter(
            upload.header,
            upload.request_id,
            stack,
            registry=self._registry,
            admission=self._admission,
            limits=self._limits,
            io_executor=self._io,
            deadline_s=self._deadline_s,
        )
        return stack, start_slabs

    def file_done(self, upload: Upload, index: int) -> None:
        """File ``index`` of a DICOM_FILES upload is complete: decode it."""
        if upload.payload != pb.DICOM_FILES:
            return
        if self.progressive is None:
            stack, start_slabs = self._slab_starter(upload)
            self.progressive = ProgressiveRead(
                upload.header,
                request_id=upload.request_id,
                limits=self._limits,
                io_executor=self._io,
                decode_workers=self._workers,
                deadline_s=self._deadline_s,
                reserve=self._reserve,
                start_slabs=start_slabs,
                stack=stack,
            )
            self._held.push_async_callback(self.progressive.aclose)
        upload.files[index] = bytes(upload.files[index])  # complete: pydicom and the workers take bytes
        self.progressive.file_done(index, upload.files[index])

    def chunk_added(self, upload: Upload, index: int, data: bytes) -> None:
        """A chunk of a NIfTI or RAW upload arrived: decode the planes it completes."""
        if not self._stream_asked:
            self._stream_asked = True
            stream = plane_stream(upload.header, self._limits, self._reserve)  # None: not NIfTI or RAW
            if stream is not None:
                stack, start_slabs = self._slab_starter(upload)
                self.streamed = StreamedRead(
                    stream, request_id=upload.request_id, io_executor=self._io, start_slabs=start_slabs, stack=stack
                )
                self._held.push_async_callback(self.streamed.aclose)
        if self.streamed is not None:
            self.streamed.chunk_added(index, data)

    async def finish(self, files: list) -> tuple[Volume | None, ReadResult | None]:
        """After the last byte: what the reader that started returns (see theirs), else ``(None, None)``."""
        if self.progressive is not None:
            return await self.progressive.finish(files)
        if self.streamed is not None:
            return await self.streamed.finish()
        return None, None

    @property
    def slabs(self) -> SlabRead | None:
        """The slab read that answered (after :meth:`finish` returned a result)."""
        reader = self.progressive or self.streamed
        return reader.slabs if reader is not None else None
