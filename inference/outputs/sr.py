"""Findings as a DICOM Comprehensive 3D SR measurement report (TID 1500), built with highdicom.

Document layout
---------------
One Comprehensive 3D SR instance: the TID 1500 "Imaging Measurement Report" with the model as the device
observer (TID 1004: name = model name, model name = "name:version", UID derived from the model's name, version
and weights, ``inference.outputs.uids.device_uid``), the procedure
reported coded from the modality (``PROCEDURE_BY_MODALITY``), and one TID 1410 "Planar ROI Measurements and
Qualitative Evaluations" group per finding, in the order given, holding:

* Tracking Identifier: "finding N" (N = 1, 2, ... in input order) and a Tracking Unique Identifier derived from
  the source, the model and N (``inference.outputs.uids``): the same on every read of the same study.
* Finding (DCM 121071): the finding type coded from the label (``FINDING_TYPE_BY_LABEL``).
* Finding Site (SCT 363698007): coded from (modality, label) (``FINDING_SITE_BY_MODALITY_LABEL``); absent
  when the table has no entry.
* Algorithm Identification (TID 4019): the model name and version.
* The region, a single POINT:

  - 3-D studies (CT, MR, NIfTI, raw): SCOORD3D "Image Region" = ``finding.center_mm`` (LPS mm) in the
    volume's frame of reference.
  - Projection X-ray (``volume.shape[2] == 1`` and modality CR or DX) read from DICOM: SCOORD "Image
    Region" on the source image at (column + 0.5, row + 0.5), where (column, row) is
    ``finding.center_voxel[:2]`` (pixel indices, 0 = center of the top-left pixel; derived from
    ``center_mm`` and the pixel spacing when ``center_voxel`` is None). The 0.5 shift is DICOM's SCOORD
    convention (PS3.3 C.18.6.1.2, highdicom ``ImageToReferenceTransformer``): image coordinates start at
    the top-left *corner* of the top-left pixel, whose center is (0.5, 0.5).
  - A DICOM series without a FrameOfReferenceUID gets the SCOORD form too, on its nearest slice.

* Measurements (TID 300):

  - Diameter (SCT 81827009), derivation Maximum (SCT 56851009): ``diameter_mm`` in UCUM "mm" (the longest
    diameter).
  - Volume (SCT 118565006): ``volume_ml`` in UCUM "ml", only when the finding has a volume.
  - Certainty of Finding (DCM 111012, "the likelihood that the finding is in fact the type of finding
    identified"): the model's score x 100 in UCUM "%" (0-100, as the DICOM CAD templates express
    certainty). No 99RADSERVE code is needed for the score.

  With DICOM input each measurement carries "Source of Measurement" = the source image nearest the center
  (``finding.sop_instance_uid`` when it is one of the volume's images, else the slice nearest
  ``center_mm``; with its frame number for a multi-frame source).

Why TID 1410 with a SCOORD3D point rather than TID 1411 "Volumetric ROI": highdicom 0.28 builds a TID 1411
region only from a VolumeSurface (which must name source images or a source series, which NIfTI input does
not have), a referenced segment, or 2-D image regions; a point has no extent either way. One template for
every kind of input keeps readers simple (``get_planar_roi_measurement_groups`` finds all findings); the
extent is in the measurements. SCOORD3D GraphicData is FL (float32): coordinates round-trip to about 1e-5 mm
at typical LPS magnitudes.

With no findings, the report holds a single TID 1501 group "no findings" whose Finding is SCT 260413007
"None", so that a negative read is still a storable, explicit result.

Local codes
-----------
Labels that are not in ``FINDING_TYPE_BY_LABEL`` are coded in the local scheme ``99RADSERVE``
(CodingSchemeDesignator "99RADSERVE"): CodeValue = the label upper-cased with every character outside
[A-Z0-9] replaced by "_" (up to 64 characters; over 16 it is stored as LongCodeValue), CodeMeaning = the
label. The SR then lists 99RADSERVE in its Coding Scheme Identification Sequence. Known labels never use it.

Patient, study and evidence
---------------------------
With DICOM input (``volume.source`` set) the Patient and General Study attributes are copied from
``volume.source.header`` (the SR joins the input's study: same StudyInstanceUID), the SR gets its own
SeriesInstanceUID and SOPInstanceUID (derived, ``inference.outputs.uids``: the same on every read of the same
series with the same model), and the Current Requested Procedure Evidence Sequence lists every source instance of
the volume (all were read by the model; this includes every referenced instance).

For NIfTI or raw input (``volume.source`` is None) nothing identifies the patient or study, so the SR
synthesises exactly this: a new StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID (new on every read:
nothing identifies the input), new tracking UIDs and a new
FrameOfReferenceUID used only inside the SCOORD3D items (no other object shares it); StudyDate and StudyTime
are the moment the report is built (the synthesised study comes into being then); PatientName, PatientID,
PatientBirthDate, PatientSex, AccessionNumber, StudyID and ReferringPhysicianName are present but empty
(DICOM type 2). There are no image references and no evidence sequences. Projection X-ray without DICOM
input is refused (UnsupportedError): its ``center_mm`` is on the image plane, with no frame of reference.

Nothing from the source header is ever logged or put into an exception message.
"""

