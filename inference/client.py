"""A small client for the ReadingService: what `radserve read` and the benchmarks use.

A study is streamed as a header followed by chunks of at most 4 MiB (large single gRPC messages are
slow: docs/decisions.md, "Streaming"). :meth:`ReadingClient.read_streamed` gets the answer of ReadStreamed, whose
DICOM outputs (SR, SEG) come in chunks too: :class:`OutputAssembler` puts them together and checks each object's
size and SHA-256 before it is handed out (docs/decisions.md, "DICOM outputs: a second, server-streaming RPC").

Security: ``ca`` (the CA that signed the server's certificate) turns on TLS; ``cert`` + ``key`` present a
client certificate (mutual TLS); ``token`` is sent as ``authorization: Bearer <token>`` on every call.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.api.gen.radserve.v1 import reading_pb2_grpc as pb_grpc

# 1 MiB chunks (the server takes up to 4 MiB): on loopback, a 157 MB RAW study was received faster in 1 MiB chunks
# than in 4 MiB ones in every configuration measured (benchmarks/ingest.py; docs/decisions.md, "Streaming").
CHUNK_BYTES = 1024 * 1024
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def collect_files(paths: Sequence[Path]) -> tuple[list[Path], int]:
    """Expand folders (recursively, sorted; hidden files skipped) and tell the payload kind.

    Returns the files and pb.DICOM_FILES or pb.NIFTI. Raises ValueError for a mixed or empty selection.
    """
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"{path}: no such file or directory")
    if not files:
        raise ValueError("no files to read")
    niftis = [f for f in files if is_nifti(f)]
    if niftis and len(files) > 1:
        raise ValueError("a NIfTI file is read on its own; pass one .nii or .nii.gz file")
    return files, pb.NIFTI if niftis else pb.DICOM_FILES


def iter_requests(
    header: pb.ReadHeader,
    payloads: Sequence[bytes | Path],
    *,
    chunk_bytes: int = CHUNK_BYTES,
    progress: Callable[[int], None] | None = None,
) -> Iterator[pb.ReadRequest]:
    """The Read stream: the header, then each payload's bytes in chunks (files read lazily)."""
    yield pb.ReadRequest(header=header)
    for index, payload in enumerate(payloads):
        data = payload.read_bytes() if isinstance(payload, Path) else payload
        view = memoryview(data)
        for offset in range(0, max(len(data), 1), chunk_bytes):
            piece = view[offset : offset + chunk_bytes]
            yield pb.ReadRequest(chunk=pb.Chunk(file_index=index, data=bytes(piece)))
            if progress is not None:
                progress(len(piece))


OUTPUT_NAMES = {pb.DICOM_SR: "DICOM SR", pb.DICOM_SEG: "DICOM SEG"}


class OutputIntegrityError(ValueError):
    """A ReadStreamed answer that does not add up: a DICOM output incomplete, out of order, of the wrong size or
    checksum, or parts in the wrong order. ``code`` is the gRPC status name the CLI reports it under."""

    code = "DATA_LOSS"


