"""The ReadingService: receive -> decode -> model -> findings. Errors are raised, never formatted here."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor

import grpc

from inference.api import upload as uploads
from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.api.gen.radserve.v1 import reading_pb2_grpc as pb_grpc
from inference.api.interceptors import request_id_var
from inference.engine.scheduler import Priority
from inference.errors import InvalidInputError, ShuttingDownError
from inference.io.limits import InputLimits
from inference.modelrepo.registry import ModelRegistry
from inference.outputs.derived import DerivedObjects, build_derived
from inference.postprocess.finding import Finding

logger = logging.getLogger(__name__)


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


class ReadingServicer(pb_grpc.ReadingServiceServicer):
    def __init__(self, registry: ModelRegistry, limits: InputLimits, io_executor: Executor) -> None:
        self._registry = registry
        self._limits = limits
        self._io_executor = io_executor
        self.draining = False
        self.in_flight = 0

    async def Read(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[pb.ReadRequest], context: grpc.aio.ServicerContext
    ) -> pb.ReadResponse:
        if self.draining:
            raise ShuttingDownError("server is shutting down; retry on another replica")
        self.in_flight += 1
        try:
            return await self._read(request_iterator, context)
        finally:
            self.in_flight -= 1

    async def _read(
        self, request_iterator: AsyncIterator[pb.ReadRequest], context: grpc.aio.ServicerContext
    ) -> pb.ReadResponse:
        start = time.perf_counter()
        time_remaining = context.time_remaining()
        deadline_s = None if time_remaining is None else time.monotonic() + time_remaining
        upload = await uploads.receive(request_iterator, self._limits)
        request_id_var.set(upload.request_id)
        header = upload.header
        wanted = set(header.outputs)
        unknown = wanted - {pb.OUTPUT_KIND_UNSPECIFIED, pb.FINDINGS, pb.DICOM_SR, pb.DICOM_SEG}
        if unknown:
            raise InvalidInputError(f"header.outputs holds unknown OutputKind values {sorted(unknown)}")
        loop = asyncio.get_running_loop()
        decode_start = time.perf_counter()
        volume = await loop.run_in_executor(self._io_executor, uploads.decode, upload, self._limits)
        decode_ms = (time.perf_counter() - decode_start) * 1e3
        runner = self._registry.resolve(header.model or None, header.model_version or None, volume.modality)
        logger.info(
            "request %s: %s %s study %s, %d files, %.1f MB -> %s",
            upload.request_id,
            volume.modality,
            "STAT" if header.priority == pb.STAT else "ROUTINE",
            "x".join(map(str, volume.shape)),
            len(upload.files),
            upload.total_bytes / 1e6,
            runner.key,
        )
        priority = Priority.STAT if header.priority == pb.STAT else Priority.ROUTINE
        result = await runner.read(volume, request_id=upload.request_id, priority=priority, deadline_s=deadline_s)
        timing = {"receive": upload.receive_ms, "decode": decode_ms, **result.timing_ms}
        derived = DerivedObjects()
        if pb.DICOM_SR in wanted or pb.DICOM_SEG in wanted:
            encode_start = time.perf_counter()
            derived = await loop.run_in_executor(
                self._io_executor,
                functools.partial(
                    build_derived,
                    volume,
                    result.findings,
                    result.masks,
                    model_name=runner.config.name,
                    model_version=runner.config.version,
                    want_sr=pb.DICOM_SR in wanted,
                    want_seg=pb.DICOM_SEG in wanted,
                    source_files=[bytes(f) for f in upload.files] if pb.DICOM_SEG in wanted else (),
                ),
            )
            timing["encode"] = (time.perf_counter() - encode_start) * 1e3
        timing["total"] = (time.perf_counter() - start) * 1e3
        logger.info("request %s: %d findings in %.0f ms", upload.request_id, len(result.findings), timing["total"])
        return pb.ReadResponse(
            request_id=upload.request_id,
            model=runner.config.name,
            model_version=runner.config.version,
            findings=[finding_to_proto(f) for f in result.findings],
            timing_ms=timing,
            warnings=[*result.warnings, *derived.warnings],
            device=str(runner.device),
            dicom_sr=derived.sr,
            dicom_seg=derived.seg,
        )

    async def ListModels(  # noqa: N802 - gRPC method name
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        models = []
        for config, states, device in self._registry.list_models():
            models.append(
                pb.ModelInfo(
                    name=config.name,
                    task=config.task,
                    modalities=config.modalities,
                    labels=config.labels,
                    versions=[pb.ModelVersion(version=s.version, state=s.state) for s in states],
                    device=device,
                )
            )
        return pb.ListModelsResponse(models=models)
