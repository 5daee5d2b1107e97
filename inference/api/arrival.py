"""Decoding a streamed read while it arrives: which reader takes the upload (docs/decisions.md, "Progressive
reading").

:class:`Arrival` gives :func:`inference.api.upload.receive` its two hooks and starts, on the first call that
concerns it, a :class:`~inference.api.progressive.ProgressiveRead` for DICOM files (each file decoded once complete)
or a :class:`~inference.api.streamed.StreamedRead` for a NIfTI or RAW payload (each chunk as it arrives). Either
is closed with the read (``held``). :meth:`Arrival.finish` is theirs, or ``(None, None)`` (the whole-study path
decodes the upload) when neither started.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.api.progressive import ProgressiveRead
from inference.api.streamed import StreamedRead
from inference.api.upload import Upload
from inference.engine.progressive import SlabRead
from inference.engine.runner import ReadResult
from inference.io.volume import Volume

__all__ = ["Arrival"]


class Arrival:
    """One streamed read's decode while it arrives; see the module docstring."""

    def __init__(
        self,
        *,
        dicom: Callable[[Upload], ProgressiveRead],
        one_file: Callable[[Upload], StreamedRead | None],
        held: contextlib.AsyncExitStack,
    ) -> None:
        self._dicom = dicom
        self._one_file = one_file
        self._held = held
        self.progressive: ProgressiveRead | None = None
        self.streamed: StreamedRead | None = None
        self._stream_asked = False

    def file_done(self, upload: Upload, index: int) -> None:
        """File ``index`` of a DICOM_FILES upload is complete: decode it."""
        if upload.payload != pb.DICOM_FILES:
            return
        if self.progressive is None:
            self.progressive = self._dicom(upload)
            self._held.push_async_callback(self.progressive.aclose)
        upload.files[index] = bytes(upload.files[index])  # complete: pydicom and the workers take bytes
        self.progressive.file_done(index, upload.files[index])

    def chunk_added(self, upload: Upload, index: int, data: bytes) -> None:
        """A chunk of a NIfTI or RAW upload arrived: decode the planes it completes."""
        if not self._stream_asked:
            self._stream_asked = True
            self.streamed = self._one_file(upload)
            if self.streamed is not None:
                self._held.push_async_callback(self.streamed.aclose)
        if self.streamed is not None:
            self.streamed.chunk_added(index, data)

    async def finish(self, files: list) -> tuple[Volume | None, ReadResult | None]:
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