from __future__ import annotations

import copy
import datetime
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage, generate_uid
from pydicom.valuerep import DA, TM

from inference.errors import UnsupportedError
from inference.io.volume import SourceImage, Volume
from inference.outputs.uids import SR, DerivedUids, device_uid
from inference.postprocess.finding import Finding

logger = logging.getLogger(__name__)

LOCAL_SCHEME = "99RADSERVE"
PROJECTION_MODALITIES = frozenset({"CR", "DX"})

# Finding type (DCM 121071 "Finding") by model label; unknown labels get a 99RADSERVE code.
FINDING_TYPE_BY_LABEL: dict[str, Code] = {
    "nodule": codes.SCT.Nodule,  # 27925004
    "lung_nodule": codes.SCT.Nodule,
    "mass": codes.SCT.Mass,  # 4147007
    "lesion": codes.SCT.Lesion,  # 52988006
    "tumor": codes.SCT.Neoplasm,  # 108369006
    "tumour": codes.SCT.Neoplasm,
    "neoplasm": codes.SCT.Neoplasm,
    "metastasis": codes.SCT.Metastasis,  # 128462008
    "cyst": codes.SCT.Cyst,  # 367643001
    "hemorrhage": codes.SCT.Hemorrhage,  # 50960005
    "haemorrhage": codes.SCT.Hemorrhage,
    "hematoma": codes.SCT.Hematoma,  # 35566002
    "edema": codes.SCT.Edema,  # 79654002
    "pneumothorax": codes.SCT.Pneumothorax,  # 36118008
    "pleural_effusion": codes.SCT.PleuralEffusion,  # 60046008
    "effusion": codes.SCT.PleuralEffusion,
    "cardiomegaly": codes.SCT.Cardiomegaly,  # 287272002
    "lymphadenopathy": codes.SCT.Lymphadenopathy,  # 30746006
    "aneurysm": codes.SCT.Aneurysm,  # 85659009
    "pulmonary_embolism": codes.SCT.PulmonaryEmbolism,  # 59282003
}

# Finding site (SCT 363698007) by (modality, label); "*" matches any modality. No entry: no site item (better
# none than a wrong one, e.g. a CT "mass" may be anywhere). MR lesion labels are taken as brain lesions, the MR
# models radserve is built for; add rows when a model covers another body part.
FINDING_SITE_BY_MODALITY_LABEL: dict[tuple[str, str], Code] = {
    ("CT", "nodule"): codes.SCT.Lung,  # 39607008
    ("CR", "nodule"): codes.SCT.Lung,  # chest radiograph
    ("DX", "nodule"): codes.SCT.Lung,
    ("*", "lung_nodule"): codes.SCT.Lung,
    ("*", "pulmonary_embolism"): codes.SCT.Lung,
    ("*", "pneumothorax"): codes.SCT.Pleura,  # 3120008
    ("*", "pleural_effusion"): codes.SCT.Pleura,
    ("*", "effusion"): codes.SCT.Pleura,
    ("*", "cardiomegaly"): codes.SCT.Heart,  # 80891009
    ("MR", "lesion"): codes.SCT.Brain,  # 12738006
    ("MR", "tumor"): codes.SCT.Brain,
    ("MR", "tumour"): codes.SCT.Brain,
    ("MR", "metastasis"): codes.SCT.Brain,
    ("MR", "hemorrhage"): codes.SCT.Brain,
    ("MR", "haemorrhage"): codes.SCT.Brain,
    ("MR", "edema"): codes.SCT.Brain,
}

