"""Receiving one study from a Read stream: header first, then chunks, with limits checked as bytes arrive and a
receive deadline between them (:class:`ReceivePolicy`); then decoding it (:func:`decode`)."""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.api.ingest import IngestPolicy, is_referenced, referenced_payload
from inference.api.interceptors import request_id_var
from inference.errors import DeadlineExceededError, InvalidInputError, LimitExceededError, quote
from inference.io.base import VolumeReader
from inference.io.dicom import DicomSeriesReader
from inference.io.limits import InputLimits
from inference.io.nifti import NiftiReader
from inference.io.raw import RawReader
from inference.io.volume import Volume

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
MODALITIES = ("CT", "MR", "CR", "DX")


@dataclass
class Upload:
    header: pb.ReadHeader
    request_id: str
    files: list[bytearray | bytes] = field(default_factory=list)  # streamed payload; empty for a referenced one
    total_bytes: int = 0
    receive_ms: float = 0.0

    @property
    def payload(self) -> int:
        return self.header.payload or pb.DICOM_FILES


def _request_id(header: pb.ReadHeader) -> str:
    if not header.request_id:
        return uuid.uuid4().hex[:16]
    if not _REQUEST_ID.match(header.request_id):
        raise InvalidInputError("header.request_id must be 1-64 characters of [A-Za-z0-9._:-]")
    return header.request_id


@dataclass(frozen=True)
class ReceivePolicy:
    """How fast a Read's payload must arrive (ServerConfig ``upload_*``): the first chunk (or, for a header that
    references its payload, the end of the stream) within ``first_chunk_timeout_s`` of the call's start; after the
    first chunk, at least ``min_bytes_per_s`` on average, with ``rate_grace_s`` of slack: by ``t`` seconds after the
    first chunk, ``min_bytes_per_s * (t - rate_grace_s)`` bytes must have arrived. The defaults let a 157 MB study
    arrive over a 1 Mbit/s link (20 minutes) and end a stream that sends a header and nothing else within 30 s."""

    first_chunk_timeout_s: float = 30.0
    min_bytes_per_s: float = 16 * 1024
    rate_grace_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.first_chunk_timeout_s <= 86_400:
            raise ValueError(f"upload_first_chunk_timeout_s must be in (0, 86400], got {self.first_chunk_timeout_s!r}")
        if not 0 <= self.min_bytes_per_s <= 1e10:
            raise ValueError(f"upload_min_bytes_per_s must be in [0, 1e10], got {self.min_bytes_per_s!r}")
        if not 0 < self.rate_grace_s <= 86_400:
            raise ValueError(f"upload_rate_grace_s must be in (0, 86400], got {self.rate_grace_s!r}")

    def next_message_by(self, start: float, first_chunk_at: float | None, received: int) -> float:
        """The monotonic time by which the next message must arrive."""
        if first_chunk_at is None:
            return start + self.first_chunk_timeout_s
        if self.min_bytes_per_s == 0:
            return math.inf
        return first_chunk_at + self.rate_grace_s + received / self.min_bytes_per_s

    def overdue(self, first_chunk_at: float | None, received: int, now: float, start: float) -> str:
        if first_chunk_at is None:
            return (
                f"no payload arrived within {self.first_chunk_timeout_s:g} s of the Read's start "
                "(upload_first_chunk_timeout_s); send the header and the first chunk without waiting"
            )
        return (
            f"the upload slowed below {self.min_bytes_per_s:g} bytes/s (upload_min_bytes_per_s): {received} bytes in "
            f"{now - start:.0f} s"
        )


class ReceiveTimeoutError(DeadlineExceededError):
    """The payload did not arrive as fast as :class:`ReceivePolicy` asks (DEADLINE_EXCEEDED)."""


