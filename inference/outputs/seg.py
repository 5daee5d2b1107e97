"""A read's findings as a DICOM Segmentation (BINARY): one segment per finding, its voxels, built with highdicom.

Segment N is finding N (1-based, the findings' order), so the segment numbers follow the findings' tracking
identifiers: Tracking ID "finding N" and the Tracking UID of finding N (``inference.outputs.uids``), the values the
SR's measurement groups of that finding carry. Each segment holds the finding's voxels on the source grid
(``inference.outputs.regions``): a segmentation model's mask as it produced it, or a detection's box rendered as
its inscribed ellipsoid (ellipse on a projection X-ray), which the segment's Segment Description then says. Each
carries:

* SegmentLabel "<label> N"; SegmentAlgorithmType AUTOMATIC; Segment Algorithm Identification with the model's name,
  version, family DCM 123110 "Artificial Intelligence", weights digest and radserve's version
  (``inference.outputs.algorithm``);
* SegmentedPropertyCategory / SegmentedPropertyType from ``inference.outputs.codes.segment_codes``: findings
  (nodule, lesion, opacity...) are SCT 49755003 "Morphologically Abnormal Structure" with the SR's finding-type
  code; organ labels (lung, liver...) SCT 91723000 "Anatomical Structure". An unknown label gets a 99RADSERVE
  type, declared in the Coding Scheme Identification Sequence.

The SEG joins the source study: Patient and General Study attributes from the source header
(``inference.outputs.source``: Type 2 attributes carried, empty when the source lacks them), Series and SOP Instance
UIDs derived (the same on every read of the study by the same model), the algorithm's Contributing Equipment item
(IHE AI Results). It references every source image; its frames are the source frames the findings touch (empty
frames are left out). A projection X-ray SEG carries the source's PatientOrientation (Type 2C without a plane
orientation; empty when the source has none).

Limitation: a DICOM Segmentation must reference its source images. A NIfTI or raw volume has none, and radserve
does not fabricate source images, so ``build_segmentation`` raises UnsupportedError for it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from inference.errors import UnsupportedError
from inference.io.volume import SourceImage, Volume
from inference.outputs.algorithm import Algorithm, add_algorithm_equipment, lo
from inference.outputs.codes import PROCESSING_ALGORITHM, coding_schemes, segment_codes
from inference.outputs.finding import Finding, FindingMask
from inference.outputs.regions import is_projection
from inference.outputs.source import fit_source_datasets, patient_orientation
from inference.outputs.uids import SEG, DerivedUids

logger = logging.getLogger(__name__)

RENDERED_DESCRIPTION = {
    True: "ellipse inscribed in the detected box",  # projection X-ray
    False: "ellipsoid inscribed in the detected box",
}


def build_segmentation(
    volume: Volume,
    findings: Sequence[Finding],
    masks: Sequence[FindingMask],
    *,
    algorithm: Algorithm,
    source_datasets: Sequence[Dataset] | None,
    rendered: bool = False,
    series_number: int = 901,
    instance_number: int = 1,
) -> Dataset:
    """A BINARY Segmentation with segment N = ``masks[N - 1]``, the voxels of ``findings[N - 1]``.

    ``source_datasets`` are the input instances (pixel data not needed), in any order; they must cover every
    source image of ``volume``. ``rendered``: the masks are detections' boxes rendered (the segments say so).
    Raises UnsupportedError when ``volume`` has no DICOM source (NIfTI, raw), ValueError for no findings, a mask
    count that differs from the findings', an empty mask or one outside the volume, or missing source datasets.
    """
    if volume.source is None:
        raise UnsupportedError(
            "a DICOM Segmentation must reference DICOM source images; this volume was read from NIfTI or a raw "
            "array, so no SEG can be built (use the findings JSON or the SR instead)"
        )
    if not findings:
        raise ValueError("no findings: a Segmentation needs at least one segment")
    if len(masks) != len(findings):
        raise ValueError(f"{len(masks)} masks for {len(findings)} findings: one segment per finding")
    if not source_datasets:
        raise ValueError("build_segmentation needs the source datasets of a volume read from DICOM")
    for number, mask in enumerate(masks, start=1):
        if not mask.fits(volume.shape):
            raise ValueError(f"the mask of finding {number} does not fit the volume {volume.shape}")
        if mask.voxel_count == 0:
            raise ValueError(f"the mask of finding {number} is empty")

    uids = DerivedUids.for_volume(
        volume, model_name=algorithm.name, model_version=algorithm.version, weights_sha256=algorithm.weights_sha256
    )
    identification = algorithm.seg_identification()
    descriptions = []
    used_codes = [PROCESSING_ALGORITHM]
    for number, finding in enumerate(findings, start=1):
        category, property_type = segment_codes(finding.label)
        used_codes.append(property_type)
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=lo(f"{finding.label or 'unlabelled'} {number}"),
            segmented_property_category=category,
            segmented_property_type=property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
            tracking_uid=uids.tracking(number),
            tracking_id=f"finding {number}",
        )
        if rendered:
            description.SegmentDescription = RENDERED_DESCRIPTION[is_projection(volume)]
        descriptions.append(description)

    sources = fit_source_datasets(source_datasets)
    ordered, further, frames = _frames(volume, masks, sources)
    extra: dict[str, object] = {}
    schemes = coding_schemes(used_codes)
    if schemes:
        extra["coding_schemes"] = schemes
    if further:
        extra["further_source_images"] = further
    seg = hd.seg.Segmentation(
        source_images=ordered,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=uids.series(SEG),
        series_number=series_number,
        sop_instance_uid=uids.instance(SEG),
        instance_number=instance_number,
        manufacturer="radserve",
        manufacturer_model_name=lo(algorithm.name),
        software_versions=algorithm.software_versions,
        device_serial_number=lo(f"{algorithm.name}:{algorithm.version}"),
        series_description=lo(f"AI segmentation {algorithm.name} {algorithm.version}"),
        content_description=lo(f"{algorithm.name} {algorithm.version}"),
        content_label="RADSERVE",
        omit_empty_frames=True,
        **extra,
    )
    add_algorithm_equipment(seg, algorithm)
    _set_dimension_organization_uid(seg, uids.dimension_organization(SEG))
    if is_projection(volume):  # Type 2C in General Image without a plane orientation; allowed with one
        seg.PatientOrientation = patient_orientation(ordered[0])
    logger.debug("built SEG with %d segment(s), %d frame(s) with findings", len(descriptions), frames.shape[0])
    return seg


def _set_dimension_organization_uid(seg: Dataset, uid: str) -> None:
    """highdicom draws the DimensionOrganizationUID at random; a redelivered SEG must carry the same UIDs."""
    drawn = seg.DimensionOrganizationSequence[0].DimensionOrganizationUID
    seg.DimensionOrganizationSequence[0].DimensionOrganizationUID = uid
    for index in seg.DimensionIndexSequence:
        if index.get("DimensionOrganizationUID") == drawn:
            index.DimensionOrganizationUID = uid


def _frames(
    volume: Volume, masks: Sequence[FindingMask], source_datasets: Sequence[Dataset]
) -> tuple[list[Dataset], list[Dataset], np.ndarray]:
    """(source datasets paired with frames, the other source datasets, the frames).

    The frames are a label map (frames, rows, columns) of segment numbers when no two masks overlap, else stacked
    segments (frames, rows, columns, segments); highdicom accepts both for a BINARY SEG. Single-frame sources: one
    frame per source slice that a mask reaches, the other slices' datasets go to ``further_source_images`` (still
    referenced). A multi-frame source: the one dataset and all its frames, frame f = the slice whose SourceImage has
    frame number f.
    """
    assert volume.source is not None
    by_uid: dict[str, Dataset] = {}
    for ds in source_datasets:
        by_uid.setdefault(str(ds.SOPInstanceUID), ds)
    images = volume.source.images
    columns, rows, _ = volume.shape
    overlapping = _overlap(masks)

    if any(image.frame_number is not None for image in images):
        uids = {image.sop_instance_uid for image in images}
        if len(uids) != 1:
            raise UnsupportedError("a SEG over several multi-frame source instances is not supported")
        (uid,) = uids
        if uid not in by_uid:
            raise ValueError("the multi-frame source dataset of the volume is not among source_datasets")
        source = by_uid[uid]
        n_frames = int(source.get("NumberOfFrames", 1))
        frame_of_slice: dict[int, int] = {}
        for image in images:
            if image.frame_number is None or not 1 <= image.frame_number <= n_frames:
                raise ValueError(f"source image of slice {image.slice_index} has no valid frame number")
            frame_of_slice[image.slice_index] = image.frame_number - 1
        frames = _paint(masks, frame_of_slice, n_frames, rows, columns, overlapping)
        return [source], [], frames

    ordered_images = sorted(images, key=lambda im: im.slice_index)
    missing = sum(1 for image in ordered_images if image.sop_instance_uid not in by_uid)
    if missing:
        raise ValueError(f"{missing} of the volume's {len(ordered_images)} source images are not in source_datasets")
    touched = sorted({int(k) for mask in masks for k in _slices_touched(mask)})
    with_findings = [image for image in ordered_images if image.slice_index in touched]
    others = [by_uid[image.sop_instance_uid] for image in _unique(ordered_images) if image not in with_findings]
    frame_of_slice = {image.slice_index: n for n, image in enumerate(with_findings)}
    frames = _paint(masks, frame_of_slice, len(with_findings), rows, columns, overlapping)
    return [by_uid[image.sop_instance_uid] for image in with_findings], others, frames


def _unique(images: Sequence[SourceImage]) -> list[SourceImage]:
    seen: dict[str, SourceImage] = {}
    for image in images:
        seen.setdefault(image.sop_instance_uid, image)
    return list(seen.values())


def _slices_touched(mask: FindingMask) -> np.ndarray:
    return np.flatnonzero(mask.mask.any(axis=(0, 1))) + mask.offset[2]


def _overlap(masks: Sequence[FindingMask]) -> bool:
    """Whether any voxel belongs to two masks (blocks compared only where they meet)."""
    for a in range(len(masks)):
        for b in range(a + 1, len(masks)):
            start = np.maximum(masks[a].offset, masks[b].offset)
            stop = np.minimum(
                np.add(masks[a].offset, masks[a].mask.shape), np.add(masks[b].offset, masks[b].mask.shape)
            )
            if np.any(stop <= start) or not np.any(_window(masks[a], start, stop) & _window(masks[b], start, stop)):
                continue
            return True
    return False


def _window(mask: FindingMask, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """The part of ``mask`` between volume indices ``start`` and ``stop``."""
    return mask.mask[tuple(slice(int(a - o), int(b - o)) for a, b, o in zip(start, stop, mask.offset, strict=True))]


def _paint(
    masks: Sequence[FindingMask],
    frame_of_slice: dict[int, int],
    n_frames: int,
    rows: int,
    columns: int,
    overlapping: bool,
) -> np.ndarray:
    """The frames (rows x columns each) of the slices in ``frame_of_slice``: a label map, or stacked segments."""
    if overlapping:
        frames = np.zeros((n_frames, rows, columns, len(masks)), dtype=np.uint8)
    else:
        frames = np.zeros((n_frames, rows, columns), dtype=np.uint8 if len(masks) < 256 else np.uint16)
    for number, mask in enumerate(masks, start=1):
        c0, r0, k0 = mask.offset
        for k_block in np.flatnonzero(mask.mask.any(axis=(0, 1))):
            frame = frame_of_slice.get(int(k_block) + k0)
            if frame is None:
                raise ValueError(f"the mask of finding {number} reaches slice {int(k_block) + k0}, which has no frame")
            plane = mask.mask[:, :, k_block].T  # (rows, columns) of the block
            window = (slice(r0, r0 + plane.shape[0]), slice(c0, c0 + plane.shape[1]))
            if overlapping:
                frames[frame][(*window, number - 1)] |= plane
            else:
                frames[frame][window][plane] = number
    return frames