# Procedure reported (TID 1500 row 4) by modality.
PROCEDURE_BY_MODALITY: dict[str, Code] = {
    "CT": codes.SCT.ComputedTomography,  # 77477000
    "MR": Code("113091000", "SCT", "Magnetic resonance imaging"),
    "CR": codes.SCT.PlainRadiography,  # 168537006
    "DX": codes.SCT.PlainRadiography,
}
DEFAULT_PROCEDURE = codes.SCT.ImagingProcedure  # 363679005

DIAMETER = codes.SCT.Diameter  # 81827009
VOLUME = codes.SCT.Volume  # 118565006
LONGEST = codes.SCT.Maximum  # 56851009, derivation of the diameter
CERTAINTY_OF_FINDING = codes.DCM.CertaintyOfFinding  # 111012, the model's score x 100
NO_FINDING = codes.SCT.None_  # 260413007
UNIT_MM = Code("mm", "UCUM", "millimeter")
UNIT_ML = Code("ml", "UCUM", "milliliter")
UNIT_PERCENT = Code("%", "UCUM", "percent")

_MAX_LO = 64  # DICOM LO length


@dataclass(frozen=True)
class _Context:
    """What a report needs besides the findings: evidence, frame of reference and the region form."""

    evidence: list[Dataset]
    frame_of_reference_uid: str | None
    synthesised: bool  # NIfTI / raw: no patient, study or image references


def finding_type_code(label: str) -> Code:
    """The coded finding type of a model label: the table entry, else a 99RADSERVE local code."""
    known = FINDING_TYPE_BY_LABEL.get(label.lower())
    if known is not None:
        return known
    return local_label_code(label)


def local_label_code(label: str) -> Code:
    """The 99RADSERVE code of a label that no standard code in the tables covers."""
    value = re.sub(r"[^A-Z0-9]", "_", label.upper())[:_MAX_LO] or "UNLABELLED"  # > 16 chars: LongCodeValue
    return Code(value, LOCAL_SCHEME, (label or "unlabelled")[:_MAX_LO])


def finding_site_code(modality: str, label: str) -> Code | None:
    key = label.lower()
    return FINDING_SITE_BY_MODALITY_LABEL.get((modality.upper(), key)) or FINDING_SITE_BY_MODALITY_LABEL.get(("*", key))


def local_coding_scheme() -> CodingSchemeIdentificationItem:
    return CodingSchemeIdentificationItem(
        designator=LOCAL_SCHEME,
        name="radserve local codes for model labels without a standard code",
        responsible_organization="radserve",
    )


def build_measurement_report(
    volume: Volume,
    findings: Sequence[Finding],
    *,
    model_name: str,
    model_version: str,
    weights_sha256: str = "",
    series_number: int = 900,
    instance_number: int = 1,
    manufacturer: str = "radserve",
) -> Dataset:
    """A Comprehensive 3D SR (TID 1500) holding ``findings`` of ``volume``; see the module docstring.

    Its Series and SOP Instance UIDs and the findings' tracking UIDs derive from the source, the model
    (``model_name``, ``model_version``, ``weights_sha256``) and the kind "SR" (``inference.outputs.uids``).

    Raises UnsupportedError for projection X-ray without DICOM source, ValueError for a finding whose
    coordinates do not fit the volume (wrong number of values, non-finite numbers).
    """
    modality = volume.modality.upper()
    projection = volume.shape[2] == 1 and modality in PROJECTION_MODALITIES
    if projection and volume.source is None:
        raise UnsupportedError(
            f"a DICOM SR for projection X-ray ({modality}) needs the DICOM source image; "
            "this volume was not read from DICOM"
        )
    context = _context(volume)
    uids = DerivedUids.for_volume(
        volume, model_name=model_name, model_version=model_version, weights_sha256=weights_sha256
    )
    algorithm = hd.sr.AlgorithmIdentification(name=model_name, version=model_version)

    groups: list[
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    uses_local_codes = False
    for number, finding in enumerate(findings, start=1):
        finding_type = finding_type_code(finding.label)
        uses_local_codes |= finding_type.scheme_designator == LOCAL_SCHEME
        groups.append(
            _finding_group(volume, finding, number, finding_type, algorithm, context, projection, uids.tracking(number))
        )
    if not groups:
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=uids.no_findings_tracking(), identifier="no findings"),
                finding_type=NO_FINDING,
                algorithm_id=algorithm,
            )
        )

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(model_name, model_version, weights_sha256),
        name=model_name[:_MAX_LO],
        manufacturer_name=manufacturer[:_MAX_LO],
        model_name=f"{model_name}:{model_version}"[:_MAX_LO],
    )
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=PROCEDURE_BY_MODALITY.get(modality, DEFAULT_PROCEDURE),
        imaging_measurements=groups,
    )

    extra: dict[str, object] = {}
    if uses_local_codes:
        extra["coding_schemes"] = [local_coding_scheme()]
    sr = hd.sr.Comprehensive3DSR(
        evidence=context.evidence,
        content=report[0],
        series_instance_uid=uids.series(SR),
        series_number=series_number,
        sop_instance_uid=uids.instance(SR),
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=model_name[:_MAX_LO],
        software_versions=model_version[:_MAX_LO],
        series_description=f"AI findings {model_name} {model_version}"[:_MAX_LO],
        is_complete=True,  # every finding of the read is in the report
        is_final=False,  # AI output for a radiologist to review
        is_verified=False,
        **extra,
    )
    if context.synthesised:
        # The only evidence was a placeholder carrying the synthesised study: it names no real instance.
        for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
            if keyword in sr:
                delattr(sr, keyword)
    logger.debug(
        "built SR with %d finding group(s) for a %s volume (%s)",
        len(findings),
        modality,
        "synthesised study" if context.synthesised else "source study",
    )
    return sr