class UploadAssembler:
    """The Read stream's messages in, one :class:`Upload` out: the header first, then chunks, every limit checked as
    each message arrives (synchronous: :func:`receive` feeds it, and so does the fuzzer). ``reserve(n)`` is called
    before ``n`` more payload bytes are kept (the server's memory budget; it raises to refuse them)."""

    def __init__(self, limits: InputLimits, reserve: Callable[[int], None] | None = None) -> None:
        self.limits = limits
        self.reserve = reserve
        self.upload: Upload | None = None

    def add(self, message: pb.ReadRequest) -> bytes | None:
        """Take one message; returns a chunk's bytes (kept), None for the header."""
        limits = self.limits
        kind = message.WhichOneof("kind")
        if kind == "header":
            if self.upload is not None:
                raise InvalidInputError("the header was sent twice; send it once, as the first message")
            self.upload = Upload(message.header, _request_id(message.header))
            request_id_var.set(self.upload.request_id)  # so that a failure while chunks arrive is logged under it
            return None
        upload = self.upload
        if upload is None:
            raise InvalidInputError("the first message of a Read must be the header")
        if kind != "chunk":
            raise InvalidInputError("a Read message must carry a header or a chunk")
        if is_referenced(upload.header):
            raise InvalidInputError(
                "the header references its payload (header.shared_memory or header.file); send no chunks"
            )
        chunk = message.chunk
        data = chunk.data  # each access of a bytes field copies it: read it once
        if len(data) > limits.max_chunk_bytes:
            raise LimitExceededError(
                f"chunk of {len(data)} bytes exceeds the chunk limit of {limits.max_chunk_bytes} bytes"
            )
        if upload.total_bytes + len(data) > limits.max_request_bytes:
            raise LimitExceededError(f"upload exceeds the request limit of {limits.max_request_bytes} bytes")
        index = chunk.file_index
        if index == len(upload.files):
            if index >= limits.max_files:
                raise LimitExceededError(f"upload exceeds the limit of {limits.max_files} files per study")
        elif index > len(upload.files):
            raise InvalidInputError(
                f"chunk for file {index} arrived before any chunk of file {len(upload.files)}; "
                "send files in order (file_index 0, 1, 2...), each file's chunks consecutively"
            )
        elif index != len(upload.files) - 1:
            raise InvalidInputError(
                f"chunk for file {index} arrived after file {len(upload.files) - 1}; "
                "send files in order, each file's chunks consecutively"
            )
        if self.reserve is not None and data:
            self.reserve(len(data))
        if index == len(upload.files):
            upload.files.append(bytearray())
        upload.total_bytes += len(data)
        upload.files[index] += data
        return data

    def finish(self) -> Upload:
        upload = self.upload
        if upload is None:
            raise InvalidInputError("the Read stream was empty; send a header and then the payload")
        if (not upload.files or upload.total_bytes == 0) and not is_referenced(upload.header):
            raise InvalidInputError("the Read stream carried no payload")
        return upload


async def receive(
    stream: AsyncIterator[pb.ReadRequest],
    limits: InputLimits,
    policy: ReceivePolicy | None = None,
    reserve: Callable[[int], None] | None = None,
    file_done: Callable[[Upload, int], None] | None = None,
    chunk_added: Callable[[Upload, int, bytes], None] | None = None,
) -> Upload:
    """Collect the header and the payload chunks, enforcing the limits as they arrive and the receive deadline of
    ``policy`` between them (:class:`ReceiveTimeoutError`, DEADLINE_EXCEEDED, when the client is too slow).

    ``file_done(upload, index)`` is called as soon as file ``index`` is complete (the first chunk of the next file
    has arrived, or the stream has ended): a progressive read starts decoding it while the rest arrives.
    ``chunk_added(upload, index, data)`` is called with each chunk of file ``index`` once it is kept (a NIfTI or RAW
    read decodes its planes as they arrive)."""
    policy = policy or ReceivePolicy()
    start = time.monotonic()
    assembler = UploadAssembler(limits, reserve)
    first_chunk_at: float | None = None
    messages = stream.__aiter__()
    while True:
        upload = assembler.upload
        received = upload.total_bytes if upload is not None else 0
        by = policy.next_message_by(start, first_chunk_at, received)
        timeout_s = None if by == math.inf else max(by - time.monotonic(), 0.0)
        try:
            message = await asyncio.wait_for(anext(messages), timeout_s)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise ReceiveTimeoutError(policy.overdue(first_chunk_at, received, time.monotonic(), start)) from None
        n_files = len(assembler.upload.files) if assembler.upload is not None else 0
        data = assembler.add(message)
        if chunk_added is not None and data is not None:
            chunk_added(assembler.upload, len(assembler.upload.files) - 1, data)
        if first_chunk_at is None and assembler.upload is not None and assembler.upload.files:
            first_chunk_at = time.monotonic()
        if file_done is not None and n_files and len(assembler.upload.files) > n_files:
            file_done(assembler.upload, n_files - 1)
    upload = assembler.finish()
    if file_done is not None and upload.files:
        file_done(upload, len(upload.files) - 1)
    upload.receive_ms = (time.monotonic() - start) * 1e3
    return upload


