"""Progressive preprocessing: the sliding-window patches of a study cut while its slices still arrive.

A :class:`SlabPlan` is made from the *expected* input grid (shape and LPS affine, known before the last slice
arrives, :mod:`inference.io.assembly`) and a model's preprocessing. It fixes what the whole-study path would compute
on the finished study: the preprocessed grid (MONAI's Orientation + Spacing, asked for their output shape and affine
on a zero-stride stand-in, so the grid is MONAI's own) and the patch plan over it. The preprocessed grid is filled
plane by plane along its axis nearest the input's slice axis (:class:`SlabImage`): each plane as soon as the input
slices it reads (the trilinear halo included) are in, each voxel once, from those slices alone; a patch is cut as soon
as its planes are filled:

* every output voxel's input position is the same affine map MONAI resamples with (output index -> input index),
  interpolated trilinearly with the edge value beyond the input (MONAI's ``padding_mode="border"``);
* then the fixed intensity window (``ScaleIntensityRange``, the same transform), voxel by voxel;
* the patch's part beyond the preprocessed grid is padded with ``b_min``, as ``extract_patches`` pads.

Only preprocessing that is voxel-local after the resampling can be cut this way: a fixed window. Per-study
statistics (z-score, percentile windows, the MR bias field) need every voxel first (docs/decisions.md, "Progressive
reading"), so :meth:`ModelConfig.progressive_refusal` names why a model cannot be read progressively. Patches
built here differ from the whole-study path's by float32 rounding of the sample positions (below 3e-5 of the window
on noise, measured).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from monai.data import MetaTensor
from monai.transforms import Orientation, ScaleIntensityRange, Spacing

from inference.io.volume import LPS_TO_RAS
from inference.modelrepo.schema import ModelConfig, PreprocessConfig
from inference.tasks.patches import PatchPlan, plan_patches
from inference.tasks.preprocess import ras_affine

__all__ = ["SlabImage", "SlabPlan"]


@dataclass(frozen=True)
class SlabPlan:
    """The preprocessed grid and patch plan of an expected input grid; which input slices each plane of the grid
    reads and which planes each patch covers, along ``axis``."""

    input_shape: tuple[int, int, int]
    input_affine: np.ndarray  # (4, 4) input voxel index -> LPS mm
    affine: np.ndarray  # (4, 4) preprocessed voxel index -> LPS mm (what finalize maps boxes with)
    plan: PatchPlan
    axis: int  # the preprocessed grid's axis that runs along the input's slices
    plane_needs: tuple[tuple[int, int], ...]  # per plane along axis: first and last input slice it reads
    patch_planes: tuple[tuple[int, int], ...]  # per patch: first and last plane along axis it covers
    preprocessing: PreprocessConfig

    @classmethod
    def build(
        cls, shape: Sequence[int], affine: np.ndarray, config: ModelConfig, device: torch.device | str = "cpu"
    ) -> SlabPlan:
        shape = tuple(int(s) for s in shape)
        pre = config.preprocessing
        stand_in = MetaTensor(torch.zeros((), dtype=torch.float32).expand(1, *shape), affine=ras_affine(affine))
        image = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")), lazy=True)(stand_in)
        image = Spacing(pixdim=pre.spacing_mm, lazy=True)(image)
        out_affine = LPS_TO_RAS @ np.asarray(image.peek_pending_affine(), dtype=np.float64)
        out_shape = tuple(int(s) for s in image.peek_pending_shape())
        plan = plan_patches(out_shape, config.inferer.roi_size, config.inferer.overlap)
        to_input = np.linalg.inv(affine) @ out_affine
        axis = int(np.argmax(np.abs(to_input[2, :3])))
        needs = []
        for plane in range(out_shape[axis]):
            bounds = [(0, s - 1) for s in out_shape]
            bounds[axis] = (plane, plane)
            corners = np.array(list(itertools.product(*bounds)), dtype=np.float64)
            k = corners @ to_input[2, :3] + to_input[2, 3]
            first = int(np.clip(np.floor(k.min() - 1e-6), 0, shape[2] - 1))
            last = int(np.clip(np.ceil(k.max() + 1e-6), 0, shape[2] - 1))
            needs.append((first, last))
        patch_planes = tuple(
            (origin[axis], min(origin[axis] + plan.roi_size[axis], out_shape[axis]) - 1) for origin in plan.origins
        )
        return cls(shape, np.asarray(affine, dtype=np.float64), out_affine, plan, axis, tuple(needs), patch_planes, pre)

    def __len__(self) -> int:
        return len(self.plan)

    @property
    def n_planes(self) -> int:
        return self.plan.image_shape[self.axis]


class SlabImage:
    """The preprocessed image of a :class:`SlabPlan`, filled plane by plane (not thread-safe: one filler at a time)."""

    def __init__(self, plan: SlabPlan, device: torch.device | str = "cpu") -> None:
        self.plan = plan
        self.device = device
        self.image = torch.empty((1, *plan.plan.image_shape), dtype=torch.float32, device=device)
        self.filled = np.zeros(plan.n_planes, dtype=bool)
        self._to_input = np.linalg.inv(plan.input_affine) @ plan.affine

    def fill(self, first: int, last: int, block: Callable[[int, int], np.ndarray]) -> None:
        """Planes ``first..last`` along the plan's axis, preprocessed as the whole-study path would. ``block(k0, k1)``
        gives input slices ``k0..k1`` as a (k1 - k0 + 1, columns, rows) float32 array (the slices as stored)."""
        plan = self.plan
        k0 = min(plan.plane_needs[p][0] for p in range(first, last + 1))
        k1 = max(plan.plane_needs[p][1] for p in range(first, last + 1))
        voxels = torch.from_numpy(np.ascontiguousarray(block(k0, k1), dtype=np.float32)).to(self.device)
        # Output index -> input index (clamped: the edge value beyond the input, as padding_mode="border"), shifted
        # to the block's first slice and normalised for grid_sample (align_corners); one input axis at a time.
        # (numpy: many small operations, which torch's thread pool makes slow on a busy CPU)
        axes = [np.arange(s, dtype=np.float64) for s in plan.plan.image_shape]
        axes[plan.axis] = np.arange(first, last + 1, dtype=np.float64)
        to_input = self._to_input
        shape = tuple(len(a) for a in axes)
        grid = np.empty((*shape, 3), dtype=np.float32)
        for d in range(3):
            c = (
                to_input[d, 0] * axes[0][:, None, None]
                + to_input[d, 1] * axes[1][None, :, None]
                + to_input[d, 2] * axes[2][None, None, :]
                + to_input[d, 3]
            )
            c = np.clip(c, 0.0, plan.input_shape[d] - 1) - (k0 if d == 2 else 0)
            extent = voxels.shape[(d + 1) % 3]  # the block is (k, i, j)
            # grid_sample reads the block as (N, C, D, H, W) = (1, 1, k, i, j), its grid's last axis as (W, H, D).
            grid[..., (1, 0, 2)[d]] = 2.0 * c / (extent - 1) - 1.0 if extent > 1 else 0.0
        grid = torch.from_numpy(grid).to(self.device)
        sampled = F.grid_sample(
            voxels[None, None], grid[None], mode="bilinear", padding_mode="border", align_corners=True
        )
        pre = plan.preprocessing
        windowed = ScaleIntensityRange(pre.a_min, pre.a_max, pre.b_min, pre.b_max, clip=pre.clip)(sampled[0])
        index = [slice(None)] * 4
        index[1 + plan.axis] = slice(first, last + 1)
        self.image[tuple(index)] = torch.as_tensor(windowed).float()
        self.filled[first : last + 1] = True

    def ready(self, patch: int) -> bool:
        first, last = self.plan.patch_planes[patch]
        return bool(self.filled[first : last + 1].all())

    def patch(self, index: int) -> torch.Tensor:
        """Patch ``index`` (1, *roi_size), padded beyond the image with ``b_min`` as ``extract_patches`` pads."""
        plan = self.plan.plan
        origin = plan.origins[index]
        window = tuple(slice(o, min(o + r, s)) for o, r, s in zip(origin, plan.roi_size, plan.image_shape, strict=True))
        part = self.image[(slice(None), *window)]
        if tuple(part.shape[1:]) == tuple(plan.roi_size):
            return part.clone()
        out = torch.full((1, *plan.roi_size), float(self.plan.preprocessing.b_min), device=self.device)
        out[(slice(None), *(slice(0, w.stop - w.start) for w in window))] = part
        return out
