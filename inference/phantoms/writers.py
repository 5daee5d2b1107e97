"""Write volumes (or phantoms) as DICOM series, an Enhanced CT multi-frame file, a projection X-ray (CR, DX), or NIfTI.

The DICOM geometry comes straight from ``Volume.affine`` (see inference/io/volume.py): slice k has
ImagePositionPatient = affine @ (0, 0, k, 1), ImageOrientationPatient = the normalised affine columns 0
and 1, and pixel array = voxels[:, :, k].T (rows x columns).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from inference.io.volume import LPS_TO_RAS, Volume
from inference.phantoms.base import Phantom
from inference.phantoms.chest_xray import PHOTOMETRICS, SPACING_TAGS, XRAY_MODALITIES
from inference.phantoms.dicom_parts import (
    BODY_PART_BY_MODALITY,
    STUDY_DATE,
    STUDY_TIME,
    check_transfer_syntax,
    dataset_item,
    decimal_string,
    file_meta,
    orientation_strings,
    percentile_window,
    set_image_pixel_module,
    set_pixels,
    study_header,
    to_int16,
    unit_vector,
    window_for,
)

logger = logging.getLogger(__name__)


CT_RESCALE_INTERCEPT = -1024.0
_SOP_CLASS_BY_MODALITY = {"CT": CTImageStorage, "MR": MRImageStorage}


def write_dicom_series(
    phantom_or_volume: Phantom | Volume,
    out_dir: Path,
    *,
    series_number: int = 1,
    shuffle: bool | np.random.Generator = False,
    patient_name: str = "PHANTOM^CHEST",
    patient_id: str = "PHANTOM-0001",
    accession_number: str = "PHANTOM0001",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    modality: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    file_prefix: str = "slice",
    sop_instance_uids: Sequence[str] | None = None,
) -> list[Path]:
    """Write one single-frame DICOM file per slice into ``out_dir``; return the paths in slice order (k = 0..Z-1).

    ``modality`` defaults to the volume's (CT or MR). CT is stored as signed 16-bit with RescaleIntercept
    -1024, so values round-trip to within 0.5 HU in [-33792, 31743] HU (clipped beyond); MR is stored rounded,
    intercept 0. With ``shuffle`` (True, or a Generator for a reproducible order) file names and
    InstanceNumbers are permuted independently, so readers must sort by geometry. ``transfer_syntax``
    may be uncompressed or one of LOSSLESS_COMPRESSED_SYNTAXES. ``sop_instance_uids`` (one per slice, in slice
    order) replaces the random ones, e.g. for files that are the same on every run.
    """
    volume = _as_volume(phantom_or_volume)
    modality = (modality or volume.modality).upper()
    if modality not in _SOP_CLASS_BY_MODALITY:
        raise ValueError(f"cannot write modality {modality!r} as a DICOM series; supported: CT, MR")
    transfer_syntax = check_transfer_syntax(transfer_syntax)
    n_slices = volume.shape[2]
    if sop_instance_uids is not None and len(sop_instance_uids) != n_slices:
        raise ValueError(f"sop_instance_uids must hold one UID per slice ({n_slices}), got {len(sop_instance_uids)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    name_order = np.arange(n_slices)
    instance_order = np.arange(n_slices)
    if isinstance(shuffle, np.random.Generator) or shuffle:
        order_rng = shuffle if isinstance(shuffle, np.random.Generator) else np.random.default_rng()
        name_order = order_rng.permutation(n_slices)
        instance_order = order_rng.permutation(n_slices)
    digits = max(4, len(str(n_slices)))

    intercept = CT_RESCALE_INTERCEPT if modality == "CT" else 0.0
    stored = to_int16(volume.voxels, intercept)
    header = _series_header(
        volume,
        modality=modality,
        sop_class_uid=_SOP_CLASS_BY_MODALITY[modality],
        series_number=series_number,
        patient_name=patient_name,
        patient_id=patient_id,
        accession_number=accession_number,
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        frame_of_reference_uid=frame_of_reference_uid,
    )
    header.RescaleIntercept = decimal_string(intercept)
    header.RescaleSlope = "1"
    if modality == "CT":
        header.RescaleType = "HU"
    header.WindowCenter, header.WindowWidth = window_for(volume.voxels, modality)

    affine = volume.affine
    normal = unit_vector(np.cross(affine[:3, 0], affine[:3, 1]))
    normal = -normal if normal[2] < 0 else normal  # SliceLocation grows towards head, like z
    paths = []
    for k in range(n_slices):
        ds = copy.deepcopy(header)
        ds.SOPInstanceUID = generate_uid() if sop_instance_uids is None else sop_instance_uids[k]
        ds.file_meta = file_meta(ds.SOPClassUID, ds.SOPInstanceUID, transfer_syntax)
        ds.InstanceNumber = int(instance_order[k]) + 1
        position = affine[:3, :3] @ np.array([0.0, 0.0, float(k)]) + affine[:3, 3]
        ds.ImagePositionPatient = [decimal_string(v) for v in position]
        ds.SliceLocation = decimal_string(float(position @ normal))
        set_pixels(ds, np.ascontiguousarray(stored[:, :, k].T), transfer_syntax)
        path = out_dir / f"{file_prefix}_{int(name_order[k]):0{digits}d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    logger.debug("wrote %d %s slices to %s (%s)", n_slices, modality, out_dir, transfer_syntax.name)
    return paths


def write_dicom_multiframe(
    phantom_or_volume: Phantom | Volume,
    path: Path,
    *,
    series_number: int = 1,
    patient_name: str = "PHANTOM^CHEST",
    patient_id: str = "PHANTOM-0001",
    accession_number: str = "PHANTOM0001",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Path:
    """Write a CT volume as one Enhanced CT Image Storage file; frame k+1 is slice k.

    Per-frame functional groups carry PlanePositionSequence and FrameContentSequence; PlaneOrientation,
    PixelMeasures and PixelValueTransformation (rescale to HU) are shared.
    """
    volume = _as_volume(phantom_or_volume)
    if volume.modality.upper() != "CT":
        raise ValueError(f"write_dicom_multiframe writes Enhanced CT only, got modality {volume.modality!r}")
    transfer_syntax = check_transfer_syntax(transfer_syntax)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    ds = _series_header(
        volume,
        modality="CT",
        sop_class_uid=EnhancedCTImageStorage,
        series_number=series_number,
        patient_name=patient_name,
        patient_id=patient_id,
        accession_number=accession_number,
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        frame_of_reference_uid=frame_of_reference_uid,
        per_frame_geometry=True,
    )
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta = file_meta(ds.SOPClassUID, ds.SOPInstanceUID, transfer_syntax)
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.ContentQualification = "RESEARCH"
    ds.AcquisitionDateTime = STUDY_DATE + STUDY_TIME
    ds.BurnedInAnnotation = "NO"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    n_frames = volume.shape[2]
    ds.NumberOfFrames = n_frames

    affine = volume.affine
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    stack_id = "1"
    dimension_uid = generate_uid()
    ds.DimensionOrganizationType = "3D"
    ds.DimensionOrganizationSequence = DicomSequence([dataset_item(DimensionOrganizationUID=dimension_uid)])
    ds.DimensionIndexSequence = DicomSequence(
        [
            dataset_item(
                DimensionOrganizationUID=dimension_uid,
                DimensionIndexPointer=0x00209056,  # StackID
                FunctionalGroupPointer=0x00209111,  # FrameContentSequence
            ),
            dataset_item(
                DimensionOrganizationUID=dimension_uid,
                DimensionIndexPointer=0x00209057,  # InStackPositionNumber
                FunctionalGroupPointer=0x00209111,
            ),
        ]
    )

    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence(
        [
            dataset_item(
                PixelSpacing=[decimal_string(spacing[1]), decimal_string(spacing[0])],
                SliceThickness=decimal_string(spacing[2]),
                SpacingBetweenSlices=decimal_string(spacing[2]),
            )
        ]
    )
    shared.PlaneOrientationSequence = DicomSequence([dataset_item(ImageOrientationPatient=orientation_strings(affine))])
    shared.PixelValueTransformationSequence = DicomSequence(
        [dataset_item(RescaleIntercept=decimal_string(CT_RESCALE_INTERCEPT), RescaleSlope="1", RescaleType="HU")]
    )
    center, width = window_for(volume.voxels, "CT")
    shared.FrameVOILUTSequence = DicomSequence([dataset_item(WindowCenter=center, WindowWidth=width)])
    shared.CTImageFrameTypeSequence = DicomSequence([dataset_item(FrameType=["ORIGINAL", "PRIMARY", "AXIAL", "NONE"])])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    frames = []
    for k in range(n_frames):
        position = affine[:3, :3] @ np.array([0.0, 0.0, float(k)]) + affine[:3, 3]
        frame = Dataset()
        frame.FrameContentSequence = DicomSequence(
            [dataset_item(StackID=stack_id, InStackPositionNumber=k + 1, DimensionIndexValues=[1, k + 1])]
        )
        frame.PlanePositionSequence = DicomSequence(
            [dataset_item(ImagePositionPatient=[decimal_string(v) for v in position])]
        )
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)

    stored = to_int16(volume.voxels, CT_RESCALE_INTERCEPT)
    set_pixels(ds, np.ascontiguousarray(stored.transpose(2, 1, 0)), transfer_syntax)  # (frames, rows, columns)
    ds.save_as(path, enforce_file_format=True)
    logger.debug("wrote %d-frame Enhanced CT to %s (%s)", n_frames, path, transfer_syntax.name)
    return path


def write_nifti(phantom_or_volume: Phantom | Volume, path: Path) -> Path:
    """Write ``path`` (.nii or .nii.gz) with the voxels as-is and the affine converted from LPS to RAS.

    sform and qform codes are 1 (scanner); units are mm.
    """
    volume = _as_volume(phantom_or_volume)
    path = Path(path)
    if not (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
        raise ValueError(f"NIfTI path must end in .nii or .nii.gz, got {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    affine_ras = LPS_TO_RAS @ volume.affine
    image = nib.Nifti1Image(np.asarray(volume.voxels), affine_ras)
    image.set_sform(affine_ras, code=1)
    image.set_qform(affine_ras, code=1)
    image.header.set_xyzt_units(xyz="mm")
    nib.save(image, path)
    return path


def _series_header(
    volume: Volume,
    *,
    modality: str,
    sop_class_uid: str,
    series_number: int,
    patient_name: str,
    patient_id: str,
    accession_number: str,
    study_instance_uid: str | None,
    series_instance_uid: str | None,
    frame_of_reference_uid: str | None,
    per_frame_geometry: bool = False,
) -> Dataset:
    """Attributes shared by every instance of the series; geometry at the top level unless ``per_frame_geometry``."""
    ds = study_header(
        sop_class_uid=sop_class_uid,
        modality=modality,
        series_number=series_number,
        series_description=f"Synthetic {modality}",
        patient_name=patient_name,
        patient_id=patient_id,
        accession_number=accession_number,
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
    )
    ds.FrameOfReferenceUID = frame_of_reference_uid or generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.AcquisitionNumber = 1
    ds.PatientPosition = "HFS"
    ds.BodyPartExamined = BODY_PART_BY_MODALITY[modality]
    if modality == "CT":
        ds.KVP = "120"
    else:
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "3D"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]

    if not per_frame_geometry:
        spacing = np.linalg.norm(volume.affine[:3, :3], axis=0)
        ds.ImageOrientationPatient = orientation_strings(volume.affine)
        ds.PixelSpacing = [decimal_string(spacing[1]), decimal_string(spacing[0])]  # [row spacing, column spacing]
        ds.SliceThickness = decimal_string(spacing[2])
        ds.SpacingBetweenSlices = decimal_string(spacing[2])

    columns, rows, _ = volume.shape
    set_image_pixel_module(ds, rows=rows, columns=columns, photometric="MONOCHROME2", bits_stored=16, signed=True)
    return ds


def _as_volume(phantom_or_volume: Phantom | Volume) -> Volume:
    return phantom_or_volume.volume if isinstance(phantom_or_volume, Phantom) else phantom_or_volume


def write_xray_dicom(
    phantom_or_volume: Phantom | Volume,
    path: Path,
    *,
    modality: str | None = None,
    photometric: str | None = None,
    bits_stored: int | None = None,
    spacing_tag: str = "ImagerPixelSpacing",
    patient_name: str = "PHANTOM^CHEST",
    patient_id: str = "PHANTOM-0001",
    accession_number: str = "PHANTOM0001",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Path:
    """Write a one-slice projection image as a DX (For Presentation) or CR DICOM file; return ``path``.

    ``modality``, ``photometric`` and ``bits_stored`` default to the phantom's (a plain Volume: its
    modality, MONOCHROME2, 16 bits). The voxels are MONOCHROME2-sense values; MONOCHROME1 stores
    ``2**bits_stored - 1 - value``, with PresentationLUTShape INVERSE on DX. ``spacing_tag`` picks which
    attribute carries the pixel spacing: ImagerPixelSpacing (the detector plane, what DX requires),
    PixelSpacing (as many CR files do; on DX this departs from the IOD, which is useful to test
    readers' fall-backs) or both. Pixels are unsigned 16-bit allocated, rows x columns = voxels[:, :, 0].T.
    """
    volume = phantom_or_volume.volume if isinstance(phantom_or_volume, Phantom) else phantom_or_volume
    if volume.shape[2] != 1:
        raise ValueError(f"a projection image has one slice, got a volume of shape {volume.shape}")
    modality = (modality or volume.modality).upper()
    if modality not in XRAY_MODALITIES:
        raise ValueError(f"modality must be one of {XRAY_MODALITIES}, got {modality!r}")
    photometric = photometric or getattr(phantom_or_volume, "photometric", "MONOCHROME2")
    if photometric not in PHOTOMETRICS:
        raise ValueError(f"photometric must be one of {PHOTOMETRICS}, got {photometric!r}")
    bits_stored = int(bits_stored or getattr(phantom_or_volume, "bits_stored", 16))
    if not 8 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be in [8, 16], got {bits_stored}")
    if spacing_tag not in SPACING_TAGS:
        raise ValueError(f"spacing_tag must be one of {SPACING_TAGS}, got {spacing_tag!r}")
    transfer_syntax = check_transfer_syntax(transfer_syntax)

    max_value = (1 << bits_stored) - 1
    values = np.rint(np.asarray(volume.voxels[:, :, 0], dtype=np.float64).T)
    if values.min() < 0 or values.max() > max_value:
        raise ValueError(f"voxel values [{values.min()}, {values.max()}] do not fit {bits_stored} unsigned bits")
    stored = (max_value - values if photometric == "MONOCHROME1" else values).astype(np.uint16)

    sop_instance_uid = sop_instance_uid or generate_uid()
    ds = study_header(
        sop_class_uid=DigitalXRayImageStorageForPresentation if modality == "DX" else ComputedRadiographyImageStorage,
        modality=modality,
        series_number=1,
        series_description="Synthetic chest PA",
        patient_name=patient_name,
        patient_id=patient_id,
        accession_number=accession_number,
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
    )
    ds.SOPInstanceUID = sop_instance_uid
    ds.file_meta = file_meta(ds.SOPClassUID, ds.SOPInstanceUID, transfer_syntax)
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]  # rows run to the patient's left, columns to the feet
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.KVP = "120"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.AnatomicRegionSequence = DicomSequence([_code("51185008", "SCT", "Chest")])
    ds.ViewCodeSequence = DicomSequence([_code("399348003", "SCT", "postero-anterior")])
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PositionerType = ""
        ds.ImageLaterality = "U"
        ds.AcquisitionContextSequence = DicomSequence([])
        ds.DetectorType = "SCINTILLATOR"
        ds.PixelIntensityRelationship = "LOG"
        # -1: higher stored values mean less X-ray intensity at the detector (more attenuation).
        ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME2" else 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
        ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"

    spacing_col, spacing_row = volume.spacing_mm[:2]
    spacing = [decimal_string(spacing_row), decimal_string(spacing_col)]  # DICOM order: row spacing, column spacing
    if spacing_tag in ("ImagerPixelSpacing", "both"):
        ds.ImagerPixelSpacing = spacing
    if spacing_tag in ("PixelSpacing", "both"):
        ds.PixelSpacing = spacing

    ds.WindowCenter, ds.WindowWidth = percentile_window(stored)
    rows, columns = stored.shape
    set_image_pixel_module(
        ds, rows=rows, columns=columns, photometric=photometric, bits_stored=bits_stored, signed=False
    )
    set_pixels(ds, np.ascontiguousarray(stored), transfer_syntax)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    logger.debug("wrote %s %s %dx%d (%d bits) to %s", modality, photometric, *stored.shape, bits_stored, path)
    return path


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return dataset_item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)
