"""Model preprocessing with MONAI transforms, on the model's device.

MONAI's spatial transforms work in RAS world coordinates (its MetaTensor convention), so a Volume's
LPS affine is flipped to RAS on the way in and the output affine flipped back on the way out. Those are
the only two places where RAS appears; everything radserve reports is LPS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import NormalizeIntensity, Orientation, ScaleIntensityRange, Spacing

from inference.io.volume import LPS_TO_RAS, Volume
from inference.modelrepo.schema import PreprocessConfig


@dataclass(frozen=True)
class Preprocessed:
    """The network-ready image and the geometry that maps it back to the patient."""

    image: torch.Tensor  # (1, X', Y', Z') float32 on the model's device
    affine: np.ndarray  # (4, 4): voxel index of `image` -> LPS mm


def preprocess(volume: Volume, cfg: PreprocessConfig, device: torch.device | str = "cpu") -> Preprocessed:
    """Reorient to RAS axes, resample to ``cfg.spacing_mm`` and normalise intensities."""
    voxels = torch.as_tensor(np.ascontiguousarray(volume.voxels), dtype=torch.float32).to(device)
    image = MetaTensor(voxels[None], affine=torch.as_tensor(LPS_TO_RAS @ volume.affine, dtype=torch.float64))
    image = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(image)
    image = Spacing(pixdim=cfg.spacing_mm, mode="bilinear", padding_mode="border")(image)
    if cfg.normalize == "zscore":
        image = NormalizeIntensity(nonzero=True)(image)
    else:
        image = ScaleIntensityRange(cfg.a_min, cfg.a_max, cfg.b_min, cfg.b_max, clip=cfg.clip)(image)
    affine_lps = LPS_TO_RAS @ np.asarray(image.affine.cpu(), dtype=np.float64)
    return Preprocessed(image=image.as_tensor().float().contiguous(), affine=affine_lps)
