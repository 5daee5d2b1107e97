"""What the fuzzer runs on one input, without atheris: tests/fuzz/test_fuzz.py replays the corpus and the crashes
through :func:`one_input` on every ``make test``.

Input format: byte 0 picks the target (modulo 4), the rest is its payload:

* ``0`` DICOM series: the payload split on :data:`FILE_SEPARATOR` into at most 8 files, read as a progressive read
  does (each file alone, its header, its slice placed on the grid the series declares) and then as a whole series;
* ``1`` NIfTI (``.nii`` or ``.nii.gz``): the payload is the file;
* ``2`` RAW: byte 0 the dtype (index into RAW_DTYPES), bytes 1-3 the shape (each 1..16), bytes 4-15 three
  little-endian float32 spacings, byte 16 the modality (CT, MR, CR, DX), the rest the array bytes;

  both also fed in chunks to their :class:`~inference.io.streaming.PlaneStream` (a streamed read's decode as it
  arrives), differentially: a stream that returns a volume must return the whole reader's, bit for bit, and a
  payload the reader refuses must leave the stream without one (an AssertionError otherwise: a finding);
* ``3`` Read stream: length-prefixed (uint32, little-endian) serialized ReadRequest messages, assembled as the
  server assembles a stream (UploadAssembler, with the server's limits) and then read as the header says.
"""

from __future__ import annotations

import contextlib
import struct
import warnings
from collections.abc import Callable

import numpy as np

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.api.upload import UploadAssembler, read_payload
from inference.errors import RadserveError
from inference.io import RAW_DTYPES, InputLimits, read_dicom_series, read_nifti, read_raw
from inference.io.assembly import SliceAssembly
from inference.io.dicom import read_dicom_file, read_dicom_header
from inference.io.streaming import NiftiPlaneStream, PlaneStream, RawPlaneStream
from inference.io.volume import Volume

FILE_SEPARATOR = b"\x00RADSERVE-FILE\x00"
MAX_FILES = 8
MAX_MESSAGES = 64
MODALITIES = ("CT", "MR", "CR", "DX")
# Small limits: each input decodes in milliseconds and a few MB, so that libFuzzer explores rather than waits.
LIMITS = InputLimits(
    max_voxels=1 << 20,
    max_request_bytes=1 << 22,
    max_files=MAX_FILES,
    max_chunk_bytes=1 << 20,
    max_dimension=4096,
    max_inflated_bytes=1 << 24,
)


def _dicom(payload: bytes) -> None:
    files = payload.split(FILE_SEPARATOR)[:MAX_FILES]
    assembly = SliceAssembly(len(files)) if len(files) >= 2 else None  # SliceAssembly never raises on bad input
    for index, data in enumerate(files):  # inference.api.progressive, file by file
        try:
            volume = read_dicom_file(data, limits=LIMITS)
            read_dicom_header(index, data, limits=LIMITS)
        except RadserveError:
            continue
        if assembly is not None:
            for k in assembly.add(index, volume):
                assembly.plane(k)
    read_dicom_series(files, limits=LIMITS)


def _streamed(stream: PlaneStream, payload: bytes) -> Volume | None:
    """``payload`` fed to ``stream`` in chunks of 1 to 5000 bytes (sizes drawn from the payload's length)."""
    position, i = 0, 0
    while position < len(payload):
        size = 1 + (i * 7919 + len(payload)) % 5000
        for k in stream.feed(payload[position : position + size]):
            stream.plane(k)
        position, i = position + size, i + 1
    if (stream.failed or "").startswith("unexpected"):  # caught in the server (the payload is read whole): a finding
        raise AssertionError(f"the streamed decode failed: {stream.failed}")
    return stream.volume()


def _agrees(streamed: Volume | None, read: Callable[[], Volume]) -> None:
    """The whole reader's answer; the streamed volume, when there is one, must be it."""
    try:
        volume = read()
    except RadserveError:
        if streamed is not None:
            raise AssertionError("the streamed decode gave a volume for a payload its reader refuses") from None
        raise
    if streamed is None:
        return
    same = (
        streamed.voxels.shape == volume.voxels.shape
        and np.array_equal(streamed.voxels, volume.voxels)
        and np.array_equal(streamed.affine, volume.affine)
        and (streamed.modality, streamed.warnings) == (volume.modality, volume.warnings)
    )
    if not same:
        raise AssertionError("the streamed decode's volume differs from its reader's")


def _nifti(payload: bytes) -> None:
    streamed = _streamed(NiftiPlaneStream("MR", LIMITS), payload)
    _agrees(streamed, lambda: read_nifti(payload, modality="MR", limits=LIMITS))


def _raw(payload: bytes) -> None:
    if len(payload) < 17:
        return
    description = {
        "dtype": RAW_DTYPES[payload[0] % len(RAW_DTYPES)],
        "shape": tuple(1 + b % 16 for b in payload[1:4]),
        "affine": None,
        "spacing_mm": struct.unpack("<3f", payload[4:16]),
        "modality": MODALITIES[payload[16] % 4],
    }
    streamed = _streamed(RawPlaneStream(**description, limits=LIMITS), payload[17:])
    _agrees(streamed, lambda: read_raw(payload[17:], **description, limits=LIMITS))


def _stream(payload: bytes) -> None:
    assembler = UploadAssembler(LIMITS)
    offset = 0
    for _ in range(MAX_MESSAGES):
        if offset + 4 > len(payload):
            break
        (size,) = struct.unpack_from("<I", payload, offset)
        body = payload[offset + 4 : offset + 4 + min(size, 1 << 20)]
        offset += 4 + len(body)
        try:
            message = pb.ReadRequest.FromString(body)
        except Exception:  # not a ReadRequest: gRPC would have refused it before the servicer
            return
        assembler.add(message)
    upload = assembler.finish()
    files = [bytes(f) for f in upload.files]
    if upload.header.HasField("shared_memory") or upload.header.HasField("file"):
        return  # referenced payloads are refused by default (IngestPolicy), not read from this machine
    read_payload(upload.header, upload.payload, files, LIMITS)


TARGETS = (_dicom, _nifti, _raw, _stream)


def one_input(data: bytes) -> None:
    """Run one input; returns normally or raises RadserveError's subclasses only (anything else is a finding)."""
    if not data:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # library warnings about odd files are expected, not findings
        with contextlib.suppress(RadserveError):
            TARGETS[data[0] % len(TARGETS)](data[1:])


def encode_stream(*messages: pb.ReadRequest) -> bytes:
    """The target-3 payload of a stream of messages (for seeds and regression cases)."""
    return b"".join(struct.pack("<I", len(m.SerializeToString())) + m.SerializeToString() for m in messages)
