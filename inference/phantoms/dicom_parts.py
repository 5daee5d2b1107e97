"""The DICOM building blocks every phantom writer shares: the patient and study header, the image pixel module,
pixel storage in a transfer syntax, file meta information, windows and decimal strings. Fixed dates keep phantom files
reproducible."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_encoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

logger = logging.getLogger(__name__)

UNCOMPRESSED_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
LOSSLESS_COMPRESSED_SYNTAXES = (RLELossless, JPEG2000Lossless, JPEGLSLossless)
# Fixed dates keep phantom files reproducible.
STUDY_DATE, STUDY_TIME = "20250101", "120000"
INT16_MIN, INT16_MAX = -32768, 32767
# The phantoms are a chest CT and a brain MR. Naming the (unpaired) body part is what makes Laterality (0020,0060),
# Type 2C "if a paired structure", rightly absent: without it dciodvfy reports Laterality missing.
BODY_PART_BY_MODALITY = {"CT": "CHEST", "MR": "HEAD"}


def study_header(
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
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = STUDY_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = STUDY_TIME
    ds.StudyID = "1"
    ds.AccessionNumber = accession_number
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    return ds


def set_image_pixel_module(
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


def set_pixels(ds: Dataset, pixels: np.ndarray, transfer_syntax: UID) -> None:
    """Store 16-bit ``pixels`` (rows x columns, or frames x rows x columns) in ``transfer_syntax``, little-endian."""
    if transfer_syntax.is_compressed:
        # Keep the SOPInstanceUID we chose: lossless compression does not make a new instance.
        ds.compress(transfer_syntax, pixels, generate_instance_uid=False)
    else:
        ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes()


def check_transfer_syntax(transfer_syntax: str) -> UID:
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


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = transfer_syntax
    return meta


def to_int16(values: np.ndarray, intercept: float) -> np.ndarray:
    stored = np.rint(np.asarray(values, dtype=np.float64) - intercept)
    clipped = int(np.count_nonzero((stored < INT16_MIN) | (stored > INT16_MAX)))
    if clipped:
        logger.warning("%d voxels outside the int16 range after rescale were clipped", clipped)
    return np.clip(stored, INT16_MIN, INT16_MAX).astype(np.int16)


def window_for(values: np.ndarray, modality: str) -> tuple[str, str]:
    """WindowCenter/WindowWidth as DS: the lung window for CT, the 1-99th percentile span otherwise."""
    if modality == "CT":
        return "-600", "1500"
    return percentile_window(values)


def percentile_window(values: np.ndarray) -> tuple[str, str]:
    """WindowCenter/WindowWidth as DS spanning the 1st to 99th percentile of ``values`` (at least 1 wide)."""
    low, high = np.percentile(values, [1, 99])
    return decimal_string((low + high) / 2), decimal_string(max(high - low, 1.0))


def orientation_strings(affine: np.ndarray) -> list[str]:
    return [decimal_string(v) for v in (*unit_vector(affine[:3, 0]), *unit_vector(affine[:3, 1]))]


def dataset_item(**attributes: object) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def unit_vector(v: Sequence[float] | np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def decimal_string(value: float) -> str:
    """A decimal string of at most 16 characters, as DICOM DS requires."""
    return format_number_as_ds(float(value) + 0.0)
