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
from pathlib import Path

import grpc

from inference.api import upload as uploads
from inference.api.admission import (
    Admission,
    AdmissionConfig,
    check_for_model,
    client_key,
    estimate_peak_bytes,
)
from inference.api.arrival import Arrival
from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.api.gen.radserve.v1 import reading_pb2_grpc as pb_grpc
from inference.api.ingest import IngestPolicy
from inference.api.interceptors import call_record_var, request_id_var
from inference.api.progressive import expected_instances
from inference.api.routing import RoutingRPCs, model_info
from inference.api.security import PermissionDeniedError, check_model_allowed, tenant_var
from inference.config import PromotionPolicy
from inference.engine.runner import ModelRunner, ReadResult
from inference.engine.scheduler import Priority
from inference.errors import (
    DeadlineExceededError,
    InvalidInputError,
    LimitExceededError,
    OverloadedError,
    ShuttingDownError,
    escape_text,
)
from inference.io.dicom import hash_uid
from inference.io.limits import InputLimits
from inference.io.volume import Volume
from inference.io.workers import DecodeJob, DecodeWorkers
from inference.outputs.algorithm import Algorithm
from inference.outputs.derived import DerivedObjects, build_derived, source_headers
from inference.outputs.finding import Finding
from inference.serving.registry import ModelRegistry
from inference.serving.shadow import ShadowManager

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


