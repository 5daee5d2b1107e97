"""Model preprocessing with MONAI transforms, on the model's device.

MONAI's spatial transforms work in RAS world coordinates (its MetaTensor convention), so a Volume's
LPS affine is flipped to RAS on the way in and the output affine flipped back on the way out. Those are
the only two places where RAS appears; everything radserve reports is LPS.

Orientation and Spacing are applied lazily (MONAI's lazy resampling) and fused into one resampling from the
input, computed in float32: no reoriented copy of the whole input and no float64 copy of it (MONAI's default
``dtype``), which took 2x and 4x the input's float32 bytes of memory and most of the time on a 512x512x300 CT
(docs/decisions.md, "Preprocessing memory"). On CUDA the voxels go through pinned memory and the work runs on the
calling thread's own stream (:func:`inference.backends.torch.device_work`), overlapping the forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import NormalizeIntensity, Orientation, ScaleIntensityRange, Spacing
from monai.transforms.lazy.functional import apply_pending

from inference.backends.torch import device_work
from inference.io.volume import LPS_TO_RAS, Volume
from inference.modelrepo.schema import PreprocessConfig

_RESAMPLE = {"mode": "bilinear", "padding_mode": "border", "dtype": torch.float32}


@dataclass(frozen=True)
class Preprocessed:
    """The network-ready image and the geometry that maps it back to the patient."""

    image: torch.Tensor  # (1, X', Y', Z') float32 on the model's device
    affine: np.ndarray  # (4, 4): voxel index of `image` -> LPS mm


def preprocess(volume: Volume, cfg: PreprocessConfig, device: torch.device | str = "cpu") -> Preprocessed:
    """Reorient to RAS axes, resample to ``cfg.spacing_mm`` (one fused resampling) and normalise intensities."""
    with device_work(device) as work:
        voxels = work.to_device(volume.voxels)
        image = MetaTensor(voxels[None], affine=torch.as_tensor(LPS_TO_RAS @ volume.affine, dtype=torch.float64))
        image = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")), lazy=True)(image)
        image = Spacing(pixdim=cfg.spacing_mm, lazy=True, **_RESAMPLE)(image)
        image = apply_pending(image, overrides=_RESAMPLE)[0]
        if image.untyped_storage().data_ptr() == voxels.untyped_storage().data_ptr():
            image = image.clone()  # an identity resampling returns the caller's voxels: never normalise them in place
        del voxels
        if cfg.normalize == "zscore":
            image = NormalizeIntensity(nonzero=True)(image)
        elif cfg.normalize == "zscore_foreground":
            image = zscore_foreground(image, cfg.foreground_fraction, cfg.percentile_high)
        else:
            image = ScaleIntensityRange(cfg.a_min, cfg.a_max, cfg.b_min, cfg.b_max, clip=cfg.clip)(image)
        affine_lps = LPS_TO_RAS @ np.asarray(image.affine.cpu(), dtype=np.float64)
        out = image.as_tensor().float().contiguous()
        work.hand_off(out)
    return Preprocessed(image=out, affine=affine_lps)


def zscore_foreground(image: torch.Tensor, fraction: float, percentile: float) -> torch.Tensor:
    """``(image - mean) / std`` over the voxels brighter than ``fraction`` x the image's ``percentile``-th value.

    On MR the air around the head is Rician noise, never exactly zero, so ``NormalizeIntensity(nonzero=True)``
    averages over the background too and the scale of the result follows the field of view. A threshold
    relative to a high percentile keeps the body (scalp, brain, CSF) and drops the air on any intensity scale.
    """
    flat = image.reshape(-1).float()
    k = min(flat.numel(), max(1, round(percentile / 100.0 * flat.numel())))
    threshold = fraction * float(flat.kthvalue(k).values)
    foreground = flat[flat > threshold]
    if foreground.numel() < 2:  # a blank image: only centre it
        return image - flat.mean()
    mean, std = foreground.mean(), foreground.std()
    return (image - mean) / std.clamp_min(1e-8)
