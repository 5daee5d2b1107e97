"""3-D segmentation: sliding-window patches in; a mask on the input grid and one Finding per component out.

``prepare`` resamples the study with the model's preprocessing (orientation, spacing, normalisation) and
cuts it into ROI-sized patches. ``split_outputs`` turns one batched forward pass into per-patch foreground
probabilities. ``finalize`` blends the patches back into the preprocessed grid, resamples the probability
map onto the *input* volume's voxel grid, thresholds it, splits it into connected components and reports
each as a Finding in LPS mm, returned with each component's mask (a TaskResult) for the DICOM SEG.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers.utils import compute_importance_map
from scipy import ndimage
from scipy.spatial import ConvexHull
from scipy.spatial.distance import cdist

from inference.io.volume import Volume
from inference.modelrepo.schema import BLEND_MODES, ModelConfig
from inference.outputs.finding import Finding, FindingMask
from inference.tasks.base import PreparedStudy, Task, TaskResult
from inference.tasks.patches import PatchPlan, extract_patches, plan_patches
from inference.tasks.preprocess import preprocess

logger = logging.getLogger(__name__)

__all__ = [
    "BLEND_MODES",
    "SegmentationContext",
    "SegmentationTask",
    "feret_diameter_mm",
    "mask_to_findings",
    "resample_to_input",
    "stitch_patches",
]

GAUSSIAN_SIGMA_SCALE = 0.125  # of the ROI size, MONAI's sliding-window default
# Face, edge and corner neighbours: a lesion is never split by a one-voxel diagonal bridge.
CONNECTIVITY = ndimage.generate_binary_structure(3, 3)
_RESAMPLE_BLOCK_VOXELS = 1 << 20  # input voxels interpolated at a time
_UNBOUNDED = 1e6  # voxels: beyond any volume
_EXACT_FERET_POINTS = 256  # above this many boundary points, only their convex hull's vertices are compared


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


def stitch_patches(plan: PatchPlan, results: Sequence[torch.Tensor], importance_map: torch.Tensor) -> torch.Tensor:
    """Blend per-patch maps (C, *roi_size) into one (C, *plan.image_shape) float32 map on the CPU.

    Each voxel gets the importance-weighted mean of the patches covering it, as MONAI's sliding-window
    inferer computes it; the padding beyond the image is cropped off.
    """
    if len(results) != len(plan):
        raise ValueError(f"got {len(results)} patch results for a plan of {len(plan)} patches")
    if not results:
        raise ValueError("no patch results to stitch")
    weights = importance_map.to(device="cpu", dtype=torch.float32)
    if tuple(weights.shape) != plan.roi_size:
        raise ValueError(f"importance map shape {tuple(weights.shape)} differs from the ROI {plan.roi_size}")
    channels = results[0].shape[0]
    total = torch.zeros((channels, *plan.padded_shape), dtype=torch.float32)
    weight_sum = torch.zeros(plan.padded_shape, dtype=torch.float32)
    for origin, result in zip(plan.origins, results, strict=True):
        window = tuple(slice(o, o + r) for o, r in zip(origin, plan.roi_size, strict=True))
        total[(slice(None), *window)] += result.to(device="cpu", dtype=torch.float32) * weights
        weight_sum[window] += weights
    crop = tuple(slice(0, s) for s in plan.image_shape)
    return total[(slice(None), *crop)] / weight_sum[crop]


def resample_to_input(
    probability: np.ndarray, affine: np.ndarray, volume: Volume, threshold: float
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Interpolate a map on the grid of ``affine`` at the input volume's voxel centers, where it can matter.

    Every input voxel (i, j, k) goes to LPS through ``volume.affine`` and on to a fractional index of
    ``probability`` through the inverse of ``affine``; the value there is trilinear (beyond the grid's
    last voxel centers, the edge value). A trilinear value is a convex combination of its 8 neighbours, so
    it reaches ``threshold`` only within one voxel of a grid voxel that does: only the input voxels that
    map into the box around those (unbounded past the grid's edges) are evaluated. Returns the map on
    that block of the input grid (float32) and the block's low corner; an empty block when nothing
    reaches the threshold.
    """
    probability = np.asarray(probability, dtype=np.float32)
    above = np.argwhere(probability >= threshold)
    if len(above) == 0:
        return np.zeros((0, 0, 0), dtype=np.float32), (0, 0, 0)
    input_to_grid = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ volume.affine
    # One voxel around the voxels at or above the threshold; unbounded where they touch the grid's edge,
    # since beyond it the edge value holds.
    first, last = above.min(axis=0), above.max(axis=0)
    lo = np.where(first == 0, -_UNBOUNDED, first - 1.0)
    hi = np.where(last == np.asarray(probability.shape) - 1, _UNBOUNDED, last + 1.0)
    corners = np.array(list(itertools.product(*zip(lo, hi, strict=True))))
    grid_to_input = np.linalg.inv(input_to_grid)
    corners_input = corners @ grid_to_input[:3, :3].T + grid_to_input[:3, 3]
    start = np.maximum(np.floor(corners_input.min(axis=0)).astype(int), 0)
    stop = np.minimum(np.ceil(corners_input.max(axis=0)).astype(int) + 1, volume.shape)
    if np.any(stop <= start):
        return np.zeros((0, 0, 0), dtype=np.float32), (0, 0, 0)
    shape = tuple(int(s) for s in stop - start)
    out = np.empty(shape, dtype=np.float32)
    i, j = (np.arange(start[a], stop[a], dtype=np.float64) for a in (0, 1))
    ii, jj = np.meshgrid(i, j, indexing="ij")
    slices_per_block = max(1, _RESAMPLE_BLOCK_VOXELS // (shape[0] * shape[1]))
    for k0 in range(0, shape[2], slices_per_block):
        ks = np.arange(start[2] + k0, min(start[2] + k0 + slices_per_block, stop[2]), dtype=np.float64)
        index = np.stack(np.broadcast_arrays(ii[..., None], jj[..., None], ks[None, None, :]))  # (3, X, Y, n)
        coordinates = np.tensordot(input_to_grid[:3, :3], index, axes=1) + input_to_grid[:3, 3, None, None, None]
        out[:, :, k0 : k0 + len(ks)] = ndimage.map_coordinates(probability, coordinates, order=1, mode="nearest")
    return out, (int(start[0]), int(start[1]), int(start[2]))


def mask_to_findings(
    mask: np.ndarray,
    probability: np.ndarray,
    offset: Sequence[int],
    volume: Volume,
    label: str,
    *,
    min_volume_ml: float = 0.0,
    min_size_mm: float = 0.0,
    min_score: float = 0.0,
) -> tuple[list[Finding], list[tuple[tuple[slice, ...], np.ndarray]]]:
    """One Finding per 26-connected component of ``mask``, a block of the input grid starting at ``offset``.

    Per component, in the input volume's geometry (``volume.affine``):

    * ``center_mm``: the LPS position of the mean voxel index (the centroid); ``center_voxel`` that index;
    * ``bbox_mm``: LPS min/max over the corners of the component's index box, voxel edges included (±0.5);
    * ``diameter_mm``: :func:`feret_diameter_mm` of the component's boundary voxels (between voxel centers);
    * ``volume_ml``: voxel count x voxel volume; ``score``: mean of ``probability`` over the component;
    * ``sop_instance_uid``: the source image nearest the center.

    Components under ``min_volume_ml``, ``min_size_mm`` or ``min_score`` are dropped. Returns the Findings (in component
    order) and, for each, its index box in the full input grid with its bool mask there.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.size == 0:
        return [], []
    offset_arr = np.asarray(offset, dtype=int)
    steps = volume.affine[:3, :3]
    voxel_ml = abs(float(np.linalg.det(steps))) / 1000.0
    labelled, _ = ndimage.label(mask, structure=CONNECTIVITY)
    findings: list[Finding] = []
    components: list[tuple[tuple[slice, ...], np.ndarray]] = []
    for number, box in enumerate(ndimage.find_objects(labelled), start=1):
        if box is None:
            continue
        component = labelled[box] == number
        volume_ml = float(component.sum()) * voxel_ml
        if volume_ml < min_volume_ml:
            continue
        score = float(np.mean(probability[box][component]))
        if score < min_score:
            continue
        low = offset_arr + np.array([s.start for s in box])
        index = np.argwhere(component) + low
        boundary = component & ~ndimage.binary_erosion(component, border_value=0)
        diameter_mm = feret_diameter_mm(volume.voxel_to_lps(np.argwhere(boundary) + low), steps)
        if diameter_mm < min_size_mm:
            continue
        centroid = index.mean(axis=0)
        center_mm = volume.voxel_to_lps(centroid)[0]
        corners = np.array(list(itertools.product(*zip(index.min(axis=0) - 0.5, index.max(axis=0) + 0.5, strict=True))))
        corners_mm = volume.voxel_to_lps(corners)
        source = volume.nearest_source_image(center_mm)
        findings.append(
            Finding(
                label=label,
                score=score,
                center_mm=tuple(float(v) for v in center_mm),
                bbox_mm=tuple(float(v) for v in (*corners_mm.min(axis=0), *corners_mm.max(axis=0))),
                diameter_mm=diameter_mm,
                volume_ml=volume_ml,
                sop_instance_uid=source.sop_instance_uid if source is not None else None,
                center_voxel=tuple(float(v) for v in centroid),
            )
        )
        full_box = tuple(slice(int(a), int(a) + s.stop - s.start) for a, s in zip(low, box, strict=True))
        components.append((full_box, component))
    return findings, components


def feret_diameter_mm(points_mm: np.ndarray, steps_mm: np.ndarray) -> float:
    """Longest extent of a voxelised object: the largest distance between two of its (N, 3) voxel centers in mm.

    Pass the boundary voxels: the farthest pair lies on the convex hull, so only the hull's vertices are
    compared when there are many. Measured on voxelised spheres of 5-40 mm at 1-5 mm slices, this is within
    a few percent of the true diameter (lesions >= 10 mm) and about 0.3-1.5 mm short for 5 mm ones; adding
    the voxel width along the measured direction overestimated by 1.5-3.5 mm. A thin line of n voxels
    measures (n - 1) voxels. Never less than the largest voxel side (``steps_mm``: the affine's 3x3), so a
    one-voxel object measures one voxel.
    """
    points = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
    floor = float(np.max(np.linalg.norm(np.asarray(steps_mm, dtype=np.float64), axis=0)))
    if len(points) < 2:
        return floor
    candidates = points
    if len(points) > _EXACT_FERET_POINTS:
        # "QJ" joggles the input by ~1e-11 so flat (single-slice) objects have a hull too.
        candidates = points[ConvexHull(points, qhull_options="QJ").vertices]
    longest = max(
        float(cdist(candidates[start : start + 512], candidates).max()) for start in range(0, len(candidates), 512)
    )
    return max(longest, floor)
