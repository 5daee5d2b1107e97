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

import math
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


# The input affine is rounded to this many decimals (mm) before MONAI sees it. MONAI's Spacing rounds the output
# extent, and a study whose extent falls on a half voxel of the output (160 slices of 1.25 mm at 1.5 mm: 132.5) got
# 133 or 134 slices depending on 1e-14 mm of floating-point noise in how its affine was computed; rounded, the same
# geometry always gets the same grid, whether from the whole series or from its first slices (progressive reads).
AFFINE_DECIMALS = 9


def ras_affine(affine: np.ndarray) -> torch.Tensor:
    """The LPS voxel -> mm ``affine`` as the RAS float64 tensor MONAI's transforms take, rounded (AFFINE_DECIMALS)."""
    return torch.as_tensor(LPS_TO_RAS @ np.round(np.asarray(affine, dtype=np.float64), AFFINE_DECIMALS))


def preprocess(volume: Volume, cfg: PreprocessConfig, device: torch.device | str = "cpu") -> Preprocessed:
    """Reorient to RAS axes, resample to ``cfg.spacing_mm`` (one fused resampling) and normalise intensities."""
    with device_work(device) as work:
        voxels = work.to_device(volume.voxels)
        image = MetaTensor(voxels[None], affine=ras_affine(volume.affine))
        image = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")), lazy=True)(image)
        image = Spacing(pixdim=cfg.spacing_mm, lazy=True, **_RESAMPLE)(image)
        image = apply_pending(image, overrides=_RESAMPLE)[0]
        if image.untyped_storage().data_ptr() == voxels.untyped_storage().data_ptr():
            image = image.clone()  # an identity resampling returns the caller's voxels: never normalise them in place
        del voxels
        if cfg.bias_correction_degree:
            image = correct_bias(image, cfg.bias_correction_degree, cfg.foreground_fraction, cfg.percentile_high)
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


def _foreground_threshold(flat: torch.Tensor, fraction: float, percentile: float) -> float:
    k = min(flat.numel(), max(1, round(percentile / 100.0 * flat.numel())))
    return fraction * float(flat.kthvalue(k).values)


# correct_bias: the fit uses every BIAS_STRIDE-th voxel per axis and BIAS_ITERATIONS rounds of: keep the voxels
# within a window (log units) of the commonest log intensity left by the previous round's field, fit to them.
# The windows narrow from +-30 % to +-7 %: the first selection is a slab of one tissue where the field has one
# value, and a narrow first window on a strong field (+-34 %) keeps a slab too thin to show the field's gradient,
# so the rounds settle on a wrong field. The first BIAS_LINEAR_ROUNDS rounds fit a plane only: a quadratic
# fitted to a slab extrapolates wildly across the rest of the head.
BIAS_STRIDE = 3
BIAS_WINDOWS = (0.3, 0.2, 0.15, 0.1, 0.07)  # per round; the last for the rounds after
BIAS_ITERATIONS = 8
BIAS_LINEAR_ROUNDS = 3
BIAS_MIN_SAMPLES = 500


