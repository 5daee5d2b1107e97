"""3-D lesion detection with a RetinaNet: sliding-window patches in, Findings in LPS mm out.

``prepare`` resamples the study with the model's preprocessing and cuts it into ROI-sized patches;
``split_outputs`` decodes one batched forward pass into boxes per patch (MONAI's anchors, box coder and
box selector, see :mod:`inference.tasks.postprocess.detection`); ``finalize`` merges the patches' boxes,
maps them into patient coordinates and returns Findings sorted by score.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from inference.io.volume import Volume
from inference.modelrepo.schema import ModelConfig
from inference.tasks.base import PreparedStudy, Task, TaskResult
from inference.tasks.patches import PatchPlan, extract_patches, plan_patches
from inference.tasks.postprocess.detection import (
    Detections,
    RetinaNetDecoder,
    boxes_to_findings,
    merge_patch_detections,
)
from inference.tasks.preprocess import preprocess

logger = logging.getLogger(__name__)

__all__ = ["DetectionContext", "DetectionTask"]


@dataclass(frozen=True)
class DetectionContext:
    """What ``finalize`` needs from ``prepare``: the preprocessed geometry and the patch plan."""

    affine: np.ndarray  # (4, 4): voxel index of the preprocessed image -> LPS mm
    plan: PatchPlan


class DetectionTask(Task):
    """RetinaNet detection over sliding-window patches of the preprocessed study."""

    def __init__(self, config: ModelConfig, device: torch.device, *, score_threshold: float | None = None) -> None:
        """``score_threshold`` overrides ``postprocessing.score_threshold`` (threshold tuning, FROC curves)."""
        super().__init__(config, device)
        if config.task != "detection" or config.detector is None:
            raise ValueError(f"model {config.name!r} is not a detection model with a 'detector' section")
        self.roi_size = tuple(int(s) for s in config.inferer.roi_size)
        self.in_channels = int(config.network.args.get("in_channels", 1))
        self.decoder = RetinaNetDecoder(config.detector, config.postprocessing, score_threshold=score_threshold)

    @property
    def item_shape(self) -> tuple[int, ...]:
        return (self.in_channels, *self.roi_size)

    def prepare(self, volume: Volume) -> PreparedStudy:
        start = time.perf_counter()
        pre = preprocess(volume, self.config.preprocessing, self.device)
        preprocess_ms = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        plan = plan_patches(pre.image.shape[1:], self.roi_size, self.config.inferer.overlap)
        items = extract_patches(pre.image, plan, pad_value=self.config.preprocessing.b_min)
        patches_ms = (time.perf_counter() - start) * 1e3
        logger.debug(
            "prepared %s study %s -> %s in %d patches", volume.modality, volume.shape, plan.image_shape, len(plan)
        )
        return PreparedStudy(
            items=items,
            context=DetectionContext(affine=pre.affine, plan=plan),
            timing_ms={"preprocess": preprocess_ms, "patches": patches_ms},
        )

    def slab_context(self, affine: np.ndarray, plan: PatchPlan) -> DetectionContext:
        return DetectionContext(affine=affine, plan=plan)

    def split_outputs(self, outputs: object, batch_size: int) -> list[Detections]:
        detections = self.decoder(outputs, self.roi_size)
        if len(detections) != batch_size:
            raise ValueError(f"network output holds {len(detections)} items, expected {batch_size}")
        return detections

    def finalize(self, volume: Volume, prepared: PreparedStudy, results: list[Detections]) -> TaskResult:
        """Findings without masks: a detection model's SEG is a rendering of its boxes (inference.outputs.regions)."""
        context: DetectionContext = prepared.context
        post = self.config.postprocessing
        merged = merge_patch_detections(context.plan, results, nms_iou=post.nms_iou, max_detections=post.max_detections)
        findings = boxes_to_findings(merged, context.affine, volume, self.config.labels, min_size_mm=post.min_size_mm)
        return TaskResult(findings)
