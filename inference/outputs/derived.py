"""The DICOM objects a read asked for, built from its findings (and masks) and encoded for the response."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from io import BytesIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from inference.errors import UnsupportedError
from inference.io.volume import Volume
from inference.outputs import encode_dataset
from inference.outputs.seg import build_segmentation, detections_to_masks
from inference.outputs.sr import build_measurement_report
from inference.postprocess.finding import Finding

logger = logging.getLogger(__name__)


@dataclass
class DerivedObjects:
    sr: bytes = b""
    seg: bytes = b""
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
    masks: Mapping[str, np.ndarray] | None,
    *,
    model_name: str,
    model_version: str,
    weights_sha256: str = "",
    want_sr: bool,
    want_seg: bool,
    source_files: Sequence[bytes] = (),
) -> DerivedObjects:
    """Build and encode the SR and/or SEG. A detection model's SEG paints each finding's box as an ellipsoid.

    Their UIDs derive from the source and the model (``inference.outputs.uids``): the same read gives the same UIDs.
    """
    out = DerivedObjects()
    if want_sr:
        report = build_measurement_report(
            volume, findings, model_name=model_name, model_version=model_version, weights_sha256=weights_sha256
        )
        out.sr = encode_dataset(report)
    if want_seg:
        if volume.source is None:
            raise UnsupportedError(
                "DICOM SEG needs DICOM source images; this study came as NIfTI or a raw array (request DICOM_SR "
                "or use the findings instead)"
            )
        masks = dict(masks) if masks is not None else detections_to_masks(volume, findings)
        if not masks or not any(np.any(m) for m in masks.values()):
            out.warnings.append("no region to segment: DICOM SEG omitted")
            return out
        seg = build_segmentation(
            volume,
            masks,
            model_name=model_name,
            model_version=model_version,
            weights_sha256=weights_sha256,
            source_datasets=source_headers(volume, source_files),
        )
        out.seg = encode_dataset(seg)
    return out
