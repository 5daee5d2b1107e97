"""Receiving one study from a Read stream: header first, then chunks, with limits checked as bytes arrive."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.api.ingest import IngestPolicy, is_referenced, referenced_payload
from inference.api.interceptors import request_id_var
from inference.errors import InvalidInputError, LimitExceededError, quote
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
            request_id_var.set(upload.request_id)  # so that a failure while chunks arrive is logged under it
            continue
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
        upload.total_bytes += len(data)
        if upload.total_bytes > limits.max_request_bytes:
            raise LimitExceededError(f"upload exceeds the request limit of {limits.max_request_bytes} bytes")
        index = chunk.file_index
        if index == len(upload.files):
            if index >= limits.max_files:
                raise LimitExceededError(f"upload exceeds the limit of {limits.max_files} files per study")
            upload.files.append(bytearray())
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
        upload.files[index] += data
    if upload is None:
        raise InvalidInputError("the Read stream was empty; send a header and then the payload")
    if (not upload.files or upload.total_bytes == 0) and not is_referenced(upload.header):
        raise InvalidInputError("the Read stream carried no payload")
    upload.receive_ms = (time.perf_counter() - start) * 1e3
    return upload


def decode(upload: Upload, limits: InputLimits, ingest: IngestPolicy | None = None) -> Volume:
    """Turn the received (or referenced, see :mod:`inference.api.ingest`) payload into a Volume (worker thread).

    Streamed DICOM files become ``bytes`` in place, one at a time (pydicom takes bytes; the copy of a slice is
    small), so that ``upload.files`` can still feed a DICOM SEG; RAW and NIfTI bytearrays are read without a copy.
    """
    header = upload.header
    if upload.payload != pb.DICOM_FILES and (header.modality or "CT") not in MODALITIES:
        raise InvalidInputError(f"header.modality must be one of {MODALITIES}, got {quote(header.modality, 32)}")
    if is_referenced(header):
        with referenced_payload(header, upload.payload, ingest or IngestPolicy(), limits) as referenced:
            upload.total_bytes = referenced.total_bytes
            return read_payload(header, upload.payload, referenced.files, limits)
    if upload.payload == pb.DICOM_FILES:
        for i, f in enumerate(upload.files):
            upload.files[i] = bytes(f)
    return read_payload(header, upload.payload, upload.files, limits)


def read_payload(header: pb.ReadHeader, payload: int, files: list, limits: InputLimits) -> Volume:
    """The readers, by payload kind; ``files`` are bytes (DICOM) or any buffer (NIfTI, RAW)."""
    modality = header.modality or "CT"
    if payload == pb.DICOM_FILES:
        return read_dicom_series(files, series_instance_uid=header.series_instance_uid or None, limits=limits)
    if payload not in (pb.NIFTI, pb.RAW):
        raise InvalidInputError(
            f"header.payload {int(payload)} is not a known PayloadKind ({', '.join(pb.PayloadKind.keys()[1:])})"
        )
    if len(files) != 1:
        raise InvalidInputError(f"a {pb.PayloadKind.Name(payload)} payload is one file, got {len(files)}")
    if payload == pb.NIFTI:
        return read_nifti(files[0], modality=modality, limits=limits)
    if payload == pb.RAW:
        raw = header.raw
        return read_raw(
            files[0],
            dtype=raw.dtype,
            shape=tuple(raw.shape),
            affine=tuple(raw.affine) or None,
            spacing_mm=tuple(raw.spacing_mm) or None,
            modality=modality,
            limits=limits,
        )
    raise AssertionError(f"unreachable: payload kind {payload}")
