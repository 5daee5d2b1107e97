"""Zero-copy ingest: a read whose header references its payload instead of streaming it.

A gateway on the same host as the server can skip gRPC streaming (docs/decisions.md, "Zero-copy ingest"):

* ``header.shared_memory``: a POSIX shared-memory segment (Python ``multiprocessing.shared_memory``) holding the
  payload bytes: a RAW array described by ``header.raw``, or a NIfTI file. The server maps it read-only for the
  duration of the decode; the gateway owns the segment and unlinks it once the read has answered.
  Enabled by ``ServerConfig.ingest_shared_memory``.
* ``header.file``: paths the server opens itself. Each is resolved (symlinks included) and must lie under one of
  ``ServerConfig.ingest_roots`` (empty: disabled); folders (DICOM_FILES only) are searched recursively and every
  file found must resolve under a root too. A file is opened without following a final symlink and the opened
  descriptor's own path is checked again, so swapping a path for a symlink between check and open does not
  escape the roots. RAW and NIfTI files are memory-mapped read-only.

The bytes then go through the same readers and :class:`~inference.io.limits.InputLimits` as a streamed upload:
the byte and file counts are checked from sizes on disk before anything is read, the readers check shapes and
voxel counts before decoding.

Status codes: PERMISSION_DENIED when the server has the path disabled, or a path resolves outside every ingest
root (:class:`IngestDeniedError`); INVALID_ARGUMENT for malformed references (bad segment name, a segment or file
smaller than the header describes, a missing file, a folder for a NIFTI/RAW payload); RESOURCE_EXHAUSTED for
limits. Messages name the header field at fault, never the path itself (paths may carry patient identifiers).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.errors import InvalidInputError, RadserveError, UnsupportedError
from inference.io.limits import InputLimits

logger = logging.getLogger(__name__)

__all__ = ["IngestDeniedError", "IngestPolicy", "referenced_payload"]

SHM_DIR = Path("/dev/shm")  # where Linux keeps POSIX shared memory (shm_open("/name") is /dev/shm/name)
_SHM_NAME = re.compile(r"[A-Za-z0-9._-]{1,240}")
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


class IngestDeniedError(RadserveError):
    """The header references a payload this server may not read (disabled, or outside the ingest roots)."""

    code = "PERMISSION_DENIED"


@dataclass(frozen=True)
class IngestPolicy:
    """What a header may reference: files under ``roots`` (resolved directories; empty = none), shared memory."""

    roots: tuple[Path, ...] = ()
    shared_memory: bool = False

    @classmethod
    def from_config(cls, config: object) -> IngestPolicy:
        """From a :class:`~inference.config.ServerConfig` (its ``ingest_roots`` are already resolved)."""
        return cls(
            roots=tuple(Path(r) for r in getattr(config, "ingest_roots", ())),
            shared_memory=bool(getattr(config, "ingest_shared_memory", False)),
        )

    def under_root(self, path: Path) -> bool:
        return any(path == root or path.is_relative_to(root) for root in self.roots)


@dataclass
class ReferencedPayload:
    """The payload buffers of a referenced read, valid inside :func:`referenced_payload`'s ``with`` block."""

    files: list[bytes | memoryview] = field(default_factory=list)
    total_bytes: int = 0


def is_referenced(header: pb.ReadHeader) -> bool:
    return header.WhichOneof("ingest") is not None


@contextlib.contextmanager
def referenced_payload(
    header: pb.ReadHeader, payload_kind: int, policy: IngestPolicy, limits: InputLimits
) -> Iterator[ReferencedPayload]:
    """Map or read the payload ``header`` references; buffers are released when the block ends."""
    with contextlib.ExitStack() as stack:
        source = header.WhichOneof("ingest")
        if source == "shared_memory":
            yield _shared_memory(header.shared_memory, payload_kind, policy, limits, stack)
        elif source == "file":
            yield _files(header.file, payload_kind, policy, limits, stack)
        else:
            raise InvalidInputError("the header references no payload (header.shared_memory or header.file)")


# -- shared memory --------------------------------------------------------------------------------------------


def _shared_memory(
    ref: pb.SharedMemoryRef, payload_kind: int, policy: IngestPolicy, limits: InputLimits, stack: contextlib.ExitStack
) -> ReferencedPayload:
    if not policy.shared_memory:
        raise IngestDeniedError("shared-memory ingest is disabled on this server (ServerConfig.ingest_shared_memory)")
    if payload_kind not in (pb.RAW, pb.NIFTI):
        raise InvalidInputError("a shared-memory payload must be RAW or NIFTI (header.payload)")
    name = ref.name[1:] if ref.name.startswith("/") else ref.name
    if not _SHM_NAME.fullmatch(name) or name in (".", ".."):
        raise InvalidInputError(
            "header.shared_memory.name must be a segment name of 1-240 characters of [A-Za-z0-9._-], "
            "optionally with one leading '/'"
        )
    if ref.size_bytes == 0:
        raise InvalidInputError("header.shared_memory.size_bytes must be > 0")
    limits.check_request_bytes(ref.size_bytes)
    if not SHM_DIR.is_dir():
        raise UnsupportedError("shared-memory ingest needs POSIX shared memory under /dev/shm (Linux)")
    try:
        fd = os.open(SHM_DIR / name, _OPEN_FLAGS)
    except FileNotFoundError:
        raise InvalidInputError("the segment named by header.shared_memory.name does not exist") from None
    except OSError as exc:
        raise InvalidInputError(
            f"the segment named by header.shared_memory.name cannot be opened ({exc.strerror})"
        ) from None
    stack.callback(os.close, fd)
    size = os.fstat(fd).st_size
    end = ref.offset_bytes + ref.size_bytes
    if end > size:
        raise InvalidInputError(
            f"shared-memory segment holds {size} bytes; header.shared_memory describes {ref.size_bytes} bytes "
            f"at offset {ref.offset_bytes}"
        )
    view = _map(fd, end, stack)[ref.offset_bytes : end]
    stack.callback(_release, view)
    return ReferencedPayload(files=[view], total_bytes=ref.size_bytes)


