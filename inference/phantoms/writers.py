"""Write volumes (or phantoms) as DICOM series, an Enhanced CT multi-frame file, or NIfTI.

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
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_encoder
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from inference.io.volume import LPS_TO_RAS, Volume
from inference.phantoms.base import Phantom

logger = logging.getLogger(__name__)

UNCOMPRESSED_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
LOSSLESS_COMPRESSED_SYNTAXES = (RLELossless, JPEG2000Lossless, JPEGLSLossless)

CT_RESCALE_INTERCEPT = -1024.0
_SOP_CLASS_BY_MODALITY = {"CT": CTImageStorage, "MR": MRImageStorage}
# The phantoms are a chest CT and a brain MR. Naming the (unpaired) body part is what makes Laterality (0020,0060),
# Type 2C "if a paired structure", rightly absent: without it dciodvfy reports Laterality missing.
_BODY_PART_BY_MODALITY = {"CT": "CHEST", "MR": "HEAD"}
_INT16_MIN, _INT16_MAX = -32768, 32767

# Fixed dates keep phantom files reproducible.
_STUDY_DATE, _STUDY_TIME = "20250101", "120000"


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
    transfer_syntax = _check_transfer_syntax(transfer_syntax)
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
    stored = _to_int16(volume.voxels, intercept)
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
    header.RescaleIntercept = _ds(intercept)
    header.RescaleSlope = "1"
    if modality == "CT":
        header.RescaleType = "HU"
    header.WindowCenter, header.WindowWidth = _window(volume.voxels, modality)

    affine = volume.affine
    normal = _unit(np.cross(affine[:3, 0], affine[:3, 1]))
    normal = -normal if normal[2] < 0 else normal  # SliceLocation grows towards head, like z
    paths = []
    for k in range(n_slices):
        ds = copy.deepcopy(header)
        ds.SOPInstanceUID = generate_uid() if sop_instance_uids is None else sop_instance_uids[k]
        ds.file_meta = _file_meta(ds.SOPClassUID, ds.SOPInstanceUID, transfer_syntax)
        ds.InstanceNumber = int(instance_order[k]) + 1
        position = affine[:3, :3] @ np.array([0.0, 0.0, float(k)]) + affine[:3, 3]
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.SliceLocation = _ds(float(position @ normal))
        _set_pixels(ds, np.ascontiguousarray(stored[:, :, k].T), transfer_syntax)
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
    transfer_syntax = _check_transfer_syntax(transfer_syntax)
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
    ds.file_meta = _file_meta(ds.SOPClassUID, ds.SOPInstanceUID, transfer_syntax)
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.ContentQualification = "RESEARCH"
    ds.AcquisitionDateTime = _STUDY_DATE + _STUDY_TIME
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
    ds.DimensionOrganizationSequence = DicomSequence([_item(DimensionOrganizationUID=dimension_uid)])
    ds.DimensionIndexSequence = DicomSequence(
        [
            _item(
                DimensionOrganizationUID=dimension_uid,
                DimensionIndexPointer=0x00209056,  # StackID
                FunctionalGroupPointer=0x00209111,  # FrameContentSequence
            ),
            _item(
                DimensionOrganizationUID=dimension_uid,
                DimensionIndexPointer=0x00209057,  # InStackPositionNumber
                FunctionalGroupPointer=0x00209111,
            ),
        ]
    )

    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence(
        [
            _item(
                PixelSpacing=[_ds(spacing[1]), _ds(spacing[0])],
                SliceThickness=_ds(spacing[2]),
                SpacingBetweenSlices=_ds(spacing[2]),
            )
        ]
    )
    shared.PlaneOrientationSequence = DicomSequence([_item(ImageOrientationPatient=_orientation(affine))])
    shared.PixelValueTransformationSequence = DicomSequence(
        [_item(RescaleIntercept=_ds(CT_RESCALE_INTERCEPT), RescaleSlope="1", RescaleType="HU")]
    )
    center, width = _window(volume.voxels, "CT")
    shared.FrameVOILUTSequence = DicomSequence([_item(WindowCenter=center, WindowWidth=width)])
    shared.CTImageFrameTypeSequence = DicomSequence([_item(FrameType=["ORIGINAL", "PRIMARY", "AXIAL", "NONE"])])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    frames = []
    for k in range(n_frames):
        position = affine[:3, :3] @ np.array([0.0, 0.0, float(k)]) + affine[:3, 3]
        frame = Dataset()
        frame.FrameContentSequence = DicomSequence(
            [_item(StackID=stack_id, InStackPositionNumber=k + 1, DimensionIndexValues=[1, k + 1])]
        )
        frame.PlanePositionSequence = DicomSequence([_item(ImagePositionPatient=[_ds(v) for v in position])])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)

    stored = _to_int16(volume.voxels, CT_RESCALE_INTERCEPT)
    _set_pixels(ds, np.ascontiguousarray(stored.transpose(2, 1, 0)), transfer_syntax)  # (frames, rows, columns)
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


def _study_header(
    *,
    sop_class_uid: str,
    modality: str,
    series_number: int,
    series_description: str,
    patient_name: str,
    patient_id: str,
    accession_number: str,
    study_instance_uid: str | None,
    series_instance_uid: str | None,
) -> Dataset:
    """Patient, study, series and equipment attributes of every phantom file; a UID left None is generated.

    Dates and times are fixed, so that a phantom written twice with the same UIDs gives the same bytes.
    """
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.StudyInstanceUID = study_instance_uid or generate_uid()
    ds.SeriesInstanceUID = series_instance_uid or generate_uid()
    ds.Modality = modality
    ds.Manufacturer = "radserve"
    ds.ManufacturerModelName = "synthetic phantom"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = _STUDY_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = _STUDY_TIME
    ds.StudyID = "1"
    ds.AccessionNumber = accession_number
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    return ds


def _set_image_pixel_module(
    ds: Dataset, *, rows: int, columns: int, photometric: str, bits_stored: int, signed: bool
) -> None:
    """One sample per pixel, 16 bits allocated, ``bits_stored`` of them used."""
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0


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
    ds = _study_header(
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
    ds.BodyPartExamined = _BODY_PART_BY_MODALITY[modality]
    if modality == "CT":
        ds.KVP = "120"
    else:
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "3D"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]

    if not per_frame_geometry:
        spacing = np.linalg.norm(volume.affine[:3, :3], axis=0)
        ds.ImageOrientationPatient = _orientation(volume.affine)
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # [row spacing, column spacing]
        ds.SliceThickness = _ds(spacing[2])
        ds.SpacingBetweenSlices = _ds(spacing[2])

    columns, rows, _ = volume.shape
    _set_image_pixel_module(ds, rows=rows, columns=columns, photometric="MONOCHROME2", bits_stored=16, signed=True)
    return ds


def _set_pixels(ds: Dataset, pixels: np.ndarray, transfer_syntax: UID) -> None:
    """Store 16-bit ``pixels`` (rows x columns, or frames x rows x columns) in ``transfer_syntax``, little-endian."""
    if transfer_syntax.is_compressed:
        # Keep the SOPInstanceUID we chose: lossless compression does not make a new instance.
        ds.compress(transfer_syntax, pixels, generate_instance_uid=False)
    else:
        ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes()


def _check_transfer_syntax(transfer_syntax: str) -> UID:
    ts = UID(transfer_syntax)
    if ts in UNCOMPRESSED_SYNTAXES:
        return ts
    if ts not in LOSSLESS_COMPRESSED_SYNTAXES:
        supported = ", ".join(s.name for s in (*UNCOMPRESSED_SYNTAXES, *LOSSLESS_COMPRESSED_SYNTAXES))
        raise ValueError(f"cannot write transfer syntax {ts} ({ts.name}); supported: {supported}")
    encoder = get_encoder(ts)
    if not encoder.is_available:
        missing = "; ".join(f"{name}: {', '.join(deps)}" for name, deps in encoder.missing_dependencies.items())
        raise RuntimeError(f"no encoder installed for {ts.name}; install one of: {missing}")
    return ts


def _file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = transfer_syntax
    return meta


def _to_int16(values: np.ndarray, intercept: float) -> np.ndarray:
    stored = np.rint(np.asarray(values, dtype=np.float64) - intercept)
    clipped = int(np.count_nonzero((stored < _INT16_MIN) | (stored > _INT16_MAX)))
    if clipped:
        logger.warning("%d voxels outside the int16 range after rescale were clipped", clipped)
    return np.clip(stored, _INT16_MIN, _INT16_MAX).astype(np.int16)


def _window(values: np.ndarray, modality: str) -> tuple[str, str]:
    """WindowCenter/WindowWidth as DS: the lung window for CT, the 1-99th percentile span otherwise."""
    if modality == "CT":
        return "-600", "1500"
    return _percentile_window(values)


def _percentile_window(values: np.ndarray) -> tuple[str, str]:
    """WindowCenter/WindowWidth as DS spanning the 1st to 99th percentile of ``values`` (at least 1 wide)."""
    low, high = np.percentile(values, [1, 99])
    return _ds((low + high) / 2), _ds(max(high - low, 1.0))


def _orientation(affine: np.ndarray) -> list[str]:
    return [_ds(v) for v in (*_unit(affine[:3, 0]), *_unit(affine[:3, 1]))]


def _as_volume(phantom_or_volume: Phantom | Volume) -> Volume:
    return phantom_or_volume.volume if isinstance(phantom_or_volume, Phantom) else phantom_or_volume


def _item(**attributes: object) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _unit(v: Sequence[float] | np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters, as DICOM DS requires."""
    return format_number_as_ds(float(value) + 0.0)
