"""The DICOM objects (and FHIR Bundle) a read asked for, built from its findings and masks and encoded.

The SEG is built first, so that the SR can reference its segments: segment N of the SEG is finding N, and the
SR's groups of finding N reference it (``inference.outputs.sr``). Both take the same per-finding voxels
(``inference.outputs.regions.finding_masks``): the model's masks, or a detection's boxes rendered.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO

import pydicom
from pydicom.dataset import Dataset

from inference.errors import UnsupportedError
from inference.io.volume import Volume
from inference.outputs import encode_dataset
from inference.outputs.algorithm import Algorithm
from inference.outputs.fhir import build_fhir_report, encode_fhir
from inference.outputs.finding import Finding, FindingMask
from inference.outputs.regions import finding_masks
from inference.outputs.seg import build_segmentation
from inference.outputs.sr import build_measurement_report

logger = logging.getLogger(__name__)


@dataclass
class DerivedObjects:
    sr: bytes = b""
    seg: bytes = b""
    fhir: bytes = b""  # the FHIR R4 Bundle, JSON
    warnings: list[str] = field(default_factory=list)


def source_headers(volume: Volume, files: Sequence[bytes]) -> list[Dataset]:
    """The uploaded instances (headers only) that contributed to ``volume``, for SEG references."""
    if volume.source is None:
        return []
    wanted = {image.sop_instance_uid for image in volume.source.images}
    headers = []
    for data in files:
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, force=True)
        if ds.get("SOPInstanceUID") in wanted:
            headers.append(ds)
    return headers


def build_derived(
    volume: Volume,
    findings: Sequence[Finding],
    masks: Sequence[FindingMask] | None,
    *,
    algorithm: Algorithm,
    want_sr: bool,
    want_seg: bool,
    want_fhir: bool = False,
    source_datasets: Sequence[Dataset] = (),
) -> DerivedObjects:
    """Build and encode the SEG, SR and FHIR Bundle a read asked for; ``masks`` are the model's (None: the boxes are
    rendered). The FHIR Bundle refers to the SR by its UID, and to the SEG when this read made one.
    ``source_datasets``: the headers of the instances ``volume`` was read from (:func:`source_headers`), for a SEG.

    Their UIDs derive from the source and the model (``inference.outputs.uids``): the same read gives the same UIDs.
    A SEG without findings is not built (a warning says so); a SEG of a NIfTI or raw volume is UnsupportedError.
    """
    out = DerivedObjects()
    segmentation = None
    if want_seg:
        if volume.source is None:
            raise UnsupportedError(
                "DICOM SEG needs DICOM source images; this study came as NIfTI or a raw array (request DICOM_SR "
                "or use the findings instead)"
            )
        if not findings:
            out.warnings.append("no findings: DICOM SEG omitted (a Segmentation needs at least one segment)")
        else:
            regions, rendered = finding_masks(volume, findings, masks)
            segmentation = build_segmentation(
                volume,
                findings,
                regions,
                algorithm=algorithm,
                source_datasets=source_datasets,
                rendered=rendered,
            )
            out.seg = encode_dataset(segmentation)
    report = None
    if want_sr:
        report = build_measurement_report(volume, findings, algorithm=algorithm, masks=masks, segmentation=segmentation)
        out.sr = encode_dataset(report)
    if want_fhir:
        bundle = build_fhir_report(volume, findings, algorithm=algorithm, report=report, segmentation=segmentation)
        out.fhir = encode_fhir(bundle)
    return out
