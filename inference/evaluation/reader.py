"""Read a dataset's studies through a radserve server, the way users read them (``inference.client``).

Each study goes up as ``radserve read`` sends it (its DICOM files or its one NIfTI file, with truth.json's
``modality``); a study with a truth mask is read through ReadStreamed with the DICOM SEG, which is compared with
the mask as soon as it arrives (so no mask is held longer than one study). A read that fails UNAVAILABLE
(overloaded, draining) is retried; any other failure stops the evaluation with the study's name and the status:
metrics over the studies that happened to succeed would mislead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import grpc

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.client import ReadingClient
from inference.evaluation.dataset import Dataset, Study
from inference.evaluation.matching import Finding
from inference.evaluation.metrics import EvalReport, SegmentationResult, compare_seg, evaluate

logger = logging.getLogger(__name__)

UNAVAILABLE_RETRIES = 3
RETRY_BACKOFF_S = 2.0


class EvalReadError(RuntimeError):
    """A study could not be read: ``code`` is the gRPC status name, the message names the study."""

    def __init__(self, study: str, code: str, details: str) -> None:
        super().__init__(f"study {study}: {code}: {details}")
        self.study = study
        self.code = code


@dataclass(frozen=True)
class StudyReading:
    """One study as the server read it."""

    model: str
    model_version: str
    findings: tuple[Finding, ...]
    segmentation: SegmentationResult | None
    seconds: float


@dataclass(frozen=True)
class ModelRef:
    """NAME[:VERSION] as the CLI takes it; an empty version lets the server choose (its newest)."""

    name: str
    version: str = ""

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        name, _, version = text.partition(":")
        if not name:
            raise ValueError(f"a model is NAME or NAME:VERSION, got {text!r}")
        return cls(name, version)

    def __str__(self) -> str:
        return f"{self.name}:{self.version}" if self.version else self.name


def findings_of(response: pb.ReadResponse) -> tuple[Finding, ...]:
    return tuple(
        Finding(f.label, float(f.score), tuple(float(v) for v in f.center_mm), float(f.diameter_mm))
        for f in response.findings
    )


def read_study(client: ReadingClient, study: Study, model: ModelRef, *, timeout_s: float = 600.0) -> StudyReading:
    """Read one study; a study with a mask (DICOM) also gets its SEG compared with the mask."""
    kind = pb.NIFTI if study.nifti else pb.DICOM_FILES
    with_seg = study.mask is not None and not study.nifti
    outputs = [pb.FINDINGS, pb.DICOM_SEG] if with_seg else [pb.FINDINGS]
    read = client.read_streamed if with_seg else client.read
    for attempt in range(UNAVAILABLE_RETRIES + 1):
        start = time.perf_counter()
        try:
            response = read(
                list(study.image_files),
                payload_kind=kind,
                model=model.name,
                model_version=model.version,
                modality=study.modality if study.nifti else "",
                outputs=outputs,
                timeout_s=timeout_s,
            )
            break
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE and attempt < UNAVAILABLE_RETRIES:
                logger.warning("study %s: UNAVAILABLE, retrying in %.0f s", study.name, RETRY_BACKOFF_S * (attempt + 1))
                time.sleep(RETRY_BACKOFF_S * (attempt + 1))
                continue
            raise EvalReadError(study.name, code.name, exc.details() or "") from None
    seconds = time.perf_counter() - start
    segmentation = compare_seg(study, response.dicom_seg or None) if with_seg else None
    return StudyReading(response.model, response.model_version, findings_of(response), segmentation, seconds)


Progress = Callable[[int, int, Study, Sequence[StudyReading]], None]


def read_dataset(
    dataset: Dataset,
    client: ReadingClient,
    models: Sequence[ModelRef],
    *,
    concurrency: int = 1,
    timeout_s: float = 600.0,
    progress: Progress | None = None,
) -> list[dict[str, StudyReading]]:
    """Every study read by every model in ``models`` (one after the other per study, so that the versions of a
    comparison see the same server load); per model, study name -> reading. ``progress(done, total, study,
    readings)`` is called as each study completes."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    results: list[dict[str, StudyReading]] = [{} for _ in models]

    def work(study: Study) -> tuple[Study, list[StudyReading]]:
        return study, [read_study(client, study, model, timeout_s=timeout_s) for model in models]

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(work, study) for study in dataset.studies]
        try:
            for done, future in enumerate(as_completed(futures), start=1):
                study, readings = future.result()
                for per_model, reading in zip(results, readings, strict=True):
                    per_model[study.name] = reading
                if progress is not None:
                    progress(done, len(futures), study, readings)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return results


def report_from_readings(dataset: Dataset, readings: Mapping[str, StudyReading], model: ModelRef) -> EvalReport:
    """The EvalReport of one model's readings; ValueError when the server answered with several versions (a version
    loaded while it ran: pin NAME:VERSION)."""
    versions = sorted({(r.model, r.model_version) for r in readings.values()})
    if len(versions) > 1:
        answered = ", ".join(f"{name}:{version}" for name, version in versions)
        raise ValueError(f"the server answered {model} with {answered} during the evaluation; pin NAME:VERSION")
    name, version = versions[0] if versions else (model.name, model.version)
    warnings = []
    skipped = [s.name for s in dataset.studies if s.mask is not None and s.nifti]
    if skipped:
        warnings.append(
            f"{len(skipped)} NIfTI studies with masks (e.g. {skipped[0]}) have no Dice: the server makes a DICOM SEG "
            "for DICOM input only"
        )
    return evaluate(
        dataset,
        {n: r.findings for n, r in readings.items()},
        segmentations={n: r.segmentation for n, r in readings.items()},
        model=name,
        model_version=version,
        warnings=warnings,
    )


def evaluate_on_server(
    dataset: Dataset,
    client: ReadingClient,
    model: ModelRef | str,
    *,
    concurrency: int = 1,
    timeout_s: float = 600.0,
    progress: Progress | None = None,
) -> EvalReport:
    """Read ``dataset`` with ``model`` through the server and evaluate it: what ``radserve eval`` does."""
    model = ModelRef.parse(model) if isinstance(model, str) else model
    (readings,) = read_dataset(
        dataset, client, [model], concurrency=concurrency, timeout_s=timeout_s, progress=progress
    )
    return report_from_readings(dataset, readings, model)
