"""The ReadingService: receive -> decode -> model -> findings. Errors are raised, never formatted here.

Read and ReadStreamed share one read path (``_run``) and differ only in how the answer leaves: one ReadResponse
(which must fit the maximum message size), or a summary followed by the DICOM outputs in checksummed chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass

import grpc

from inference.api import upload as uploads
from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.api.gen.radserve.v1 import reading_pb2_grpc as pb_grpc
from inference.api.ingest import IngestPolicy
from inference.api.interceptors import call_record_var, request_id_var
from inference.api.security import PermissionDeniedError, check_model_allowed, tenant_var
from inference.engine.runner import without_voxels
from inference.engine.scheduler import Priority
from inference.errors import (
    DeadlineExceededError,
    InvalidInputError,
    LimitExceededError,
    OverloadedError,
    ShuttingDownError,
)
from inference.io.dicom import hash_uid
from inference.io.limits import InputLimits
from inference.modelrepo.registry import ModelListing, ModelRegistry, VersionState
from inference.outputs.algorithm import Algorithm
from inference.outputs.derived import DerivedObjects, build_derived
from inference.postprocess.finding import Finding

logger = logging.getLogger(__name__)

# Libraries whose INFO/DEBUG lines quote the studies they handle: highdicom logs 'copy Patient-related
# attributes from dataset "<SOP Instance UID>"' while building SR and SEG. A UID in clear is patient data here
# (docs/errors.md), so these loggers are capped at WARNING in the server (their warnings quote no values).
QUOTING_LIBRARY_LOGGERS = ("highdicom",)


def finding_to_proto(finding: Finding) -> pb.Finding:
    message = pb.Finding(
        label=finding.label,
        score=finding.score,
        center_mm=finding.center_mm,
        bbox_mm=finding.bbox_mm,
        diameter_mm=finding.diameter_mm,
        sop_instance_uid=finding.sop_instance_uid or "",
        center_voxel=finding.center_voxel or (),
    )
    if finding.volume_ml is not None:
        message.volume_ml = finding.volume_ml
    return message


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def output_parts(kind: int, data: bytes, chunk_bytes: int, digest: str) -> Iterator[pb.ReadResponsePart]:
    """One DICOM output of ReadStreamed: its bytes in chunks of at most ``chunk_bytes``, then its end (size, SHA-256
    ``digest``). Nothing for empty ``data``."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes!r}")
    total = len(data)
    offsets = range(0, total, chunk_bytes)
    for offset in offsets:
        chunk = pb.OutputChunk(output=kind, offset=offset, total_bytes=total, data=data[offset : offset + chunk_bytes])
        yield pb.ReadResponsePart(chunk=chunk)
    if total:
        end = pb.OutputEnd(output=kind, total_bytes=total, chunks=len(offsets), sha256=digest)
        yield pb.ReadResponsePart(output_end=end)


@dataclass
class ReadOutcome:
    """What one read produced: the response without DICOM bytes (Read's fields 1-7), and the DICOM objects."""

    summary: pb.ReadResponse
    derived: DerivedObjects