# -- files under the ingest roots -----------------------------------------------------------------------------


def _files(
    ref: pb.FileRef, payload_kind: int, policy: IngestPolicy, limits: InputLimits, stack: contextlib.ExitStack
) -> ReferencedPayload:
    if not policy.roots:
        raise IngestDeniedError("file ingest is disabled on this server (ServerConfig.ingest_roots is empty)")
    if not ref.paths:
        raise InvalidInputError("header.file.paths is empty")
    files: list[Path] = []
    for index, raw_path in enumerate(ref.paths):
        files += _expand(index, raw_path, payload_kind, policy, limits)
    if payload_kind in (pb.NIFTI, pb.RAW) and len(files) != 1:
        raise InvalidInputError(f"a {pb.PayloadKind.Name(payload_kind)} payload is one file, got {len(files)}")
    limits.check_files(len(files))
    sizes = [p.stat().st_size for p in files]
    limits.check_request_bytes(sum(sizes))
    payload = ReferencedPayload(total_bytes=sum(sizes))
    for index, path in enumerate(files):
        fd = _open_under_root(index, path, policy)
        stack.callback(os.close, fd)
        size = os.fstat(fd).st_size
        if size == 0:
            raise InvalidInputError(f"file {index} of header.file is empty")
        if payload_kind in (pb.NIFTI, pb.RAW):
            payload.files.append(_map(fd, size, stack))
        else:
            with os.fdopen(os.dup(fd), "rb") as f:
                payload.files.append(f.read())
    return payload


def _expand(index: int, raw_path: str, payload_kind: int, policy: IngestPolicy, limits: InputLimits) -> list[Path]:
    """One requested path -> the files it names, each resolved and checked against the roots."""
    where = f"header.file.paths[{index}]"
    if not raw_path or "\x00" in raw_path:
        raise InvalidInputError(f"{where} must be a non-empty path")
    path = Path(raw_path)
    if not path.is_absolute():
        raise InvalidInputError(f"{where} must be an absolute path")
    resolved = path.resolve(strict=False)  # symlinks resolved; ".." collapsed after resolution
    if not policy.under_root(resolved):
        raise IngestDeniedError(f"{where} is outside the server's ingest roots")
    if resolved.is_file():
        return [resolved]
    if not resolved.is_dir():
        raise InvalidInputError(f"{where} names no file or folder under the ingest roots")
    if payload_kind != pb.DICOM_FILES:
        raise InvalidInputError(f"{where} is a folder; a {pb.PayloadKind.Name(payload_kind)} payload is one file")
    found: list[Path] = []
    for folder, dirs, names in os.walk(resolved):  # does not descend into symlinked folders
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            member = Path(folder, name).resolve(strict=False)
            if not policy.under_root(member):
                raise IngestDeniedError(f"a file in the folder {where} links outside the server's ingest roots")
            if member.is_file():
                found.append(member)
            limits.check_files(len(found))
    if not found:
        raise InvalidInputError(f"the folder {where} holds no files")
    return found


def _open_under_root(index: int, path: Path, policy: IngestPolicy) -> int:
    """Open ``path`` read-only, not following a final symlink, and check where the descriptor really points."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise InvalidInputError(f"file {index} of header.file disappeared before it could be read") from None
    except OSError as exc:  # ELOOP: the path became a symlink after it was checked
        raise InvalidInputError(f"file {index} of header.file cannot be opened ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidInputError(f"file {index} of header.file is not a regular file")
        proc_link = Path(f"/proc/self/fd/{fd}")
        if proc_link.exists() and not policy.under_root(Path(os.readlink(proc_link))):
            raise IngestDeniedError(f"file {index} of header.file is outside the server's ingest roots")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _map(fd: int, length: int, stack: contextlib.ExitStack) -> memoryview:
    """A read-only mapping of the first ``length`` bytes of ``fd``, unmapped when ``stack`` closes."""
    mapped = mmap.mmap(fd, length, prot=mmap.PROT_READ)
    stack.callback(_release, mapped)
    view = memoryview(mapped)
    stack.callback(_release, view)
    return view


def _release(buffer: memoryview | mmap.mmap) -> None:
    """Release a view or unmap; an array still viewing it (e.g. held by a traceback) keeps it until collected."""
    try:
        buffer.release() if isinstance(buffer, memoryview) else buffer.close()
    except BufferError:
        logger.debug("ingest buffer still referenced after decode; left to the garbage collector")
