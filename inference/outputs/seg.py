"""Masks as a DICOM Segmentation (BINARY, one segment per label), built with highdicom.

``masks`` maps a label to a boolean array in the *volume's* voxel grid, shape ``volume.shape`` = (X, Y, Z)
= (columns, rows, slices); frame k of the SEG is ``mask[:, :, k].T`` (rows x columns), the pixel layout of
source slice k. Segments are numbered 1, 2, ... in the order of ``masks``. Each segment carries:

* SegmentLabel = the label; SegmentAlgorithmType AUTOMATIC; Segment Algorithm Identification with the model
  name and version, family DCM 123110 "Artificial Intelligence".
* SegmentedPropertyCategory / SegmentedPropertyType from ``SEGMENT_CODES_BY_LABEL``: abnormalities
  (nodule, mass, lesion, ...) are category SCT 49755003 "Morphologically Abnormal Structure" with the same
  type code as the SR's finding type (``inference.outputs.sr.FINDING_TYPE_BY_LABEL``); organs (lung, liver,
  ...) are category SCT 91723000 "Anatomical Structure". An unknown label gets category "Morphologically
  Abnormal Structure" and a 99RADSERVE local type code (see ``inference.outputs.sr``), and the SEG lists
  99RADSERVE in its Coding Scheme Identification Sequence.

The SEG joins the source study (patient and study attributes copied by highdicom from the source datasets),
in a new series, and references the source instances; frames are matched to source images by
SOPInstanceUID through ``volume.source.images``, so the datasets may come in any order.

Limitation: a DICOM Segmentation must reference its source images (highdicom 0.28 ``Segmentation`` requires
at least one source dataset, and the IOD requires the referenced series). A NIfTI or raw volume has none,
and radserve does not fabricate source images, so ``build_segmentation`` raises UnsupportedError for it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from inference.errors import UnsupportedError
from inference.io.volume import Volume
from inference.outputs.sr import FINDING_TYPE_BY_LABEL, LOCAL_SCHEME, local_coding_scheme, local_label_code
from inference.outputs.uids import SEG, DerivedUids
from inference.postprocess.finding import Finding

logger = logging.getLogger(__name__)

ABNORMAL = codes.cid7150.MorphologicallyAbnormalStructure  # SCT 49755003
ANATOMY = codes.cid7150.AnatomicalStructure  # SCT 91723000

# (category, type) by label. Finding labels share the SR's finding-type codes.
SEGMENT_CODES_BY_LABEL: dict[str, tuple[Code, Code]] = {
    **{label: (ABNORMAL, code) for label, code in FINDING_TYPE_BY_LABEL.items()},
    "lung": (ANATOMY, codes.SCT.Lung),  # 39607008
    "brain": (ANATOMY, codes.SCT.Brain),  # 12738006
    "liver": (ANATOMY, codes.SCT.Liver),  # 10200004
    "spleen": (ANATOMY, codes.SCT.Spleen),  # 78961009
    "kidney": (ANATOMY, codes.SCT.Kidney),  # 64033007
    "heart": (ANATOMY, codes.SCT.Heart),  # 80891009
}

_MAX_LO = 64


def segment_codes(label: str) -> tuple[Code, Code]:
    """(SegmentedPropertyCategory, SegmentedPropertyType) of a label; 99RADSERVE type for unknown labels."""
    known = SEGMENT_CODES_BY_LABEL.get(label.lower())
    if known is not None:
        return known
    return ABNORMAL, local_label_code(label)


def build_segmentation(
    volume: Volume,
    masks: Mapping[str, np.ndarray],
    *,
    model_name: str,
    model_version: str,
    weights_sha256: str = "",
    source_datasets: Sequence[Dataset] | None = None,
    series_number: int = 901,
    instance_number: int = 1,
    manufacturer: str = "radserve",
) -> Dataset:
    """A BINARY DICOM Segmentation of ``masks`` (label -> bool (X, Y, Z)) referencing ``source_datasets``.

    ``source_datasets`` are the input instances (pixel data not needed), any order; they must cover every
    source image of ``volume``. The Series and SOP Instance UIDs derive from the source, the model (``model_name``,
    ``model_version``, ``weights_sha256``) and the kind "SEG" (``inference.outputs.uids``). Raises UnsupportedError
    when ``volume`` has no DICOM source (NIfTI, raw), ValueError for empty ``masks``, a mask of the wrong shape, or
    missing source datasets.
    """
    if volume.source is None:
        raise UnsupportedError(
            "a DICOM Segmentation must reference DICOM source images; this volume was read from NIfTI or a raw "
            "array, so no SEG can be built (use the findings JSON or the SR instead)"
        )
    if not masks:
        raise ValueError("masks is empty: a Segmentation needs at least one segment")
    if not source_datasets:
        raise ValueError("build_segmentation needs the source datasets of a volume read from DICOM")

    stacked = np.zeros((*volume.shape, len(masks)), dtype=bool)  # (X, Y, Z, segments)
    descriptions = []
    uses_local_codes = False
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model_name[:_MAX_LO], family=codes.cid7162.ArtificialIntelligence, version=model_version[:_MAX_LO]
    )
    for number, (label, mask) in enumerate(masks.items(), start=1):
        mask = np.asarray(mask)
        if mask.shape != volume.shape:
            raise ValueError(f"mask {number} has shape {mask.shape}, the volume {volume.shape}")
        stacked[..., number - 1] = mask.astype(bool, copy=False)
        category, property_type = segment_codes(label)
        uses_local_codes |= property_type.scheme_designator == LOCAL_SCHEME
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=(label or "unlabelled")[:_MAX_LO],
                segmented_property_category=category,
                segmented_property_type=property_type,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )

    ordered, frames = _frames(volume, stacked, source_datasets)
    uids = DerivedUids.for_volume(
        volume, model_name=model_name, model_version=model_version, weights_sha256=weights_sha256
    )
    extra: dict[str, object] = {}
    if uses_local_codes:
        extra["coding_schemes"] = [local_coding_scheme()]
    seg = hd.seg.Segmentation(
        source_images=ordered,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=uids.series(SEG),
        series_number=series_number,
        sop_instance_uid=uids.instance(SEG),
        instance_number=instance_number,
        manufacturer=manufacturer[:_MAX_LO],
        manufacturer_model_name=model_name[:_MAX_LO],
        software_versions=model_version[:_MAX_LO],
        device_serial_number=f"{model_name}:{model_version}"[:_MAX_LO],
        series_description=f"AI segmentation {model_name} {model_version}"[:_MAX_LO],
        content_description=f"{model_name} {model_version}"[:_MAX_LO],
        content_label="RADSERVE",
        omit_empty_frames=bool(frames.any()),  # an all-empty SEG keeps its frames rather than having none
        **extra,
    )
    logger.debug("built SEG with %d segment(s), %d source frame(s)", len(descriptions), frames.shape[0])
    return seg


def _frames(
    volume: Volume, stacked: np.ndarray, source_datasets: Sequence[Dataset]
) -> tuple[list[Dataset], np.ndarray]:
    """Source datasets in the order highdicom pairs them with frames, and the (frames, rows, columns, segments) array.

    Single-frame sources: one dataset per slice, frame i = slice of dataset i. A multi-frame source: the
    one dataset, frame f (1-based) = the slice whose SourceImage has frame_number f; frames not in the
    volume stay empty.
    """
    assert volume.source is not None
    by_uid: dict[str, Dataset] = {}
    for ds in source_datasets:
        by_uid.setdefault(str(ds.SOPInstanceUID), ds)
    images = volume.source.images
    columns, rows, _ = volume.shape

    if any(image.frame_number is not None for image in images):
        uids = {image.sop_instance_uid for image in images}
        if len(uids) != 1:
            raise UnsupportedError("a SEG over several multi-frame source instances is not supported")
        (uid,) = uids
        if uid not in by_uid:
            raise ValueError("the multi-frame source dataset of the volume is not among source_datasets")
        source = by_uid[uid]
        n_frames = int(source.get("NumberOfFrames", 1))
        frames = np.zeros((n_frames, rows, columns, stacked.shape[-1]), dtype=np.uint8)
        for image in images:
            if image.frame_number is None or not 1 <= image.frame_number <= n_frames:
                raise ValueError(f"source image of slice {image.slice_index} has no valid frame number")
            frames[image.frame_number - 1] = stacked[:, :, image.slice_index].transpose(1, 0, 2)
        return [source], frames

    ordered_images = sorted(images, key=lambda im: im.slice_index)
    missing = sum(1 for image in ordered_images if image.sop_instance_uid not in by_uid)
    if missing:
        raise ValueError(f"{missing} of the volume's {len(ordered_images)} source images are not in source_datasets")
    ordered = [by_uid[image.sop_instance_uid] for image in ordered_images]
    frames = np.stack([stacked[:, :, image.slice_index].transpose(1, 0, 2) for image in ordered_images]).astype(
        np.uint8
    )
    return ordered, frames


def detections_to_masks(volume: Volume, findings: Sequence[Finding]) -> dict[str, np.ndarray]:
    """label -> bool (X, Y, Z) mask: each finding's bbox filled with its inscribed ellipsoid, unions per label.

    3-D findings: the ellipsoid inscribed in the LPS-aligned ``bbox_mm`` [x0, y0, z0, x1, y1, z1]; projection
    X-ray findings (``bbox_mm`` of 4 values on the image plane, x = column x column spacing, y = row x row
    spacing): the inscribed ellipse on slice 0. Semi-axes are at least half the smallest voxel spacing and the
    voxel nearest the box center is always set, so even a box thinner than a voxel marks something.
    """
    masks: dict[str, np.ndarray] = {}
    for number, finding in enumerate(findings, start=1):
        mask = masks.setdefault(finding.label, np.zeros(volume.shape, dtype=bool))
        bbox = np.asarray(finding.bbox_mm, dtype=np.float64)
        if not np.all(np.isfinite(bbox)):
            raise ValueError(f"finding {number} bbox_mm must be finite")
        if bbox.size == 6:
            _fill_ellipsoid(volume, mask, bbox[:3], bbox[3:])
        elif bbox.size == 4:
            _fill_plane_ellipse(volume, mask, bbox[:2], bbox[2:])
        else:
            raise ValueError(f"finding {number} bbox_mm must have 4 or 6 values, got {bbox.size}")
    return masks


def _fill_ellipsoid(volume: Volume, mask: np.ndarray, lo_mm: np.ndarray, hi_mm: np.ndarray) -> None:
    lo, hi = np.minimum(lo_mm, hi_mm), np.maximum(lo_mm, hi_mm)
    center = (lo + hi) / 2.0
    semi = np.maximum((hi - lo) / 2.0, 0.5 * min(volume.spacing_mm))
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    ijk = volume.lps_to_voxel(corners)
    start = np.clip(np.floor(ijk.min(axis=0)).astype(int), 0, np.array(volume.shape) - 1)
    stop = np.clip(np.ceil(ijk.max(axis=0)).astype(int) + 1, 1, np.array(volume.shape))
    if np.all(stop > start):
        grids = np.meshgrid(*(np.arange(a, b) for a, b in zip(start, stop, strict=True)), indexing="ij")
        points = np.stack([g.ravel() for g in grids], axis=1)
        inside = np.sum(((volume.voxel_to_lps(points) - center) / semi) ** 2, axis=1) <= 1.0
        box = mask[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]]
        box |= inside.reshape(box.shape)
    nearest = np.rint(volume.lps_to_voxel(center)[0]).astype(int)
    if np.all(nearest >= 0) and np.all(nearest < np.array(volume.shape)):
        mask[tuple(nearest)] = True


def _fill_plane_ellipse(volume: Volume, mask: np.ndarray, lo_mm: np.ndarray, hi_mm: np.ndarray) -> None:
    spacing = np.array(volume.spacing_mm[:2])  # column, row spacing
    lo, hi = np.minimum(lo_mm, hi_mm) / spacing, np.maximum(lo_mm, hi_mm) / spacing  # pixel indices
    center = (lo + hi) / 2.0
    semi = np.maximum((hi - lo) / 2.0, 0.5)
    columns, rows = np.meshgrid(np.arange(volume.shape[0]), np.arange(volume.shape[1]), indexing="ij")
    inside = ((columns - center[0]) / semi[0]) ** 2 + ((rows - center[1]) / semi[1]) ** 2 <= 1.0
    mask[:, :, 0] |= inside
    nearest = np.rint(center).astype(int)
    if np.all(nearest >= 0) and np.all(nearest < np.array(volume.shape[:2])):
        mask[nearest[0], nearest[1], 0] = True