def _finding_group(
    volume: Volume,
    finding: Finding,
    number: int,
    finding_type: Code,
    algorithm: hd.sr.AlgorithmIdentification,
    context: _Context,
    projection: bool,
    tracking_uid: str,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    image = _source_image(volume, finding, projection)
    source_refs = None
    frames = None
    if image is not None:
        frames = [image.frame_number] if image.frame_number is not None else None
        source_refs = [hd.sr.SourceImageForMeasurement(image.sop_class_uid, image.sop_instance_uid, frames)]

    if projection or context.frame_of_reference_uid is None:
        if image is None:  # unreachable: DICOM sources always have images
            raise ValueError(f"finding {number}: no source image to place a 2-D region on")
        column, row = _pixel_position(volume, finding, number, projection)
        region: hd.sr.ImageRegion | hd.sr.ImageRegion3D = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POINT,
            graphic_data=np.array([[column + 0.5, row + 0.5]]),
            source_image=hd.sr.SourceImageForRegion(image.sop_class_uid, image.sop_instance_uid, frames),
        )
    else:
        center = _finite(finding.center_mm, 3, f"finding {number} center_mm")
        region = hd.sr.ImageRegion3D(
            graphic_type=hd.sr.GraphicTypeValues3D.POINT,
            graphic_data=center.reshape(1, 3),
            frame_of_reference_uid=context.frame_of_reference_uid,
        )

    measurements = [
        hd.sr.Measurement(
            name=DIAMETER,
            value=_non_negative(finding.diameter_mm, f"finding {number} diameter_mm"),
            unit=UNIT_MM,
            derivation=LONGEST,
            referenced_images=source_refs,
        )
    ]
    if finding.volume_ml is not None:
        measurements.append(
            hd.sr.Measurement(
                name=VOLUME,
                value=_non_negative(finding.volume_ml, f"finding {number} volume_ml"),
                unit=UNIT_ML,
                referenced_images=source_refs,
            )
        )
    score = float(finding.score)
    if not 0.0 <= score <= 1.0:
        raise ValueError(f"finding {number} score must be in [0, 1]")
    measurements.append(
        hd.sr.Measurement(
            name=CERTAINTY_OF_FINDING,
            value=round(score * 100.0, 6),
            unit=UNIT_PERCENT,
            referenced_images=source_refs,
        )
    )

    site = finding_site_code(volume.modality, finding.label)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=f"finding {number}"),
        referenced_region=region,
        finding_type=finding_type,
        finding_sites=[hd.sr.FindingSite(site)] if site is not None else None,
        algorithm_id=algorithm,
        measurements=measurements,
    )


