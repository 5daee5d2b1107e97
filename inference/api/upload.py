"""Receiving one study from a Read stream: header first, then chunks, with limits checked as bytes arrive."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.errors import InvalidInputError, LimitExceededError
from inference.io.dicom import read_dicom_series
from inference.io.limits import InputLimits
from inference.io.nifti import read_nifti
from inference.io.raw import read_raw
from inference.io.volume import Volume

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
MODALITIES = ("CT", "MR", "CR", "DX")


@dataclass
class Upload:
    header: pb.ReadHeader
    request_id: str
    files: list[bytearray] = field(default_factory=list)
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


async def receive(stream: AsyncIterator[pb.ReadRequest], limits: InputLimits) -> Upload:
    """Collect the header and the payload chunks, enforcing the chunk, byte and file limits as they arrive."""
    start = time.perf_counter()
    upload: Upload | None = None
    async for message in stream:
        kind = message.WhichOneof("kind")
        if kind == "header":
            if upload is not None:
                raise InvalidInputError("the header was sent twice; send it once, as the first message")
            upload = Upload(message.header, _request_id(message.header))
            continue
        if upload is None:
            raise InvalidInputError("the first message of a Read must be the header")
        if kind != "chunk":
            raise InvalidInputError("a Read message must carry a header or a chunk")
        chunk = message.chunk
        if len(chunk.data) > limits.max_chunk_bytes:
            raise LimitExceededError(
                f"chunk of {len(chunk.data)} bytes exceeds the chunk limit of {limits.max_chunk_bytes} bytes"
            )
        upload.total_bytes += len(chunk.data)
        if upload.total_bytes > limits.max_request_bytes:
            raise LimitExceededError(f"upload exceeds the request limit of {limits.max_request_bytes} bytes")
        index = chunk.file_index
        if index == len(upload.files):
            if index >= limits.max_files:
                raise LimitExceededError(f"upload exceeds the limit of {limits.max_files} files per study")
            upload.files.append(bytearray())
        elif index != len(upload.files) - 1:
            raise InvalidInputError(
                f"chunk for file {index} arrived after file {len(upload.files) - 1}; "
                "send files in order, each file's chunks consecutively"
            )
        upload.files[index] += chunk.data
    if upload is None:
        raise InvalidInputError("the Read stream was empty; send a header and then the payload")
    if not upload.files or upload.total_bytes == 0:
        raise InvalidInputError("the Read stream carried no payload")
    upload.receive_ms = (time.perf_counter() - start) * 1e3
    return upload


def decode(upload: Upload, limits: InputLimits) -> Volume:
    """Turn the received payload into a Volume (runs in a worker thread)."""
    header = upload.header
    modality = header.modality or "CT"
    if upload.payload != pb.DICOM_FILES and modality not in MODALITIES:
        raise InvalidInputError(f"header.modality must be one of {MODALITIES}, got {modality!r}")
    if upload.payload == pb.DICOM_FILES:
        return read_dicom_series(
            [bytes(f) for f in upload.files], series_instance_uid=header.series_instance_uid or None, limits=limits
        )
    if len(upload.files) != 1:
        raise InvalidInputError(f"a {pb.PayloadKind.Name(upload.payload)} payload is one file, got {len(upload.files)}")
    if upload.payload == pb.NIFTI:
        return read_nifti(bytes(upload.files[0]), modality=modality, limits=limits)
    if upload.payload == pb.RAW:
        raw = header.raw
        return read_raw(
            bytes(upload.files[0]),
            dtype=raw.dtype,
            shape=tuple(raw.shape),
            affine=tuple(raw.affine) or None,
            spacing_mm=tuple(raw.spacing_mm) or None,
            modality=modality,
            limits=limits,
        )
    raise InvalidInputError(f"header.payload {upload.payload} is not a known PayloadKind")
