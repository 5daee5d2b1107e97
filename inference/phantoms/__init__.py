"""Synthetic studies with planted ground truth, and writers that put them on disk as DICOM or NIfTI."""

from inference.phantoms.base import Phantom, PlantedLesion
from inference.phantoms.brain_mr import (
    BrainMRParams,
    lesion_mask,
    make_brain_mr,
    render_brain_mr,
    sample_brain_mr_params,
)
from inference.phantoms.chest_ct import ChestCTParams, make_chest_ct, render_chest_ct, sample_chest_ct_params
from inference.phantoms.chest_xray import (
    ChestXrayParams,
    ChestXrayPhantom,
    make_chest_xray,
    render_chest_xray,
    sample_chest_xray_params,
)
from inference.phantoms.writers import write_dicom_multiframe, write_dicom_series, write_nifti, write_xray_dicom

__all__ = [
    "BrainMRParams",
    "ChestCTParams",
    "ChestXrayParams",
    "ChestXrayPhantom",
    "Phantom",
    "PlantedLesion",
    "lesion_mask",
    "make_brain_mr",
    "make_chest_ct",
    "make_chest_xray",
    "render_brain_mr",
    "render_chest_ct",
    "render_chest_xray",
    "sample_brain_mr_params",
    "sample_chest_ct_params",
    "sample_chest_xray_params",
    "write_dicom_multiframe",
    "write_dicom_series",
    "write_nifti",
    "write_xray_dicom",
]