class OutputAssembler:
    """Reassembles the ReadStreamed answer: ``add`` each ReadResponsePart in the order received, then ``result``.

    Each DICOM output must arrive as consecutive chunks from offset 0, all stating the same total size, followed by
    its end; the end's size, chunk count and SHA-256 must match what arrived. Anything else raises
    :class:`OutputIntegrityError`, so a truncated or corrupted object is never returned.
    """

    def __init__(self) -> None:
        self.summary: pb.ReadResponse | None = None
        self._buffers: dict[int, bytearray] = {}
        self._totals: dict[int, int] = {}
        self._chunks: dict[int, int] = {}
        self._complete: dict[int, bytes] = {}

    @staticmethod
    def _name(kind: int) -> str:
        return OUTPUT_NAMES.get(kind, f"output kind {kind}")

    def add(self, part: pb.ReadResponsePart) -> None:
        which = part.WhichOneof("kind")
        if which == "summary":
            if self.summary is not None:
                raise OutputIntegrityError("the answer carried a second summary")
            self.summary = part.summary
            return
        if self.summary is None:
            raise OutputIntegrityError(f"the answer began with {which or 'an empty part'}, not with its summary")
        if which == "chunk":
            self._add_chunk(part.chunk)
        elif which == "output_end":
            self._end(part.output_end)
        else:
            raise OutputIntegrityError("the answer carried an empty part")

    def _add_chunk(self, chunk: pb.OutputChunk) -> None:
        name = self._name(chunk.output)
        if chunk.output not in OUTPUT_NAMES:
            raise OutputIntegrityError(f"a chunk of {name}, which is not a DICOM output")
        if chunk.output in self._complete:
            raise OutputIntegrityError(f"a chunk of {name} after its end")
        buffer = self._buffers.setdefault(chunk.output, bytearray())
        total = self._totals.setdefault(chunk.output, chunk.total_bytes)
        if chunk.total_bytes != total:
            raise OutputIntegrityError(f"{name}: a chunk states {chunk.total_bytes} bytes in all, an earlier {total}")
        if chunk.offset != len(buffer):
            raise OutputIntegrityError(f"{name}: a chunk at offset {chunk.offset}, expected offset {len(buffer)}")
        if not chunk.data or len(buffer) + len(chunk.data) > total:
            raise OutputIntegrityError(
                f"{name}: a chunk of {len(chunk.data)} bytes at offset {chunk.offset} of a {total}-byte object"
            )
        buffer += chunk.data
        self._chunks[chunk.output] = self._chunks.get(chunk.output, 0) + 1

    def _end(self, end: pb.OutputEnd) -> None:
        name = self._name(end.output)
        if end.output in self._complete:
            raise OutputIntegrityError(f"{name} ended twice")
        buffer = self._buffers.pop(end.output, bytearray())
        chunks = self._chunks.get(end.output, 0)
        if len(buffer) != end.total_bytes or chunks != end.chunks:
            raise OutputIntegrityError(
                f"{name} is incomplete: {len(buffer)} bytes in {chunks} chunks arrived, its end states "
                f"{end.total_bytes} bytes in {end.chunks} chunks"
            )
        digest = hashlib.sha256(buffer).hexdigest()
        if digest != end.sha256.lower():
            raise OutputIntegrityError(
                f"{name} is corrupt: the SHA-256 of the {len(buffer)} bytes received is {digest}, "
                f"its end states {end.sha256}"
            )
        self._complete[end.output] = bytes(buffer)

    def result(self) -> pb.ReadResponse:
        """The whole answer as Read gives it: the summary with ``dicom_sr`` and ``dicom_seg`` filled in."""
        if self.summary is None:
            raise OutputIntegrityError("the answer ended without its summary")
        if self._buffers:
            pending = ", ".join(
                f"{self._name(kind)} ({len(buffer)} of {self._totals[kind]} bytes)"
                for kind, buffer in sorted(self._buffers.items())
            )
            raise OutputIntegrityError(f"the answer ended before the end of {pending}")
        response = pb.ReadResponse()
        response.CopyFrom(self.summary)
        response.dicom_sr = self._complete.get(pb.DICOM_SR, b"")
        response.dicom_seg = self._complete.get(pb.DICOM_SEG, b"")
        return response


def assemble(parts: Iterable[pb.ReadResponsePart]) -> pb.ReadResponse:
    """:class:`OutputAssembler` over a whole ReadStreamed answer."""
    assembler = OutputAssembler()
    for part in parts:
        assembler.add(part)
    return assembler.result()


def channel_credentials(
    ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials | None:
    """TLS credentials from PEM files, or None (plaintext) when neither ``ca`` nor ``cert`` is given.

    Without ``ca`` the system's trusted roots verify the server. ``cert`` and ``key`` go together.
    """
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs both --tls-cert and --tls-key")
    if ca is None and cert is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes() if ca is not None else None,
        private_key=Path(key).read_bytes() if key is not None else None,
        certificate_chain=Path(cert).read_bytes() if cert is not None else None,
    )


def open_channel(
    target: str, credentials: grpc.ChannelCredentials | None, options: Sequence[tuple[str, object]] = ()
) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, credentials, options=list(options))