class ReadingServicer(pb_grpc.ReadingServiceServicer):
    """``max_message_bytes``: the server's gRPC message limit, which a Read response must fit; ``output_chunk_bytes``:
    the largest DICOM chunk ReadStreamed sends."""

    def __init__(
        self,
        registry: ModelRegistry,
        limits: InputLimits,
        io_executor: Executor,
        *,
        max_in_flight: int = 64,
        ingest: IngestPolicy | None = None,
        allow_model_management: bool = True,
        max_message_bytes: int = 64 * 1024 * 1024,
        output_chunk_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight!r}")
        if output_chunk_bytes < 1:
            raise ValueError(f"output_chunk_bytes must be >= 1, got {output_chunk_bytes!r}")
        for name in QUOTING_LIBRARY_LOGGERS:
            library_logger = logging.getLogger(name)
            library_logger.setLevel(max(library_logger.getEffectiveLevel(), logging.WARNING))
        self._registry = registry
        self._limits = limits
        self._io_executor = io_executor
        self._ingest = ingest or IngestPolicy()  # default: payloads referenced by the header are refused
        self.max_in_flight = max_in_flight
        self.allow_model_management = allow_model_management
        self.max_message_bytes = max_message_bytes
        self.output_chunk_bytes = output_chunk_bytes
        self.draining = False
        self.in_flight = 0

    @contextlib.asynccontextmanager
    async def _admitted(self) -> AsyncIterator[None]:
        """Admission control, before any byte of the payload is received; counts the read in flight until it ends."""
        if self.draining:
            raise ShuttingDownError("server is shutting down; retry on another replica")
        if self.in_flight >= self.max_in_flight:
            raise OverloadedError(f"server is at its limit of {self.max_in_flight} reads in flight; retry later")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def _run(
        self, request_iterator: AsyncIterator[pb.ReadRequest], context: grpc.aio.ServicerContext
    ) -> ReadOutcome:
        """The one read path of Read and ReadStreamed: upload, decode, model, SR/SEG."""
        # `held` keeps the model version the read runs on from being stopped (hot swap, unload) until the
        # findings and DICOM objects are built.
        async with contextlib.AsyncExitStack() as held:
            return await self._read(request_iterator, context, held)

    async def _read(
        self,
        request_iterator: AsyncIterator[pb.ReadRequest],
        context: grpc.aio.ServicerContext,
        held: contextlib.AsyncExitStack,
    ) -> ReadOutcome:
        start = time.perf_counter()
        time_remaining = context.time_remaining()
        deadline_s = None if time_remaining is None else time.monotonic() + time_remaining
        record = call_record_var.get()
        upload = await uploads.receive(request_iterator, self._limits)
        request_id_var.set(upload.request_id)
        header = upload.header
        if record is not None:
            record.request_id = upload.request_id
        if header.model:
            check_model_allowed(header.model)  # before decoding: a tenant's forbidden model costs nothing
        wanted = set(header.outputs)
        unknown = wanted - {pb.OUTPUT_KIND_UNSPECIFIED, pb.FINDINGS, pb.DICOM_SR, pb.DICOM_SEG, pb.FHIR}
        if unknown:
            raise InvalidInputError(f"header.outputs holds unknown OutputKind values {sorted(unknown)}")
        loop = asyncio.get_running_loop()
        decode_start = time.perf_counter()
        volume = await loop.run_in_executor(self._io_executor, uploads.decode, upload, self._limits, self._ingest)
        decode_ms = (time.perf_counter() - decode_start) * 1e3
        n_files = len(upload.files)
        if pb.DICOM_SEG not in wanted:
            upload.files.clear()  # decoded: free the received bytes while the model runs
        runner = await held.enter_async_context(
            self._registry.lease(header.model or None, header.model_version or None, volume.modality)
        )
        check_model_allowed(runner.config.name)
        if record is not None:
            record.model, record.model_version = runner.config.name, runner.config.version
            record.study_hash = hash_uid(volume.source.study_instance_uid) if volume.source is not None else ""
        if deadline_s is not None and time.monotonic() >= deadline_s:
            raise DeadlineExceededError(f"read {upload.request_id} passed its deadline before preprocessing")
        logger.info(
            "request %s: %s %s study %s, %d files, %.1f MB -> %s",
            upload.request_id,
            volume.modality,
            "STAT" if header.priority == pb.STAT else "ROUTINE",
            "x".join(map(str, volume.shape)),
            n_files,
            upload.total_bytes / 1e6,
            runner.key,
        )
        priority = Priority.STAT if header.priority == pb.STAT else Priority.ROUTINE
        read = runner.read(volume, request_id=upload.request_id, priority=priority, deadline_s=deadline_s)
        volume = without_voxels(volume)  # the runner lets go of the voxels once the study is prepared
        result = await read
        timing = {"receive": upload.receive_ms, "decode": decode_ms, **result.timing_ms}
        derived = DerivedObjects()
        if wanted & {pb.DICOM_SR, pb.DICOM_SEG, pb.FHIR}:
            encode_start = time.perf_counter()
            derived = await loop.run_in_executor(
                self._io_executor,
                functools.partial(
                    build_derived,
                    volume,
                    result.findings,
                    result.masks,
                    algorithm=Algorithm(runner.config.name, runner.config.version, runner.weights_sha256),
                    want_sr=pb.DICOM_SR in wanted,
                    want_seg=pb.DICOM_SEG in wanted,
                    want_fhir=pb.FHIR in wanted,
                    source_files=[bytes(f) for f in upload.files] if pb.DICOM_SEG in wanted else (),
                ),
            )
            timing["encode"] = (time.perf_counter() - encode_start) * 1e3
        timing["total"] = (time.perf_counter() - start) * 1e3
        if record is not None:
            record.timing_ms = dict(timing)
        logger.info("request %s: %d findings in %.0f ms", upload.request_id, len(result.findings), timing["total"])
        summary = pb.ReadResponse(
            request_id=upload.request_id,
            model=runner.config.name,
            model_version=runner.config.version,
            findings=[finding_to_proto(f) for f in result.findings],
            timing_ms=timing,
            warnings=[*result.warnings, *derived.warnings],
            device=str(runner.device),
            fhir_bundle=derived.fhir.decode("utf-8"),
        )
        return ReadOutcome(summary, derived)

    async def Read(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[pb.ReadRequest], context: grpc.aio.ServicerContext
    ) -> pb.ReadResponse:
        async with self._admitted():
            outcome = await self._run(request_iterator, context)
            return self._single_response(outcome)

    async def ReadStreamed(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[pb.ReadRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ReadResponsePart]:
        async with self._admitted():
            outcome = await self._run(request_iterator, context)
            yield pb.ReadResponsePart(summary=outcome.summary)
            loop = asyncio.get_running_loop()
            for kind, data in ((pb.DICOM_SR, outcome.derived.sr), (pb.DICOM_SEG, outcome.derived.seg)):
                if not data:
                    continue
                digest = await loop.run_in_executor(self._io_executor, sha256_hex, data)
                for part in output_parts(kind, data, self.output_chunk_bytes, digest):
                    yield part

    def _single_response(self, outcome: ReadOutcome) -> pb.ReadResponse:
        """Read's one message; refused with RESOURCE_EXHAUSTED (naming ReadStreamed) when it exceeds the maximum
        message size, rather than failing in gRPC's framing after the handler has returned."""
        sr, seg = outcome.derived.sr, outcome.derived.seg
        response = pb.ReadResponse(dicom_sr=sr, dicom_seg=seg)
        response.MergeFrom(outcome.summary)
        size = response.ByteSize()
        if size > self.max_message_bytes:
            raise LimitExceededError(
                f"the Read response would be {size} bytes (DICOM SR {len(sr)} bytes, DICOM SEG {len(seg)} bytes), "
                f"over this server's maximum message size of {self.max_message_bytes} bytes; use ReadStreamed, "
                f"which returns the DICOM outputs in chunks of at most {self.output_chunk_bytes} bytes"
            )
        return response

    async def ListModels(  # noqa: N802 - gRPC method name
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[model_info(row) for row in self._registry.list_models()],
            default_models=self._registry.default_routes(),
        )

    def _check_management(self, what: str) -> None:
        if not self.allow_model_management:
            raise PermissionDeniedError(f"{what} is disabled on this server (allow_model_management is off)")
        tenant = tenant_var.get()
        if tenant is not None and tenant.models is not None:
            raise PermissionDeniedError(f"tenant {tenant.name!r} has a model allow-list and may not manage models")
        if self.draining:
            raise ShuttingDownError("server is shutting down")

    async def LoadModel(  # noqa: N802 - gRPC method name
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadModelResponse:
        self._check_management("LoadModel")
        if not request.path:
            raise InvalidInputError("LoadModelRequest.path is empty; give a model, version or bundle directory")
        logger.info("LoadModel %s", request.path)
        loaded = await self._registry.load_path(request.path)
        failed = [f"{name}:{state.version}: {state.reason}" for name, state, error in loaded if error]
        if failed:
            raise InvalidInputError(
                f"{len(failed)} of {len(loaded)} model version(s) failed to load: " + "; ".join(failed)
            )
        names = {name for name, _, _ in loaded}
        return pb.LoadModelResponse(models=[model_info(r) for r in self._registry.list_models() if r.name in names])

    async def UnloadModel(  # noqa: N802 - gRPC method name
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadModelResponse:
        self._check_management("UnloadModel")
        if not request.model:
            raise InvalidInputError("UnloadModelRequest.model is empty")
        logger.info("UnloadModel %s:%s", request.model, request.model_version or "*")
        removed = await self._registry.unload(request.model, request.model_version or None)
        return pb.UnloadModelResponse(unloaded=removed)


def version_to_proto(state: VersionState) -> pb.ModelVersion:
    return pb.ModelVersion(
        version=state.version,
        state=state.state,
        state_code=pb.VersionState.Value(f"VERSION_STATE_{state.state}"),
        reason=state.reason,
        source=state.source,
        weights_sha256=state.weights_sha256,
    )


def model_info(row: ModelListing) -> pb.ModelInfo:
    config = row.config
    return pb.ModelInfo(
        name=row.name,
        task=config.task if config is not None else "",
        modalities=config.modalities if config is not None else (),
        labels=config.labels if config is not None else (),
        versions=[version_to_proto(v) for v in row.versions],
        device=row.device,
        default_version=row.default_version,
    )