def decode(upload: Upload, limits: InputLimits, ingest: IngestPolicy | None = None) -> Volume:
    """Turn the received (or referenced, see :mod:`inference.api.ingest`) payload into a Volume (worker thread).

    Streamed DICOM files become ``bytes`` in place, one at a time (pydicom takes bytes; the copy of a slice is
    small), so that ``upload.files`` can still feed a DICOM SEG; RAW and NIfTI bytearrays are read without a copy.
    """
    header = upload.header
    reader = reader_for(header, upload.payload, limits)
    if is_referenced(header):
        with referenced_payload(header, upload.payload, ingest or IngestPolicy(), limits) as referenced:
            upload.total_bytes = referenced.total_bytes
            return read_with(reader, upload.payload, referenced.files)
    if upload.payload == pb.DICOM_FILES:
        for i, f in enumerate(upload.files):
            upload.files[i] = bytes(f)
    return read_with(reader, upload.payload, upload.files)


def reader_for(header: pb.ReadHeader, payload: int, limits: InputLimits) -> VolumeReader:
    """The :class:`VolumeReader` of a Read's payload kind, with the header's settings (series, modality, raw array's
    description). InvalidInputError for an unknown payload kind or, for NIfTI and raw arrays, a modality radserve's
    models do not read (DICOM files state their own)."""
    if payload == pb.DICOM_FILES:
        return DicomSeriesReader(series_instance_uid=header.series_instance_uid or None, limits=limits)
    if payload not in (pb.NIFTI, pb.RAW):
        raise InvalidInputError(
            f"header.payload {int(payload)} is not a known PayloadKind ({', '.join(pb.PayloadKind.keys()[1:])})"
        )
    modality = header.modality or "CT"
    if modality not in MODALITIES:
        raise InvalidInputError(f"header.modality must be one of {MODALITIES}, got {quote(header.modality, 32)}")
    if payload == pb.NIFTI:
        return NiftiReader(modality=modality, limits=limits)
    return RawReader(**raw_description(header.raw), modality=modality, limits=limits)


def raw_description(raw: pb.RawArray) -> dict:
    """A RAW payload's description as :class:`RawReader` and :class:`~inference.io.streaming.RawPlaneStream` take
    it (checked by them: :func:`inference.io.raw.raw_layout`)."""
    return {
        "dtype": raw.dtype,
        "shape": tuple(raw.shape),
        "affine": tuple(raw.affine) or None,
        "spacing_mm": tuple(raw.spacing_mm) or None,
    }


def check_file_count(reader: VolumeReader, payload: int, files: list) -> None:
    """A reader of one payload (NIfTI, RAW) gets exactly one file (InvalidInputError otherwise)."""
    if reader.single_payload and len(files) != 1:
        raise InvalidInputError(f"a {pb.PayloadKind.Name(payload)} payload is one file, got {len(files)}")


def read_with(reader: VolumeReader, payload: int, files: list) -> Volume:
    """``reader`` on the payload's files: the list (DICOM), or its one file (NIfTI, RAW)."""
    check_file_count(reader, payload, files)
    return reader.read(files[0] if reader.single_payload else files)


def read_payload(header: pb.ReadHeader, payload: int, files: list, limits: InputLimits) -> Volume:
    """The payload's reader (:func:`reader_for`) on ``files``: bytes (DICOM) or any buffer (NIfTI, RAW)."""
    return read_with(reader_for(header, payload, limits), payload, files)
