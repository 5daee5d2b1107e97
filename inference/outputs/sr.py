"""Findings as a DICOM Comprehensive 3D SR measurement report (TID 1500), built with highdicom.

Document
--------
One Comprehensive 3D SR instance: the TID 1500 "Imaging Measurement Report", the model as the device observer
(TID 1004: name = the model's name, model name = "name:version", UID = the algorithm's Device UID), Procedure
reported from CID 100 by modality (``inference.outputs.codes.procedure_code``: LOINC "CT unspecified body region",
"MRI unspecified body region", SCT "Imaging procedure" for projection X-ray), and the algorithm's Contributing
Equipment item (IHE AI Results, ``inference.outputs.algorithm``).

Each finding N is described by several measurement groups, all with Tracking Identifier "finding N" and the same
Tracking Unique Identifier (derived, ``inference.outputs.uids``: the UID of segment N of the SEG), so a reader
gathers them by tracking UID. Each group carries the Finding (DCM 121071, the type coded from the label), the
Finding Site where the label implies one, TID 4019 Algorithm Identification (model name, version, family, weights
digest) and a Geometric purpose of region (CID 219). In order:

1. **Outline** (TID 1410): an image SCOORD on a source image (``inference.outputs.regions``): the closed POLYLINE
   around the finding's voxels in the slice nearest its center (a segmentation's mask, a detection's rendered
   box), or on a projection X-ray the ELLIPSE inscribed in the box. Geometric purpose DCM 111041 "Outline". This
   group holds the measurements (TID 1419):

   - Diameter (SCT 81827009), derivation Maximum (SCT 56851009): ``diameter_mm`` in UCUM "mm";
   - Volume (SCT 118565006): ``volume_ml`` in UCUM "ml", when the finding has one;
   - Certainty of Finding (DCM 111012): the model's score x 100 in UCUM "%".

2. **Center** (TID 1410): an image SCOORD POINT at the finding's center (a segmented region's centroid, a box's
   center) on the source image nearest it (the image ``Finding.sop_instance_uid`` names). Geometric purpose DCM
   111010 "Center".
3. **Center in 3-D** (CT and MR with a Frame of Reference, TID 1411): SCOORD3D POINT = ``center_mm`` (LPS mm) as
   the Volume Surface, with the source series; geometric purpose "Center".
4. **Segment** (when the read returns the SEG, TID 1411): Referenced Segment = segment N of the SEG, with the source
   series.

Why several groups: TID 1410 and 1411 hold exactly one region each (one image SCOORD, one SCOORD3D or one
referenced segment), and viewers draw one region per group (OHIF draws image SCOORDs only). Measurements live in
the outline group only, so that a reader counting values counts each once.

NIfTI and raw input carry no images: each finding is one TID 1410 group whose region is an SCOORD3D POINT in a
frame of reference synthesised for the report, with the measurements.

With no findings, the report holds a single TID 1501 group "no findings" whose Finding is SCT 260413007 "None", so
that a negative read is still a storable, explicit result.

SCOORD image coordinates start at the top-left corner of the top-left pixel (PS3.3 C.18.6.1.2); SCOORD3D
GraphicData is FL (float32): coordinates round-trip to about 1e-5 mm at typical LPS magnitudes.

Patient, study and evidence
---------------------------
With DICOM input the SR joins the input's study (same StudyInstanceUID), copying its Patient and General Study
attributes (``inference.outputs.source``: Type 2 attributes carried, empty when the source lacks them, never
invented), in its own series; Series and SOP Instance UIDs are derived (the same on every read of the same series
by the same model). The Current Requested Procedure Evidence Sequence lists every source instance of the volume
(all were read by the model) and the SEG when the report references it.

For NIfTI or raw input nothing identifies the patient or study, so the SR synthesises exactly this: a new
StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID (new on every read), new tracking UIDs and a new
FrameOfReferenceUID used only inside the SCOORD3D items; StudyDate and StudyTime are the moment the report is built
(the synthesised study comes into being then); the Type 2 patient and study attributes are present but empty. There
are no image references and no evidence sequences. Projection X-ray without DICOM input is refused
(UnsupportedError): its ``center_mm`` is on the image plane, with no frame of reference.

Nothing from the source header is ever logged or put into an exception message.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage, generate_uid

from inference.errors import UnsupportedError
from inference.io.volume import SourceImage, Volume
from inference.outputs.algorithm import Algorithm, add_algorithm_equipment, lo
from inference.outputs.codes import (
    CENTER,
    CERTAINTY_OF_FINDING,
    DIAMETER,
    LONGEST,
    NO_FINDING,
    OUTLINE,
    PROCESSING_ALGORITHM,
    UNIT_ML,
    UNIT_MM,
    UNIT_PERCENT,
    VOLUME,
    coding_schemes,
    finding_site_code,
    finding_type_code,
    procedure_code,
)
from inference.outputs.finding import Finding, FindingMask
from inference.outputs.regions import ImageGeometry, finding_masks, image_geometry, is_projection
from inference.outputs.source import PATIENT_STUDY_TYPE2, patient_study_header
from inference.outputs.uids import SR, DerivedUids

logger = logging.getLogger(__name__)

Group = (
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
)


@dataclass(frozen=True)
class _Context:
    """What a report needs besides the findings: evidence, frame of reference, and whether the study is made up."""

    evidence: list[Dataset]
    frame_of_reference_uid: str | None
    synthesised: bool  # NIfTI / raw: no patient, study or image references


def build_measurement_report(
    volume: Volume,
    findings: Sequence[Finding],
    *,
    algorithm: Algorithm,
    masks: Sequence[FindingMask] | None = None,
    segmentation: Dataset | None = None,
    series_number: int = 900,
    instance_number: int = 1,
) -> Dataset:
    """A Comprehensive 3D SR (TID 1500) holding ``findings`` of ``volume``; see the module docstring.

    ``masks``: the model's masks, one per finding (a segmentation model); None renders each finding's box
    (``inference.outputs.regions``). ``segmentation``: the SEG of these findings (segment N = finding N), which the
    report then references. Raises UnsupportedError for projection X-ray without DICOM source, ValueError for a
    finding whose values do not fit the volume (wrong number of coordinates, non-finite numbers, score outside [0,
    1]) or a SEG whose segments are not the findings.
    """
    projection = is_projection(volume)
    if projection and volume.source is None:
        raise UnsupportedError(
            f"a DICOM SR for projection X-ray ({volume.modality.upper()}) needs the DICOM source image; "
            "this volume was not read from DICOM"
        )
    if segmentation is not None and len(segmentation.SegmentSequence) != len(findings):
        raise ValueError(f"the SEG has {len(segmentation.SegmentSequence)} segments for {len(findings)} findings")
    context = _context(volume, segmentation)
    uids = DerivedUids.for_volume(
        volume, model_name=algorithm.name, model_version=algorithm.version, weights_sha256=algorithm.weights_sha256
    )
    regions, rendered = finding_masks(volume, findings, masks) if volume.source is not None else ([], True)

    groups: list[Group] = []
    used_codes: list[Code] = [PROCESSING_ALGORITHM]
    for number, finding in enumerate(findings, start=1):
        finding_type = finding_type_code(finding.label)
        used_codes.append(finding_type)
        site = finding_site_code(volume.modality, finding.label)
        common = {
            "tracking_identifier": hd.sr.TrackingIdentifier(uid=uids.tracking(number), identifier=f"finding {number}"),
            "finding_type": finding_type,
            "finding_sites": [hd.sr.FindingSite(site)] if site is not None else None,
            "algorithm_id": algorithm.sr_identification(),
        }
        measurements = _measurements(finding, number)
        if volume.source is None:
            center = _finite(finding.center_mm, 3, f"finding {number} center_mm")
            region = hd.sr.ImageRegion3D(
                graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                graphic_data=center.reshape(1, 3),
                frame_of_reference_uid=context.frame_of_reference_uid,
            )
            groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    referenced_region=region, measurements=measurements, **common
                )
            )
            continue
        geometry = image_geometry(volume, finding, regions[number - 1], rendered=rendered, number=number)
        assert geometry is not None  # a DICOM source
        groups += _finding_groups(volume, finding, number, geometry, measurements, common, context)
        if segmentation is not None:
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    referenced_segment=hd.sr.ReferencedSegment(
                        segmentation.SOPClassUID,
                        segmentation.SOPInstanceUID,
                        number,
                        source_series=hd.sr.SourceSeriesForSegmentation(volume.source.series_instance_uid),
                    ),
                    **common,
                )
            )
    if not groups:
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=uids.no_findings_tracking(), identifier="no findings"),
                finding_type=NO_FINDING,
                algorithm_id=algorithm.sr_identification(),
            )
        )

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=algorithm.device_uid,
        name=lo(algorithm.name),
        manufacturer_name="radserve",
        model_name=lo(f"{algorithm.name}:{algorithm.version}"),
    )
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=procedure_code(volume.modality),
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=context.evidence,
        content=report[0],
        series_instance_uid=uids.series(SR),
        series_number=series_number,
        sop_instance_uid=uids.instance(SR),
        instance_number=instance_number,
        manufacturer="radserve",
        manufacturer_model_name=lo(algorithm.name),
        software_versions=algorithm.software_versions,
        series_description=lo(f"AI findings {algorithm.name} {algorithm.version}"),
        is_complete=True,  # every finding of the read is in the report
        is_final=False,  # AI output for a radiologist to review
        is_verified=False,
        coding_schemes=coding_schemes(used_codes) or None,
    )
    add_algorithm_equipment(sr, algorithm)
    if context.synthesised:
        # The only evidence was a placeholder carrying the synthesised study: it names no real instance.
        for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
            if keyword in sr:
                delattr(sr, keyword)
    logger.debug(
        "built SR with %d finding(s) in %d group(s) for a %s volume (%s)",
        len(findings),
        len(groups),
        volume.modality,
        "synthesised study" if context.synthesised else "source study",
    )
    return sr


def _finding_groups(
    volume: Volume,
    finding: Finding,
    number: int,
    geometry: ImageGeometry,
    measurements: list[hd.sr.Measurement],
    common: dict,
    context: _Context,
) -> list[Group]:
    """The outline, center and (with a frame of reference) 3-D center groups of one finding."""
    outline = hd.sr.ImageRegion(
        graphic_type=geometry.outline_type,
        graphic_data=geometry.outline,
        source_image=_region_source(geometry.outline_image),
    )
    center = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=geometry.center.reshape(1, 2),
        source_image=_region_source(geometry.center_image),
    )
    groups: list[Group] = [
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            referenced_region=outline, geometric_purpose=OUTLINE, measurements=measurements, **common
        ),
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            referenced_region=center, geometric_purpose=CENTER, **common
        ),
    ]
    if context.frame_of_reference_uid is not None and not is_projection(volume):
        assert volume.source is not None
        point = hd.sr.VolumeSurface(
            graphic_type=hd.sr.GraphicTypeValues3D.POINT,
            graphic_data=_finite(finding.center_mm, 3, f"finding {number} center_mm").reshape(1, 3),
            frame_of_reference_uid=context.frame_of_reference_uid,
            source_series=hd.sr.SourceSeriesForSegmentation(volume.source.series_instance_uid),
        )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                referenced_volume_surface=point, geometric_purpose=CENTER, **common
            )
        )
    return groups


def _region_source(image: SourceImage) -> hd.sr.SourceImageForRegion:
    frames = [image.frame_number] if image.frame_number is not None else None
    return hd.sr.SourceImageForRegion(image.sop_class_uid, image.sop_instance_uid, frames)


def _measurements(finding: Finding, number: int) -> list[hd.sr.Measurement]:
    measurements = [
        hd.sr.Measurement(
            name=DIAMETER,
            value=_non_negative(finding.diameter_mm, f"finding {number} diameter_mm"),
            unit=UNIT_MM,
            derivation=LONGEST,
        )
    ]
    if finding.volume_ml is not None:
        measurements.append(
            hd.sr.Measurement(
                name=VOLUME, value=_non_negative(finding.volume_ml, f"finding {number} volume_ml"), unit=UNIT_ML
            )
        )
    score = float(finding.score)
    if not 0.0 <= score <= 1.0:
        raise ValueError(f"finding {number} score must be in [0, 1]")
    measurements.append(hd.sr.Measurement(name=CERTAINTY_OF_FINDING, value=round(score * 100.0, 6), unit=UNIT_PERCENT))
    return measurements


def _context(volume: Volume, segmentation: Dataset | None) -> _Context:
    source = volume.source
    if source is None:
        placeholder = Dataset()
        placeholder.StudyInstanceUID = generate_uid()
        placeholder.SeriesInstanceUID = generate_uid()
        placeholder.SOPInstanceUID = generate_uid()
        placeholder.SOPClassUID = Comprehensive3DSRStorage  # never written: the evidence sequences are removed
        for keyword in PATIENT_STUDY_TYPE2:
            setattr(placeholder, keyword, "")
        now = datetime.datetime.now()
        placeholder.StudyDate, placeholder.StudyTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        return _Context([placeholder], generate_uid(), synthesised=True)

    if not source.images:
        raise ValueError("the volume's DICOM source lists no images")
    evidence = []
    for image in _unique_instances(source.images):
        item = Dataset()
        item.StudyInstanceUID = source.study_instance_uid
        item.SeriesInstanceUID = source.series_instance_uid
        item.SOPClassUID = image.sop_class_uid
        item.SOPInstanceUID = image.sop_instance_uid
        evidence.append(item)
    # The first evidence item also carries the patient and study attributes the SR copies.
    first = patient_study_header(source.header if isinstance(source.header, Dataset) else None)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID"):
        setattr(first, keyword, getattr(evidence[0], keyword))
    evidence[0] = first
    if segmentation is not None:
        item = Dataset()
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID"):
            setattr(item, keyword, getattr(segmentation, keyword))
        evidence.append(item)
    return _Context(evidence, source.frame_of_reference_uid or None, synthesised=False)


def _unique_instances(images: Sequence[SourceImage]) -> list[SourceImage]:
    """One entry per SOP instance (multi-frame sources list one image per frame), in slice order."""
    seen: dict[str, SourceImage] = {}
    for image in sorted(images, key=lambda im: im.slice_index):
        seen.setdefault(image.sop_instance_uid, image)
    return list(seen.values())


def _finite(values: Sequence[float], n: int, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size != n:
        raise ValueError(f"{what} must have {n} values, got {array.size}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} must be finite")
    return array


def _non_negative(value: float, what: str) -> float:
    value = float(value)
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0")
    return value