def _context(volume: Volume) -> _Context:
    source = volume.source
    if source is None:
        placeholder = Dataset()
        placeholder.StudyInstanceUID = generate_uid()
        placeholder.SeriesInstanceUID = generate_uid()
        placeholder.SOPInstanceUID = generate_uid()
        placeholder.SOPClassUID = Comprehensive3DSRStorage  # never written: the evidence sequences are removed
        for keyword in _PATIENT_STUDY_TYPE2:
            setattr(placeholder, keyword, "")
        now = datetime.datetime.now()
        placeholder.StudyDate, placeholder.StudyTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        return _Context([placeholder], generate_uid(), synthesised=True)

    if not source.images:
        raise ValueError("the volume's DICOM source lists no images")
    header = source.header if isinstance(source.header, Dataset) else Dataset()
    evidence = []
    for image in _unique_instances(source.images):
        item = Dataset()
        item.StudyInstanceUID = source.study_instance_uid
        item.SeriesInstanceUID = source.series_instance_uid
        item.SOPClassUID = image.sop_class_uid
        item.SOPInstanceUID = image.sop_instance_uid
        evidence.append(item)
    # The first evidence item also carries the patient and study attributes the SR copies.
    first = copy.deepcopy(header)
    for keyword in _PATIENT_STUDY_TYPE2:
        if keyword not in first:
            setattr(first, keyword, "")
    _blank_invalid_dates(first)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID"):
        setattr(first, keyword, getattr(evidence[0], keyword))
    evidence[0] = first
    return _Context(evidence, source.frame_of_reference_uid or None, synthesised=False)


def _blank_invalid_dates(ds: Dataset) -> None:
    """Archives send malformed DA/TM values; the SR copies them as empty (Type 2) rather than failing the read."""
    for keyword, parse in (("PatientBirthDate", DA), ("StudyDate", DA), ("StudyTime", TM)):
        value = ds.get(keyword)
        if not value:
            continue
        try:
            if parse(str(value)) is None:
                raise ValueError("empty")
        except (TypeError, ValueError):
            setattr(ds, keyword, "")


_PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def _unique_instances(images: Sequence[SourceImage]) -> list[SourceImage]:
    """One entry per SOP instance (multi-frame sources list one image per frame), in slice order."""
    seen: dict[str, SourceImage] = {}
    for image in sorted(images, key=lambda im: im.slice_index):
        seen.setdefault(image.sop_instance_uid, image)
    return list(seen.values())


def _source_image(volume: Volume, finding: Finding, projection: bool) -> SourceImage | None:
    """The source image a finding's region and measurements refer to; None without DICOM input."""
    if volume.source is None or not volume.source.images:
        return None
    images = volume.source.images
    if finding.sop_instance_uid:
        for image in images:
            if image.sop_instance_uid == finding.sop_instance_uid:
                if projection or image.frame_number is None:
                    return image
                break  # a multi-frame source: pick the frame from the position below
    if projection:
        return images[0]
    if len(finding.center_mm) == 3 and np.all(np.isfinite(finding.center_mm)):
        nearest = volume.nearest_source_image(np.asarray(finding.center_mm, dtype=np.float64))
        if nearest is not None:
            return nearest
    if finding.center_voxel is not None and len(finding.center_voxel) >= 3:
        k = int(np.clip(round(float(finding.center_voxel[2])), 0, volume.shape[2] - 1))
        by_slice = {image.slice_index: image for image in images}
        if k in by_slice:
            return by_slice[k]
    return min(images, key=lambda im: im.slice_index)


def _pixel_position(volume: Volume, finding: Finding, number: int, projection: bool) -> tuple[float, float]:
    """(column, row) pixel indices of the finding's center, 0 at the center of the top-left pixel."""
    if finding.center_voxel is not None and len(finding.center_voxel) >= 2:
        column, row = _finite(finding.center_voxel[:2], 2, f"finding {number} center_voxel")
    elif projection:
        # DESIGN contract: x = column index x column spacing, y = row index x row spacing.
        x, y = _finite(finding.center_mm[:2], 2, f"finding {number} center_mm")
        column_spacing, row_spacing = volume.spacing_mm[0], volume.spacing_mm[1]
        column, row = x / column_spacing, y / row_spacing
    else:
        center = _finite(finding.center_mm, 3, f"finding {number} center_mm")
        column, row = volume.lps_to_voxel(center)[0, :2]
    return float(column), float(row)


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