class ReadingServicer(RoutingRPCs, pb_grpc.ReadingServiceServicer):
    """``max_message_bytes``: the server's gRPC message limit, which a Read response must fit; ``output_chunk_bytes``:
    the largest DICOM chunk ReadStreamed sends."""

    def __init__(
        self,
        registry: ModelRegistry,
        limits: InputLimits,
        io_executor: Executor,
        *,
        max_in_flight: int = 64,
        progressive_reads: bool = True,
        ingest: IngestPolicy | None = None,
        allow_model_management: bool = True,
        max_message_bytes: int = 64 * 1024 * 1024,
        output_chunk_bytes: int = 4 * 1024 * 1024,
        admission: AdmissionConfig | None = None,
        model_roots: tuple[Path, ...] = (),
        receive_policy: uploads.ReceivePolicy | None = None,
        decode_workers: DecodeWorkers | None = None,
        promotion_policy: PromotionPolicy | None = None,
        shadow_max_pending: int = 2,
    ) -> None:
        """``progressive_reads``: decode (and read by slab) while the upload arrives; ``admission``: the upload,
        per-client, compute and memory gates (``max_in_flight`` is used when it is None); ``receive_policy``: the
        receive deadline; ``decode_workers``: where streamed DICOM and NIfTI payloads are decoded after their upload
        (None: in ``io_executor``'s threads); ``promotion_policy``: the promotion guard's settings;
        ``shadow_max_pending``: shadow reads queued at most (inference.serving.shadow)."""
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight!r}")
        if output_chunk_bytes < 1:
            raise ValueError(f"output_chunk_bytes must be >= 1, got {output_chunk_bytes!r}")
        for name in QUOTING_LIBRARY_LOGGERS:
            library_logger = logging.getLogger(name)
            library_logger.setLevel(max(library_logger.getEffectiveLevel(), logging.WARNING))
        self._registry = registry
        self._limits = limits
        self._progressive_reads = progressive_reads
        self._io_executor = io_executor
        self._ingest = ingest or IngestPolicy()  # default: payloads referenced by the header are refused
        self.admission = Admission(admission or AdmissionConfig(max_in_flight=max_in_flight))
        self.max_in_flight = self.admission.config.max_in_flight
        self.receive_policy = receive_policy or uploads.ReceivePolicy()
        self.decode_workers = decode_workers
        self.model_roots = tuple(model_roots)  # LoadModel paths must lie under one (empty: the repository)
        self.allow_model_management = allow_model_management
        self.max_message_bytes = max_message_bytes
        self.output_chunk_bytes = output_chunk_bytes
        self.in_flight = 0  # reads from their first message to their end, in every phase
        self.promotion_policy = promotion_policy or PromotionPolicy()
        self.shadow = ShadowManager(registry, self.admission.memory, max_pending=shadow_max_pending)

    @property
    def draining(self) -> bool:
        return self.admission.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.admission.draining = value

    @contextlib.asynccontextmanager
    async def _admitted(self, context: grpc.aio.ServicerContext | None = None) -> AsyncIterator[None]:
        """The per-client cap and the upload gate (inference.api.admission), before any byte of the payload is
        received; the read counts in flight until it ends."""
        tenant = tenant_var.get()
        peer = context.peer() if context is not None else ""
        with self.admission.read(client_key(tenant.name if tenant is not None else None, peer)):
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
        memory = self.admission.memory
        held_upload_bytes = 0

        def reserve_upload(n_bytes: int) -> None:
            nonlocal held_upload_bytes
            if not memory.try_reserve(n_bytes):
                raise OverloadedError(
                    f"this server's memory budget ({memory.total_bytes / 1e6:.0f} MB) is held by other reads and "
                    "uploads; retry later"
                )
            held_upload_bytes += n_bytes

        held.callback(lambda: memory.release(held_upload_bytes))
        arrival = Arrival(
            registry=self._registry,
            admission=self.admission,
            limits=self._limits,
            io_executor=self._io_executor,
            decode_workers=self.decode_workers,
            deadline_s=deadline_s,
            reserve=reserve_upload,
            held=held,
        )
        with self.admission.upload():
            upload = await uploads.receive(
                request_iterator,
                self._limits,
                self.receive_policy,
                reserve_upload,
                file_done=arrival.file_done if self._progressive_reads else None,
                chunk_added=arrival.chunk_added if self._progressive_reads else None,
            )
        held.enter_context(self.shadow.live_work())  # shadow reads wait while live reads are computed
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
        expected_instances(header, self._limits)
        decode_start = time.perf_counter()
        volume, result = await arrival.finish(upload.files)
        if volume is None:
            volume = await self._decode(upload, deadline_s)
        decode_ms = (time.perf_counter() - decode_start) * 1e3
        n_files = len(upload.files)
        source_datasets: list = []
        if pb.DICOM_SEG in wanted and volume.source is not None:  # the SEG references the instances it was read from
            loop = asyncio.get_running_loop()
            source_datasets = await loop.run_in_executor(self._io_executor, source_headers, volume, upload.files)
        upload.files.clear()  # decoded (and the SEG's headers parsed): free the received bytes while the model runs
        if result is not None:
            runner = arrival.slabs.runner  # leased, checked and admitted by start_slabs
            if record is not None:
                record.model, record.model_version = runner.config.name, runner.config.version
                record.study_hash = hash_uid(volume.source.study_instance_uid) if volume.source is not None else ""
            # A NIfTI or RAW slab read's volume is decoded whole (a DICOM slab read's is not): a shadow may read it.
            shadow = self.shadow.sample(runner.config.name, runner.config.version) if arrival.streamed else None
            if shadow is not None:
                peak_bytes = estimate_peak_bytes(volume, runner.config)
                self.shadow.submit(shadow, volume, result.findings, upload.request_id, peak_bytes)
            return await self._answer(upload, runner, result, wanted, source_datasets, start, decode_ms, record)
        runner = await held.enter_async_context(
            self._registry.lease(header.model or None, header.model_version or None, volume.modality)
        )
        check_model_allowed(runner.config.name)
        if record is not None:
            record.model, record.model_version = runner.config.name, runner.config.version
            record.study_hash = hash_uid(volume.source.study_instance_uid) if volume.source is not None else ""
        check_for_model(volume, runner.config, self._limits)
        await held.enter_async_context(self.admission.compute(estimate_peak_bytes(volume, runner.config), deadline_s))
        if deadline_s is not None and time.monotonic() >= deadline_s:
            raise DeadlineExceededError(f"read {upload.request_id} passed its deadline before preprocessing")
        priority = Priority.STAT if header.priority == pb.STAT else Priority.ROUTINE
        shape, megabytes = "x".join(map(str, volume.shape)), upload.total_bytes / 1e6
        logger.info(
            "request %s: %s %s study %s, %d files, %.1f MB -> %s",
            *(upload.request_id, volume.modality, priority.name, shape, n_files, megabytes, runner.key),
        )
        read = runner.read(volume, request_id=upload.request_id, priority=priority, deadline_s=deadline_s)
        shadow = self.shadow.sample(runner.config.name, runner.config.version)
        # A shadowed read's voxels are kept for the shadow version (reserved in the memory budget when it is queued).
        shadow_volume = volume if shadow is not None else None
        del volume  # the runner holds the study until it is prepared, then only its geometry (result.volume)
        result = await read
        if shadow is not None:  # after the live answer, never before it
            peak_bytes = estimate_peak_bytes(shadow_volume, runner.config)
            self.shadow.submit(shadow, shadow_volume, result.findings, upload.request_id, peak_bytes)
            shadow_volume = None
        return await self._answer(upload, runner, result, wanted, source_datasets, start, decode_ms, record)

    async def _answer(
        self,
        upload: uploads.Upload,
        runner: ModelRunner,
        result: ReadResult,
        wanted: set[int],
        source_datasets: list,
        start: float,
        decode_ms: float,
        record: object,
    ) -> ReadOutcome:
        """The findings and the DICOM outputs asked for, from a read's result (whole-study or progressive)."""
        loop = asyncio.get_running_loop()
        timing = {"receive": upload.receive_ms, "decode": decode_ms, **result.timing_ms}
        derived = DerivedObjects()
        if wanted & {pb.DICOM_SR, pb.DICOM_SEG, pb.FHIR}:
            encode_start = time.perf_counter()
            derived = await loop.run_in_executor(
                self._io_executor,
                functools.partial(
                    build_derived,
                    result.volume,
                    result.findings,
                    result.masks,
                    algorithm=Algorithm(runner.config.name, runner.config.version, runner.weights_sha256),
                    want_sr=pb.DICOM_SR in wanted,
                    want_seg=pb.DICOM_SEG in wanted,
                    want_fhir=pb.FHIR in wanted,
                    source_datasets=source_datasets,
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

    async def _decode(self, upload: uploads.Upload, deadline_s: float | None) -> Volume:
        """The payload -> Volume: streamed DICOM and NIfTI in a decode worker process (inference.io.workers), which
        is killed when the decode overruns or the read is cancelled; RAW arrays (a view and a cast, bounded by their
        size) and payloads referenced by the header (a gateway on the server's host) in the I/O threads."""
        header = upload.header
        workers = self.decode_workers
        if workers is None or uploads.is_referenced(header) or upload.payload not in (pb.DICOM_FILES, pb.NIFTI):
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._io_executor, uploads.decode, upload, self._limits, self._ingest)
        reader = uploads.reader_for(header, upload.payload, self._limits)
        uploads.check_file_count(reader, upload.payload, upload.files)
        return await workers.run(DecodeJob(reader, request_id=upload.request_id), upload.files, deadline_s)

    async def Read(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[pb.ReadRequest], context: grpc.aio.ServicerContext
    ) -> pb.ReadResponse:
        async with self._admitted(context):
            outcome = await self._run(request_iterator, context)
            return self._single_response(outcome)

    async def ReadStreamed(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[pb.ReadRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ReadResponsePart]:
        async with self._admitted(context):
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
        """Model names, versions and states; a tenant with an allow-list sees its models only, and only an operator
        sees where versions were loaded from (server paths, also scrubbed from the reasons others see)."""
        tenant = tenant_var.get()
        operator = tenant is not None and tenant.is_operator
        rows = [row for row in self._registry.list_models() if tenant is None or tenant.may_use(row.name)]
        routes = self._registry.default_routes()
        if tenant is not None and tenant.models is not None:
            routes = {k: v for k, v in routes.items() if tenant.may_use(v.partition(":")[0])}
        return pb.ListModelsResponse(
            models=[model_info(row, with_paths=operator, shadow=self.shadow.target) for row in rows],
            default_models=routes,
        )

    def _check_management(self, what: str) -> None:
        """Model management is an operator's act: a tenant with ``role: operator`` in the tokens file."""
        if not self.allow_model_management:
            raise PermissionDeniedError(f"{what} is disabled on this server (allow_model_management is off)")
        tenant = tenant_var.get()
        if tenant is None:
            raise PermissionDeniedError(
                f"{what} needs an operator's token, and this server has no tokens file; start it with --auth-tokens "
                "naming a tenant with role: operator"
            )
        if not tenant.is_operator:
            raise PermissionDeniedError(f"tenant {tenant.name!r} is not an operator and may not manage models")
        if self.draining:
            raise ShuttingDownError("server is shutting down")

    def _confined(self, raw: str) -> Path:
        """A LoadModel path that lies under a model root, else PERMISSION_DENIED, in the same words whether or not
        it exists, so that a refusal tells nothing about the server's disk. A relative path is taken from the
        repository; ``..`` is refused outright (it could climb out of a root through a symlink the check cannot
        see); symlinks inside a root are the operator's own (whoever can place one there can place the model)."""
        repository = self._registry.repository
        path = Path(raw)
        if not path.is_absolute():
            if repository is None:
                raise InvalidInputError("LoadModelRequest.path is relative and this server has no model repository")
            path = Path(repository).absolute() / path
        roots = self.model_roots or ((Path(repository).absolute(),) if repository is not None else ())
        if ".." in path.parts or not any(path.is_relative_to(root) for root in roots):
            raise PermissionDeniedError(
                "LoadModelRequest.path is outside this server's model roots (model_roots); put the model under one"
            )
        return path

    async def LoadModel(  # noqa: N802 - gRPC method name
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadModelResponse:
        self._check_management("LoadModel")
        if not request.path:
            raise InvalidInputError("LoadModelRequest.path is empty; give a model, version or bundle directory")
        path = self._confined(request.path)
        logger.info("LoadModel %s", escape_text(path, 300))
        loaded = await self._registry.load_path(path)
        failed = [f"{name}:{state.version}: {state.reason}" for name, state, error in loaded if error]
        if failed:
            raise InvalidInputError(
                f"{len(failed)} of {len(loaded)} model version(s) failed to load: " + "; ".join(failed)
            )
        names = {name for name, _, _ in loaded}
        return pb.LoadModelResponse(models=self._model_infos(names))

    async def UnloadModel(  # noqa: N802 - gRPC method name
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadModelResponse:
        self._check_management("UnloadModel")
        if not request.model:
            raise InvalidInputError("UnloadModelRequest.model is empty")
        logger.info("UnloadModel %s:%s", escape_text(request.model, 64), escape_text(request.model_version or "*", 64))
        removed = await self._registry.unload(request.model, request.model_version or None)
        self.shadow.forget(request.model, request.model_version or None)
        return pb.UnloadModelResponse(unloaded=removed)
