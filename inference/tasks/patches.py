"""Sliding-window patch plans: the unit of batching for 3-D models.

A study is padded (at the high end of each axis) to at least the model's ROI, then cut into ROI-sized
patches on MONAI's dense grid with the configured overlap. Every patch of a model has the same shape,
so patches of studies of any size share one forward pass (docs/decisions.md, "Batching unit").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from monai.data.utils import dense_patch_slices
from monai.inferers.utils import _get_scan_interval


@dataclass(frozen=True)
class PatchPlan:
    image_shape: tuple[int, ...]  # spatial shape of the preprocessed image
    padded_shape: tuple[int, ...]  # after padding up to the ROI
    roi_size: tuple[int, ...]
    origins: tuple[tuple[int, ...], ...]  # low corner of each patch, in padded-image voxels

    def __len__(self) -> int:
        return len(self.origins)


def plan_patches(image_shape: Sequence[int], roi_size: Sequence[int], overlap: float) -> PatchPlan:
    image_shape = tuple(int(s) for s in image_shape)
    roi_size = tuple(int(s) for s in roi_size)
    if len(image_shape) != len(roi_size):
        raise ValueError(f"image shape {image_shape} and roi size {roi_size} differ in dimensions")
    padded = tuple(max(s, r) for s, r in zip(image_shape, roi_size, strict=True))
    interval = _get_scan_interval(padded, roi_size, len(roi_size), [overlap] * len(roi_size))
    slices = dense_patch_slices(padded, roi_size, interval)
    origins = tuple(tuple(int(s.start) for s in sl) for sl in slices)
    return PatchPlan(image_shape, padded, roi_size, origins)


def extract_patches(image: torch.Tensor, plan: PatchPlan, pad_value: float) -> list[torch.Tensor]:
    """Cut ``image`` (C, *spatial) into the plan's patches, each (C, *roi_size)."""
    pad: list[int] = []
    for size, padded in zip(reversed(plan.image_shape), reversed(plan.padded_shape), strict=True):
        pad += [0, padded - size]  # F.pad takes the last axis first
    if any(pad):
        image = F.pad(image, pad, mode="constant", value=pad_value)
    return [
        image[(slice(None), *(slice(o, o + r) for o, r in zip(origin, plan.roi_size, strict=True)))]
        for origin in plan.origins
    ]
