"""RetinaNet head outputs -> boxes per patch -> boxes per image -> Findings in patient coordinates.

Box convention (everything in this module, and the training targets of every detection model):

* MONAI ``StandardMode`` boxes, ``[x0, y0, z0, x1, y1, z1]`` (``BOX_MODE``), in the voxel grid of the
  *preprocessed* image (patch or whole image).
* Coordinates are voxel *edges*: voxel ``i`` covers ``[i, i + 1)``. This is MONAI's detection convention:
  its anchor generator puts the anchors of a stride-``s`` feature cell ``n`` at ``s * n + s // 2``, the
  middle of input voxels ``s * n .. s * n + s - 1``, and ``clip_boxes_to_image`` clips to ``[0, size]``.
* The affines of :class:`~inference.io.volume.Volume` and :class:`~inference.tasks.preprocess.Preprocessed`
  map voxel-*center* indices, so a box's edge coordinate ``e`` is the index ``e - 0.5``
  (:func:`edge_to_index`, :func:`boxes_from_centers`).

Decoding reuses MONAI's machinery: ``AnchorGeneratorWithAnchorShape`` for the anchors, ``BoxCoder`` for
the regression, ``BoxSelector`` for the per-patch score threshold, top-k and NMS, ``box_utils.batched_nms``
for the image-level NMS. The anchors and box coder are the ones :class:`RetinaNetDetector` trains with
(:func:`build_anchor_generator`, :data:`BOX_CODER_WEIGHTS`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import product
from typing import Any

import numpy as np
import torch
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.apps.detection.utils.box_coder import BoxCoder
from monai.apps.detection.utils.box_selector import BoxSelector
from monai.data.box_utils import StandardMode, batched_nms, box_iou

from inference.io.volume import Volume
from inference.modelrepo.schema import DetectorConfig, PostprocessConfig
from inference.outputs.finding import Finding
from inference.tasks.patches import PatchPlan

logger = logging.getLogger(__name__)

BOX_MODE = StandardMode.get_name(3)  # "xyzxyz": corners, voxel-edge coordinates
BOX_CODER_WEIGHTS = (1.0,) * 6  # RetinaNetDetector's default: train and decode with the same coder
CLS_KEY = "classification"  # RetinaNet's output keys
BOX_REG_KEY = "box_regression"

__all__ = [
    "BOX_MODE",
    "Detections",
    "RetinaNetDecoder",
    "boxes_from_centers",
    "boxes_to_findings",
    "build_anchor_generator",
    "edge_to_index",
    "merge_patch_detections",
]


@dataclass(frozen=True)
class Detections:
    """Boxes of one patch or one image: ``boxes`` (N, 2 * dims) in :data:`BOX_MODE` voxel-edge coordinates."""

    boxes: np.ndarray  # (N, 6) float32
    scores: np.ndarray  # (N,) float32, sigmoid probabilities
    labels: np.ndarray  # (N,) int64, index into the model's labels

    @classmethod
    def empty(cls, spatial_dims: int = 3) -> Detections:
        return cls(np.zeros((0, 2 * spatial_dims), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int64))

    def __len__(self) -> int:
        return len(self.scores)

    def take(self, index: np.ndarray) -> Detections:
        return Detections(self.boxes[index], self.scores[index], self.labels[index])


def build_anchor_generator(detector: DetectorConfig) -> AnchorGeneratorWithAnchorShape:
    """The anchor generator of a model.yaml ``detector`` section (shared by training and inference)."""
    return AnchorGeneratorWithAnchorShape(
        feature_map_scales=tuple(detector.feature_map_scales),
        base_anchor_shapes=tuple(tuple(s) for s in detector.base_anchor_shapes),
        indexing="ij",
    )


def edge_to_index(edge: np.ndarray) -> np.ndarray:
    """Voxel-edge coordinates (voxel i covers [i, i+1)) -> voxel-center index coordinates."""
    return np.asarray(edge, dtype=np.float64) - 0.5


def boxes_from_centers(centers_index: np.ndarray, sizes_voxels: np.ndarray) -> np.ndarray:
    """Boxes in :data:`BOX_MODE` edge coordinates from centers in voxel-*index* coordinates and side lengths.

    This is how training targets are made: a lesion centered on voxel index ``c`` with side ``s`` voxels
    spans edges ``[c + 0.5 - s / 2, c + 0.5 + s / 2]``.
    """
    centers = np.atleast_2d(np.asarray(centers_index, dtype=np.float64)) + 0.5
    half = np.atleast_2d(np.asarray(sizes_voxels, dtype=np.float64)) / 2.0
    return np.concatenate([centers - half, centers + half], axis=1)


def _reshape_maps(maps: Sequence[torch.Tensor], num_anchors: int) -> torch.Tensor:
    """(B, A * C, *spatial) per level -> (B, sum(spatial * A), C), as RetinaNetDetector._reshape_maps."""
    out = []
    for level in maps:
        batch, channels = level.shape[:2]
        spatial = level.shape[2:]
        level = level.view(batch, num_anchors, channels // num_anchors, *spatial)
        level = level.permute(0, *range(3, 3 + len(spatial)), 1, 2)  # (B, *spatial, A, C)
        out.append(level.reshape(batch, -1, channels // num_anchors))
    return torch.cat(out, dim=1)


class RetinaNetDecoder:
    """Decodes a batch of RetinaNet head outputs into :class:`Detections` per patch.

    The same steps as ``RetinaNetDetector`` in inference mode (anchors, box decoding, per-level score
    threshold and top-k, NMS, max detections), on outputs that the engine's batched forward produced.
    """

    def __init__(
        self,
        detector: DetectorConfig,
        postprocessing: PostprocessConfig,
        *,
        score_threshold: float | None = None,
        topk_candidates_per_level: int = 100,
    ) -> None:
        self.anchor_generator = build_anchor_generator(detector)
        self.num_anchors = self.anchor_generator.num_anchors_per_location()[0]
        self.spatial_dims = self.anchor_generator.spatial_dims
        self.box_coder = BoxCoder(weights=BOX_CODER_WEIGHTS[: 2 * self.spatial_dims])
        self.box_selector = BoxSelector(
            box_overlap_metric=box_iou,
            apply_sigmoid=True,
            score_thresh=postprocessing.score_threshold if score_threshold is None else score_threshold,
            topk_candidates_per_level=topk_candidates_per_level,
            nms_thresh=postprocessing.nms_iou,
            detections_per_img=postprocessing.max_detections,
        )
        self._anchors: dict[tuple[Any, ...], torch.Tensor] = {}

    def _anchors_for(self, image_shape: tuple[int, ...], maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """All anchors of one item, (sum(spatial * A), 2 * dims), on the maps' device; cached per shape."""
        key = (image_shape, tuple(tuple(m.shape[2:]) for m in maps), maps[0].device)
        if key not in self._anchors:
            # The generator reads only the shapes of its arguments; a meta tensor stands in for the image.
            image = torch.empty((1, 1, *image_shape), device="meta")
            self._anchors[key] = self.anchor_generator(image, [m[:1] for m in maps])[0]
        return self._anchors[key]

    def __call__(self, head_outputs: Any, image_shape: Sequence[int]) -> list[Detections]:
        cls_maps, reg_maps = split_head_outputs(head_outputs)
        image_shape = tuple(int(s) for s in image_shape)
        # Decode where the network ran (the GPU, when there is one); only the kept boxes move to the CPU.
        cls_maps = [m.detach().float() for m in cls_maps]
        reg_maps = [m.detach().float() for m in reg_maps]
        anchors = self._anchors_for(image_shape, cls_maps)
        per_level = [m.shape[2:].numel() * self.num_anchors for m in cls_maps]
        logits = _reshape_maps(cls_maps, self.num_anchors).split(per_level, dim=1)
        regression = _reshape_maps(reg_maps, self.num_anchors).split(per_level, dim=1)
        anchors_per_level = anchors.split(per_level)
        results = []
        for b in range(cls_maps[0].shape[0]):
            boxes = [
                self.box_coder.decode_single(reg[b], anc)
                for reg, anc in zip(regression, anchors_per_level, strict=True)
            ]
            sel_boxes, sel_scores, sel_labels = self.box_selector.select_boxes_per_image(
                boxes, [lg[b] for lg in logits], image_shape
            )
            results.append(
                Detections(
                    sel_boxes.cpu().numpy().astype(np.float32),
                    sel_scores.cpu().numpy().astype(np.float32),
                    sel_labels.cpu().numpy().astype(np.int64),
                )
            )
        return results