@dataclass
class ReadingClient:
    """A blocking client; ``target`` is HOST:PORT. See the module docstring for ``ca``, ``cert``, ``key``, ``token``."""

    target: str = "127.0.0.1:50051"
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        self.channel = open_channel(self.target, channel_credentials(self.ca, self.cert, self.key), options)
        self.stub = pb_grpc.ReadingServiceStub(self.channel)
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def read(
        self,
        payloads: Sequence[bytes | Path],
        *,
        payload_kind: int = pb.DICOM_FILES,
        model: str = "",
        model_version: str = "",
        priority: int = pb.ROUTINE,
        request_id: str = "",
        timeout_s: float | None = None,
        progress: Callable[[int], None] | None = None,
        **header_fields: object,
    ) -> pb.ReadResponse:
        header = pb.ReadHeader(
            model=model,
            model_version=model_version,
            request_id=request_id,
            priority=priority,
            payload=payload_kind,
            **header_fields,
        )
        return self.stub.Read(
            iter_requests(header, payloads, progress=progress), timeout=timeout_s, metadata=self.metadata
        )

    def read_streamed(
        self,
        payloads: Sequence[bytes | Path],
        *,
        payload_kind: int = pb.DICOM_FILES,
        model: str = "",
        model_version: str = "",
        priority: int = pb.ROUTINE,
        request_id: str = "",
        timeout_s: float | None = None,
        progress: Callable[[int], None] | None = None,
        **header_fields: object,
    ) -> pb.ReadResponse:
        """As :meth:`read`, through ReadStreamed: DICOM outputs of any size come back in chunks, reassembled and
        checked (size, SHA-256) into the ReadResponse that Read would give. Raises grpc.RpcError for the read's
        status and :class:`OutputIntegrityError` when the chunks do not add up (the call is then cancelled)."""
        header = pb.ReadHeader(
            model=model,
            model_version=model_version,
            request_id=request_id,
            priority=priority,
            payload=payload_kind,
            **header_fields,
        )
        call = self.stub.ReadStreamed(
            iter_requests(header, payloads, progress=progress), timeout=timeout_s, metadata=self.metadata
        )
        try:
            return assemble(call)
        except OutputIntegrityError:
            call.cancel()
            raise

    def read_referenced(
        self,
        *,
        shared_memory: pb.SharedMemoryRef | None = None,
        paths: Sequence[str | Path] = (),
        payload_kind: int = pb.RAW,
        timeout_s: float | None = None,
        **header_fields: object,
    ) -> pb.ReadResponse:
        """Zero-copy ingest on the server's host: the header names a shared-memory segment or files under one of
        the server's ingest roots, and no chunks follow (docs/decisions.md, "Zero-copy ingest"). Header fields as
        for :meth:`read` (``raw=pb.RawArray(...)`` for a RAW array)."""
        if (shared_memory is None) == (not paths):
            raise ValueError("give exactly one of shared_memory or paths")
        header = pb.ReadHeader(payload=payload_kind, **header_fields)
        if shared_memory is not None:
            header.shared_memory.CopyFrom(shared_memory)
        else:
            header.file.paths.extend(str(Path(p).resolve()) for p in paths)
        return self.stub.Read(iter([pb.ReadRequest(header=header)]), timeout=timeout_s, metadata=self.metadata)

    def read_future(
        self,
        payloads: Sequence[bytes | Path],
        *,
        payload_kind: int = pb.DICOM_FILES,
        timeout_s: float | None = None,
        **header_fields: object,
    ) -> grpc.Future:
        """Start a read and return its future (``.result()``, ``.cancel()``); header fields as for :meth:`read`."""
        header = pb.ReadHeader(payload=payload_kind, **header_fields)
        return self.stub.Read.future(iter_requests(header, payloads), timeout=timeout_s, metadata=self.metadata)

    def list_models(self, timeout_s: float = 10.0) -> pb.ListModelsResponse:
        return self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout_s, metadata=self.metadata)

    def load_model(self, path: str | Path, timeout_s: float = 600.0) -> pb.LoadModelResponse:
        """Load the model, version or MONAI bundle directory ``path`` on the SERVER's filesystem; returns when
        every version there is READY (a failure raises INVALID_ARGUMENT naming it)."""
        return self.stub.LoadModel(pb.LoadModelRequest(path=str(path)), timeout=timeout_s, metadata=self.metadata)

    def unload_model(self, model: str, model_version: str = "", timeout_s: float = 30.0) -> pb.UnloadModelResponse:
        """Take ``model`` (one version, or all when ``model_version`` is empty) out of routing."""
        request = pb.UnloadModelRequest(model=model, model_version=model_version)
        return self.stub.UnloadModel(request, timeout=timeout_s, metadata=self.metadata)

    def shadow_model(
        self, model: str, model_version: str, fraction: float = 1.0, timeout_s: float = 30.0
    ) -> pb.ShadowModelResponse:
        """Make ``model:model_version`` its model's shadow on ``fraction`` of the live reads (0 ends it)."""
        request = pb.ShadowModelRequest(model=model, model_version=model_version, fraction=fraction)
        return self.stub.ShadowModel(request, timeout=timeout_s, metadata=self.metadata)

    def promote_model(
        self,
        model: str,
        model_version: str,
        *,
        force: bool = False,
        check_only: bool = False,
        client_reasons: Sequence[str] = (),
        timeout_s: float = 600.0,
    ) -> pb.PromoteModelResponse:
        """Give ``model:model_version`` default routing; FAILED_PRECONDITION with the guard's reasons (the server's
        and ``client_reasons``) unless ``force`` (audited). ``check_only``: change nothing, return what the guard says
        and the evaluation dataset to check (``radserve models promote`` does both steps)."""
        request = pb.PromoteModelRequest(
            model=model, model_version=model_version, force=force, check_only=check_only, client_reasons=client_reasons
        )
        return self.stub.PromoteModel(request, timeout=timeout_s, metadata=self.metadata)

    def rollback_model(self, model: str, timeout_s: float = 30.0) -> pb.RollbackModelResponse:
        """Take ``model``'s version in default routing out of it; the previous one serves again."""
        return self.stub.RollbackModel(pb.RollbackModelRequest(model=model), timeout=timeout_s, metadata=self.metadata)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout_s)

    def close(self) -> None:
        self.channel.close()
