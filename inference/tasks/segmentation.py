"""3-D segmentation: sliding-window patches in; a mask on the input grid and one Finding per component out.

``prepare`` resamples the study with the model's preprocessing (orientation, spacing, normalisation) and
cuts it into ROI-sized patches. ``split_outputs`` turns one batched forward pass into per-patch foreground
probabilities. ``finalize`` blends the patches back into the preprocessed grid, resamples the probability
map onto the *input* volume's voxel grid, thresholds it, splits it into connected components and reports
each as a Finding in LPS mm, returned with each component's mask (a TaskResult) for the DICOM SEG.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers.utils import compute_importance_map

from inference.io.volume import Volume
from inference.modelrepo.schema import BLEND_MODES, ModelConfig
from inference.outputs.finding import Finding, FindingMask
from inference.tasks.base import PreparedStudy, Task, TaskResult
from inference.tasks.patches import PatchPlan, extract_patches, plan_patches
from inference.tasks.postprocess.segmentation import (
    mask_to_findings,
    resample_to_input,
    stitch_patches,
)
from inference.tasks.preprocess import preprocess

logger = logging.getLogger(__name__)

__all__ = ["BLEND_MODES", "SegmentationContext", "SegmentationTask"]

GAUSSIAN_SIGMA_SCALE = 0.125  # of the ROI size, MONAI's sliding-window default


@dataclass
class SegmentationContext:
    """What ``finalize`` needs from ``prepare``: the preprocessed geometry and the patch plan."""

    affine: np.ndarray  # (4, 4): voxel index of the preprocessed image -> LPS mm
    plan: PatchPlan


class SegmentationTask(Task):
    """Sliding-window segmentation of the preprocessed study, reported on the input grid.

    The network outputs ``1 + len(labels)`` channels (softmax, channel 0 is background) or ``len(labels)``
    channels (independent sigmoids). ``finalize`` (see :func:`stitch_patches`, :func:`resample_to_input`
    and :func:`mask_to_findings`):

    1. blends the patch probabilities into the preprocessed grid with a MONAI importance map (gaussian,
       sigma 0.125 of the ROI, by default);
    2. maps every input voxel center to LPS (``volume.affine``) and on to a fractional index of the
       preprocessed grid, interpolates the probability there (trilinear) and thresholds it at
       ``postprocessing.score_threshold``: interpolating probabilities before thresholding gives smoother
       masks than resampling a binary mask with nearest neighbour;
    3. labels 26-connected components on the input grid, drops those under ``postprocessing.min_volume_ml``,
       with a diameter under ``postprocessing.min_size_mm`` or a mean probability under
       ``postprocessing.min_score``, and keeps the ``max_detections`` highest-scoring.

    ``finalize`` returns the Findings with, for each, its component's mask on the input volume's grid (its
    [column, row, slice] indexing and affine): ``TaskResult.masks[n]`` holds exactly the voxels that ``findings[n]``
    counts in its ``volume_ml``.
    """

    def __init__(
        self,
        config: ModelConfig,
        device: torch.device,
        *,
        score_threshold: float | None = None,
        blend_mode: str | None = None,
    ) -> None:
        """``score_threshold`` overrides ``postprocessing.score_threshold`` (threshold tuning), ``blend_mode``
        ``inferer.mode``."""
        super().__init__(config, device)
        if config.task != "segmentation":
            raise ValueError(f"model {config.name!r} is a {config.task} model, not a segmentation model")
        blend_mode = config.inferer.mode if blend_mode is None else blend_mode
        if blend_mode not in BLEND_MODES:
            raise ValueError(f"blend_mode must be one of {BLEND_MODES}, got {blend_mode!r}")
        self.roi_size = tuple(int(s) for s in config.inferer.roi_size)
        self.in_channels = int(config.network.args.get("in_channels", 1))
        n_labels = len(config.labels)
        out_channels = int(config.network.args.get("out_channels", n_labels + 1))
        if out_channels not in (n_labels, n_labels + 1):
            raise ValueError(
                f"network.args.out_channels ({out_channels}) must be len(labels) + 1 (softmax with background) "
                f"or len(labels) (sigmoid); labels are {list(config.labels)}"
            )
        self.softmax = out_channels == n_labels + 1
        threshold = config.postprocessing.score_threshold if score_threshold is None else float(score_threshold)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"score_threshold must be in (0, 1), got {threshold!r}")
        self.threshold = threshold
        self.importance_map = compute_importance_map(
            self.roi_size, mode=blend_mode, sigma_scale=GAUSSIAN_SIGMA_SCALE, device="cpu"
        ).float()

    @property
    def item_shape(self) -> tuple[int, ...]:
        return (self.in_channels, *self.roi_size)

    def prepare(self, volume: Volume) -> PreparedStudy:
        start = time.perf_counter()
        pre = preprocess(volume, self.config.preprocessing, self.device)
        preprocess_ms = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        plan = plan_patches(pre.image.shape[1:], self.roi_size, self.config.inferer.overlap)
        # Pad with the darkest value: background for z-scored and windowed images alike.
        items = extract_patches(pre.image, plan, pad_value=float(pre.image.min()))
        patches_ms = (time.perf_counter() - start) * 1e3
        logger.debug(
            "prepared %s study %s -> %s in %d patches", volume.modality, volume.shape, plan.image_shape, len(plan)
        )
        return PreparedStudy(
            items=items,
            context=SegmentationContext(affine=pre.affine, plan=plan),
            timing_ms={"preprocess": preprocess_ms, "patches": patches_ms},
        )

    def split_outputs(self, outputs: object, batch_size: int) -> list[torch.Tensor]:
        """Per patch, (len(labels), *roi_size) float16 foreground probabilities on the CPU."""
        if not isinstance(outputs, torch.Tensor) or outputs.ndim != 2 + len(self.roi_size):
            raise ValueError(f"expected a (B, C, *spatial) tensor, got {getattr(outputs, 'shape', type(outputs))}")
        if outputs.shape[0] != batch_size:
            raise ValueError(f"network output holds {outputs.shape[0]} items, expected {batch_size}")
        logits = outputs.float()
        probabilities = torch.softmax(logits, dim=1)[:, 1:] if self.softmax else torch.sigmoid(logits)
        return list(probabilities.to(device="cpu", dtype=torch.float16).unbind(0))

    def finalize(self, volume: Volume, prepared: PreparedStudy, results: list[torch.Tensor]) -> TaskResult:
        context: SegmentationContext = prepared.context
        post = self.config.postprocessing
        probabilities = stitch_patches(context.plan, results, self.importance_map).numpy()
        candidates: list[tuple[Finding, tuple[slice, ...], np.ndarray]] = []
        for channel, label in enumerate(self.config.labels):
            probability, offset = resample_to_input(probabilities[channel], context.affine, volume, self.threshold)
            label_findings, components = mask_to_findings(
                probability >= self.threshold,
                probability,
                offset,
                volume,
                label,
                min_volume_ml=post.min_volume_ml,
                min_size_mm=post.min_size_mm,
                min_score=post.min_score,
            )
            candidates += [(f, box, mask) for f, (box, mask) in zip(label_findings, components, strict=True)]
        candidates.sort(key=lambda candidate: -candidate[0].score)
        kept = candidates[: post.max_detections]
        logger.debug("kept %d of %d components", len(kept), len(candidates))
        return TaskResult(
            findings=[finding for finding, _, _ in kept],
            masks=[FindingMask(tuple(int(s.start) for s in box), mask) for _, box, mask in kept],
        )
