"""A small client for the ReadingService: what `radserve read` and the benchmarks use.

A study is streamed as a header followed by chunks of at most 4 MiB (large single gRPC messages are
slow: docs/decisions.md, "Streaming").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.api.gen.radserve.v1 import reading_pb2_grpc as pb_grpc

CHUNK_BYTES = 4 * 1024 * 1024
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


@dataclass
class ReadingClient:
    """A blocking client; ``target`` is HOST:PORT."""

    target: str = "127.0.0.1:50051"

    def __post_init__(self) -> None:
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        self.channel = grpc.insecure_channel(self.target, options=options)
        self.stub = pb_grpc.ReadingServiceStub(self.channel)

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
        return self.stub.Read(iter_requests(header, payloads, progress=progress), timeout=timeout_s)

    def list_models(self, timeout_s: float = 10.0) -> pb.ListModelsResponse:
        return self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout_s)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout_s)

    def close(self) -> None:
        self.channel.close()