def split_head_outputs(head_outputs: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """RetinaNet's output (a dict, or a list with the classification maps first) -> (cls maps, box maps)."""
    if isinstance(head_outputs, Mapping):
        return list(head_outputs[CLS_KEY]), list(head_outputs[BOX_REG_KEY])
    if isinstance(head_outputs, (list, tuple)) and len(head_outputs) % 2 == 0:
        half = len(head_outputs) // 2
        return list(head_outputs[:half]), list(head_outputs[half:])
    raise TypeError(f"unexpected RetinaNet output of type {type(head_outputs).__name__}")


def _patch_faces(plan: PatchPlan, origin: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A patch's low/high faces (image voxel edges) and whether each is interior (another patch lies beyond)."""
    low = np.asarray(origin, dtype=np.float64)
    high = low + np.asarray(plan.roi_size, dtype=np.float64)
    low_interior = low > 0
    high_interior = high < np.asarray(plan.image_shape, dtype=np.float64)
    return low, high, low_interior, high_interior


def merge_patch_detections(
    plan: PatchPlan,
    per_patch: Sequence[Detections],
    *,
    nms_iou: float,
    max_detections: int,
    border_margin_voxels: float = 1.0,
) -> Detections:
    """Patch results -> image-level boxes (image voxel-edge coordinates, clipped to the unpadded image).

    A box that reaches within ``border_margin_voxels`` of an *interior* face of its patch may be a cut
    object; it is dropped when another patch holds the box clear of that patch's own interior faces (the
    plan's overlap exceeds the largest object, so that patch sees the object whole). The survivors go
    through class-wise NMS at ``nms_iou`` and the ``max_detections`` best are kept.
    """
    if len(per_patch) != len(plan.origins):
        raise ValueError(f"{len(per_patch)} patch results for a plan of {len(plan.origins)} patches")
    dims = len(plan.roi_size)
    faces = [_patch_faces(plan, origin) for origin in plan.origins]
    image_hi = np.asarray(plan.image_shape, dtype=np.float64)
    kept: list[Detections] = []
    for p, det in enumerate(per_patch):
        if not len(det):
            continue
        low, high, low_in, high_in = faces[p]
        boxes = det.boxes.astype(np.float64) + np.concatenate([low, low])
        cut = ((boxes[:, :dims] < low + border_margin_voxels) & low_in).any(axis=1)
        cut |= ((boxes[:, dims:] > high - border_margin_voxels) & high_in).any(axis=1)
        keep = np.ones(len(det), dtype=bool)
        for n in np.flatnonzero(cut):
            keep[n] = not any(_holds(faces[q], boxes[n], border_margin_voxels) for q in range(len(faces)) if q != p)
        boxes[:, :dims] = np.clip(boxes[:, :dims], 0.0, image_hi)
        boxes[:, dims:] = np.clip(boxes[:, dims:], 0.0, image_hi)
        keep &= (boxes[:, dims:] > boxes[:, :dims]).all(axis=1)  # boxes wholly in the padding vanish
        if keep.any():
            kept.append(Detections(boxes[keep].astype(np.float32), det.scores[keep], det.labels[keep]))
    if not kept:
        return Detections.empty(dims)
    merged = Detections(
        np.concatenate([d.boxes for d in kept]),
        np.concatenate([d.scores for d in kept]),
        np.concatenate([d.labels for d in kept]),
    )
    keep_idx = batched_nms(
        torch.from_numpy(merged.boxes),
        torch.from_numpy(merged.scores),
        torch.from_numpy(merged.labels),
        nms_iou,
        box_overlap_metric=box_iou,
        max_proposals=max_detections,
    )
    return merged.take(np.asarray(keep_idx, dtype=np.int64))


def _holds(faces: tuple[np.ndarray, ...], box: np.ndarray, margin: float) -> bool:
    """Whether a patch contains ``box`` at least ``margin`` voxels away from each of its interior faces."""
    low, high, low_in, high_in = faces
    dims = len(low)
    lo_ok = np.where(low_in, box[:dims] >= low + margin, box[:dims] >= low)
    hi_ok = np.where(high_in, box[dims:] <= high - margin, box[dims:] <= high)
    return bool(lo_ok.all() and hi_ok.all())


def boxes_to_findings(
    detections: Detections,
    affine: np.ndarray,
    volume: Volume,
    labels: Sequence[str],
    *,
    min_size_mm: float = 0.0,
) -> list[Finding]:
    """Image boxes (voxel-edge coordinates of the image that ``affine`` maps to LPS mm) -> Findings.

    ``bbox_mm`` is the LPS min/max over the box's 8 corners; ``center_mm`` the box center; ``diameter_mm``
    the longest box side in mm; ``center_voxel`` the center in the *input* volume's voxel indices. Boxes
    whose longest side is under ``min_size_mm`` are dropped. Sorted by decreasing score.
    """
    affine = np.asarray(affine, dtype=np.float64)
    dims = affine.shape[0] - 1
    spacing_mm = np.linalg.norm(affine[:dims, :dims], axis=0)
    findings = []
    for box, score, label in zip(detections.boxes, detections.scores, detections.labels, strict=True):
        lo, hi = edge_to_index(box[:dims]), edge_to_index(box[dims:])
        corners = np.array(list(product(*zip(lo, hi, strict=True))))  # (2**dims, dims) voxel indices
        corners_mm = corners @ affine[:dims, :dims].T + affine[:dims, dims]
        center_mm = affine[:dims, :dims] @ ((lo + hi) / 2.0) + affine[:dims, dims]
        diameter_mm = float(np.max((hi - lo) * spacing_mm))
        if diameter_mm < min_size_mm:
            continue
        source = volume.nearest_source_image(center_mm)
        findings.append(
            Finding(
                label=labels[int(label)],
                score=float(score),
                center_mm=tuple(float(v) for v in center_mm),
                bbox_mm=tuple(float(v) for v in (*corners_mm.min(axis=0), *corners_mm.max(axis=0))),
                diameter_mm=diameter_mm,
                sop_instance_uid=source.sop_instance_uid if source is not None else None,
                center_voxel=tuple(float(v) for v in volume.lps_to_voxel(center_mm)[0]),
            )
        )
    findings.sort(key=lambda f: -f.score)
    return findings
