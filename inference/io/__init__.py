"""Input readers: DICOM series, NIfTI files and raw arrays become one :class:`Volume` type."""

from inference.io.base import VolumeReader
from inference.io.dicom import DicomSeriesReader, hash_uid, read_dicom_series
from inference.io.limits import DEFAULT_LIMITS, InputLimits
from inference.io.nifti import NiftiReader, read_nifti
from inference.io.raw import RAW_DTYPES, RawReader, read_raw
from inference.io.volume import SourceImage, SourceRefs, Volume

__all__ = [
    "DEFAULT_LIMITS",
    "RAW_DTYPES",
    "DicomSeriesReader",
    "InputLimits",
    "NiftiReader",
    "RawReader",
    "SourceImage",
    "SourceRefs",
    "Volume",
    "VolumeReader",
    "hash_uid",
    "read_dicom_series",
    "read_nifti",
    "read_raw",
]