def correct_bias(image: torch.Tensor, degree: int, fraction: float, percentile: float) -> torch.Tensor:
    """``image`` divided by a smooth multiplicative bias field fitted to it (MR intensity non-uniformity).

    The field is ``exp(p(x, y, z))`` for a polynomial ``p`` of ``degree`` in the voxel position, fitted by least
    squares to the log intensity of one tissue class of the foreground (as in :func:`zscore_foreground`). A fit
    to all of the foreground would mistake the anatomy (grey matter around white matter) for bias, so each round
    keeps only the voxels near the commonest value of what the previous round's field leaves (at first, of the
    log intensity itself): the head's largest tissue class, whatever its intensity, without lesions or other
    tissues. The field is scaled to a mean of 1 over that class, so the result keeps the image's intensity
    scale; an image with too little foreground is returned unchanged. A much simplified N4 (docs/decisions.md,
    "MR bias field"): no B-spline, no histogram sharpening; a fraction of a second on a 3-D T1.
    """
    grid = image[0]
    sample = grid[::BIAS_STRIDE, ::BIAS_STRIDE, ::BIAS_STRIDE].float()
    threshold = _foreground_threshold(sample.reshape(-1), fraction, percentile)
    keep = sample > max(threshold, 0.0)
    if int(keep.sum()) < BIAS_MIN_SAMPLES:
        return image
    axes = [_unit_axis(n, grid.device)[::BIAS_STRIDE] for n in grid.shape]
    index = keep.nonzero()
    design = _monomials([axes[d][index[:, d]] for d in range(3)], degree)  # (N, terms) float64
    target = sample[keep].double().log()
    residual = target
    coef, fitted = None, None
    for round_ in range(BIAS_ITERATIONS):
        low, high = float(residual.min()), float(residual.max())
        histogram = torch.histc(residual, bins=200, min=low, max=high)
        mode = low + (int(histogram.argmax()) + 0.5) * (high - low) / 200
        chosen = (residual - mode).abs() < BIAS_WINDOWS[min(round_, len(BIAS_WINDOWS) - 1)]
        if int(chosen.sum()) < BIAS_MIN_SAMPLES:
            break
        terms = 4 if round_ < BIAS_LINEAR_ROUNDS else design.shape[1]  # 1, x, y, z first
        coef = torch.zeros(design.shape[1], 1, dtype=torch.float64, device=design.device)
        coef[:terms] = torch.linalg.lstsq(design[chosen][:, :terms], target[chosen, None]).solution
        fitted = chosen
        residual = target - (design @ coef)[:, 0]
    if coef is None:
        return image
    log_field = (design[fitted] @ coef)[:, 0]
    coef[0] -= torch.logsumexp(log_field, 0) - math.log(log_field.numel())  # mean field 1 over the fitted voxels
    # The field on the whole grid, a term at a time in float32 (the terms at once would be 10x the image).
    x, y, z = (_unit_axis(n, grid.device).float() for n in grid.shape)
    log_bias = torch.zeros(grid.shape, dtype=torch.float32, device=grid.device)
    for c, (a, b, e) in zip(coef[:, 0].tolist(), _exponents(degree), strict=True):
        log_bias += c * (x[:, None, None] ** a * y[None, :, None] ** b * z[None, None, :] ** e)
    return image / torch.exp(log_bias).to(image.dtype)[None]


def _unit_axis(n: int, device: torch.device) -> torch.Tensor:
    """Voxel positions along an axis of ``n`` voxels mapped to [-1, 1] (float64): a well-conditioned fit."""
    return torch.linspace(-1.0, 1.0, n, dtype=torch.float64, device=device)


def _exponents(degree: int) -> list[tuple[int, int, int]]:
    """``(a, b, c)`` with ``a + b + c <= degree``, the constant first: the monomials ``x**a * y**b * z**c``."""
    return [
        (a, b, total - a - b)
        for total in range(degree + 1)
        for a in range(total, -1, -1)
        for b in range(total - a, -1, -1)
    ]


def _monomials(xyz: list[torch.Tensor], degree: int) -> torch.Tensor:
    """The design matrix (N, terms) of the monomials of ``_exponents(degree)`` at N points."""
    x, y, z = xyz
    return torch.stack([x**a * y**b * z**c for a, b, c in _exponents(degree)], dim=1)


def zscore_foreground(image: torch.Tensor, fraction: float, percentile: float) -> torch.Tensor:
    """``(image - mean) / std`` over the voxels brighter than ``fraction`` x the image's ``percentile``-th value.

    On MR the air around the head is Rician noise, never exactly zero, so ``NormalizeIntensity(nonzero=True)``
    averages over the background too and the scale of the result follows the field of view. A threshold
    relative to a high percentile keeps the body (scalp, brain, CSF) and drops the air on any intensity scale.
    """
    flat = image.reshape(-1).float()
    threshold = _foreground_threshold(flat, fraction, percentile)
    foreground = flat[flat > threshold]
    if foreground.numel() < 2:  # a blank image: only centre it
        return image - flat.mean()
    mean, std = foreground.mean(), foreground.std()
    return (image - mean) / std.clamp_min(1e-8)
