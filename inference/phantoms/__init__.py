"""Synthetic studies with planted ground truth, and writers that put them on disk as DICOM or NIfTI."""

from inference.phantoms.base import Phantom, PlantedLesion
from inference.phantoms.chest_ct import ChestCTParams, make_chest_ct, render_chest_ct, sample_chest_ct_params
from inference.phantoms.writers import write_dicom_multiframe, write_dicom_series, write_nifti

__all__ = [
    "ChestCTParams",
    "Phantom",
    "PlantedLesion",
    "make_chest_ct",
    "render_chest_ct",
    "sample_chest_ct_params",
    "write_dicom_multiframe",
    "write_dicom_series",
    "write_nifti",
]
