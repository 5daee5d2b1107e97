"""2-D detection on projection radiographs (CR, DX): one whole image per work item, findings on the image plane.

``prepare`` resamples the image onto the model's input grid and normalises it (:func:`prepare_image`):

* Resampling: one pixel size in mm on both axes, so round things stay round and the aspect ratio is kept.
  The pixel size is ``preprocessing.spacing_mm`` (X = column, Y = row) enlarged by a common factor until the
  field of view fits ``inferer.roi_size`` (X, Y): with a small ``spacing_mm`` every image fills the input
  along its longer side (the finest detail the input allows), with a large one every image whose field of
  view fits has the same mm per pixel (objects of a given size in mm are the same size in pixels). The
  resampled image sits at the low corner of the input; the rest is padded with ``preprocessing.b_min``.
  Downsampling is antialiased bilinear.
* Intensities: ``preprocessing.normalize: percentile`` maps the ``percentile_low``..``percentile_high``
  range of the resampled image to ``[b_min, b_max]`` (clipped when ``clip``): X-ray stored values have no
  fixed scale across 12- and 16-bit detectors and processing. The image must be in the MONOCHROME2 sense
  (higher = more attenuation); inverting MONOCHROME1 is the reader's job, as applying the rescale is for CT.

Items are (C, X, Y) tensors in the Volume's axis order (column axis first), so network boxes are
``[x0, y0, x1, y1]`` = ``[column0, row0, column1, row1]`` in input-grid voxel-edge coordinates (the box
convention of :mod:`inference.tasks.postprocess.detection`); every item of a model has the same shape, so images
from many requests share a forward pass. ``split_outputs`` decodes with the 3-D detector's
:class:`~inference.tasks.postprocess.detection.RetinaNetDecoder` (it is dimension-agnostic). ``finalize`` maps boxes
back to source pixels and then to the projection contract's image-plane mm (:func:`projection_findings`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from inference.errors import InvalidInputError
from inference.io.volume import Volume
from inference.modelrepo.schema import ModelConfig, PreprocessConfig
from inference.outputs.finding import Finding
from inference.tasks.base import PreparedStudy, Task, TaskResult
from inference.tasks.postprocess.detection import Detections, RetinaNetDecoder
from inference.tasks.preprocess import zscore_foreground

logger = logging.getLogger(__name__)

__all__ = [
    "ProjectionContext",
    "ProjectionDetectionTask",
    "ProjectionGeometry",
    "normalize_and_pad",
    "prepare_image",
    "projection_findings",
]


@dataclass(frozen=True)
class ProjectionGeometry:
    """Where the network input grid lies on the source image; every pair is (column axis, row axis).

    Input pixel ``u`` covers source pixel edges ``[u * scale, (u + 1) * scale)``, so its center is source
    pixel index ``(u + 0.5) * scale - 0.5`` (antialiased resampling with ``align_corners=False``), and a
    source pixel index ``c`` lies at ``c * spacing_mm`` on the image plane (the projection contract).
    """

    image_shape: tuple[int, int]  # source (columns, rows)
    spacing_mm: tuple[float, float]  # source (column spacing, row spacing)
    input_shape: tuple[int, int]  # network input (X, Y)
    resized_shape: tuple[int, int]  # the resampled image inside the input, at its low corner

    @classmethod
    def plan(
        cls,
        image_shape: Sequence[int],
        spacing_mm: Sequence[float],
        input_shape: Sequence[int],
        target_spacing_mm: Sequence[float],
    ) -> ProjectionGeometry:
        """Target pixel size ``target_spacing_mm``, times a common factor when the field of view would not fit."""
        shape = np.asarray(image_shape, dtype=np.float64)
        spacing = np.asarray(spacing_mm, dtype=np.float64)
        size = np.asarray(input_shape, dtype=np.float64)
        target = np.asarray(target_spacing_mm, dtype=np.float64)
        if shape.shape != (2,) or spacing.shape != (2,) or size.shape != (2,) or target.shape != (2,):
            raise ValueError("image_shape, spacing_mm, input_shape and target_spacing_mm must each have 2 entries")
        if np.any(shape < 1) or np.any(spacing <= 0) or np.any(target <= 0):
            raise ValueError(f"invalid image shape {tuple(image_shape)} or spacing {tuple(spacing_mm)} mm")
        fov_mm = shape * spacing
        zoom = max(1.0, float(np.max(fov_mm / (size * target))))
        resized = np.clip(np.rint(fov_mm / (target * zoom)), 1, size).astype(int)
        return cls(
            image_shape=(int(shape[0]), int(shape[1])),
            spacing_mm=(float(spacing[0]), float(spacing[1])),
            input_shape=(int(size[0]), int(size[1])),
            resized_shape=(int(resized[0]), int(resized[1])),
        )

    @property
    def scale(self) -> tuple[float, float]:
        """Source pixels per input pixel, per axis."""
        return (
            self.image_shape[0] / self.resized_shape[0],
            self.image_shape[1] / self.resized_shape[1],
        )

    @property
    def input_spacing_mm(self) -> tuple[float, float]:
        """Image-plane mm between neighbouring input pixel centers, per axis."""
        return (self.spacing_mm[0] * self.scale[0], self.spacing_mm[1] * self.scale[1])

    @property
    def input_origin_mm(self) -> tuple[float, float]:
        """Image-plane (x, y) mm of the center of input pixel (0, 0)."""
        return (
            (0.5 * self.scale[0] - 0.5) * self.spacing_mm[0],
            (0.5 * self.scale[1] - 0.5) * self.spacing_mm[1],
        )

    def input_edges_to_pixels(self, boxes: np.ndarray) -> np.ndarray:
        """(N, 4) input-grid edge boxes ``[x0, y0, x1, y1]`` -> source pixel-index coordinates (centers at integers)."""
        boxes = np.atleast_2d(np.asarray(boxes, dtype=np.float64))
        scale = np.tile(np.asarray(self.scale), 2)
        return boxes * scale - 0.5

    def pixels_to_mm(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 2k) source pixel-index coordinates, (column, row) pairs -> image-plane mm."""
        pixels = np.atleast_2d(np.asarray(pixels, dtype=np.float64))
        return pixels * np.tile(np.asarray(self.spacing_mm), pixels.shape[1] // 2)

    def mm_to_input_edges(self, points_mm: np.ndarray) -> np.ndarray:
        """(N, 2) image-plane (x, y) mm -> input-grid edge coordinates (inverse of the two maps above)."""
        points = np.atleast_2d(np.asarray(points_mm, dtype=np.float64))
        return (points / np.asarray(self.spacing_mm) + 0.5) / np.asarray(self.scale)


@dataclass(frozen=True)
class ProjectionContext:
    """What ``finalize`` needs from ``prepare``."""

    geometry: ProjectionGeometry


def prepare_image(
    pixels: torch.Tensor, geometry: ProjectionGeometry, cfg: PreprocessConfig, in_channels: int = 1
) -> torch.Tensor:
    """Source image (X, Y) -> network input (C, *geometry.input_shape): resample, normalise, pad."""
    image = pixels.to(torch.float32)[None, None]
    if tuple(image.shape[2:]) != geometry.resized_shape:
        image = F.interpolate(image, size=geometry.resized_shape, mode="bilinear", align_corners=False, antialias=True)
    return normalize_and_pad(image[0, 0], geometry, cfg, in_channels)


def normalize_and_pad(
    resized: torch.Tensor, geometry: ProjectionGeometry, cfg: PreprocessConfig, in_channels: int = 1
) -> torch.Tensor:
    """An image already on the input grid (``geometry.resized_shape``) -> (C, *geometry.input_shape).

    Training renders phantoms straight onto the input grid and joins :func:`prepare_image` here.
    """
    if tuple(resized.shape) != geometry.resized_shape:
        raise ValueError(f"image of shape {tuple(resized.shape)} is not on the input grid {geometry.resized_shape}")
    image = resized.to(torch.float32)
    if cfg.normalize == "zscore":
        image = (image - image.mean()) / image.std().clamp_min(1e-6)
    elif cfg.normalize == "zscore_foreground":
        image = zscore_foreground(image, cfg.foreground_fraction, cfg.percentile_high)
    else:
        if cfg.normalize == "percentile":
            q = torch.tensor([cfg.percentile_low / 100.0, cfg.percentile_high / 100.0], device=image.device)
            low, high = torch.quantile(image.flatten(), q)
        else:
            low, high = torch.tensor(cfg.a_min), torch.tensor(cfg.a_max)
        image = (image - low) / (high - low).clamp_min(1e-6) * (cfg.b_max - cfg.b_min) + cfg.b_min
        if cfg.clip:
            image = image.clamp(cfg.b_min, cfg.b_max)
    pad_x = geometry.input_shape[0] - geometry.resized_shape[0]
    pad_y = geometry.input_shape[1] - geometry.resized_shape[1]
    if pad_x or pad_y:
        image = F.pad(image, (0, pad_y, 0, pad_x), mode="constant", value=cfg.b_min)  # last axis first
    return image[None].expand(in_channels, -1, -1).contiguous()


def projection_findings(
    detections: Detections,
    geometry: ProjectionGeometry,
    labels: Sequence[str],
    *,
    min_size_mm: float = 0.0,
    sop_instance_uid: str | None = None,
) -> list[Finding]:
    """Input-grid boxes -> Findings on the image plane, sorted by decreasing score.

    Boxes are clipped to the resampled image (the padding holds nothing), mapped to source pixel indices
    (``center_voxel`` = ``center_px`` = (column, row)) and to image-plane mm: ``center_mm`` [x, y],
    ``bbox_mm`` [x0, y0, x1, y1], ``diameter_mm`` the longest box side. Boxes whose longest side is under
    ``min_size_mm`` are dropped.
    """
    if len(detections) == 0:
        return []
    boxes = np.asarray(detections.boxes, dtype=np.float64).reshape(-1, 4)
    limit = np.tile(np.asarray(geometry.resized_shape, dtype=np.float64), 2)
    boxes = np.clip(boxes, 0.0, limit)
    pixels = geometry.input_edges_to_pixels(boxes)
    boxes_mm = geometry.pixels_to_mm(pixels)
    findings = []
    for box_px, box_mm, score, label in zip(pixels, boxes_mm, detections.scores, detections.labels, strict=True):
        sides_mm = box_mm[2:] - box_mm[:2]
        if np.any(sides_mm <= 0) or float(sides_mm.max()) < min_size_mm:
            continue
        findings.append(
            Finding(
                label=labels[int(label)],
                score=float(score),
                center_mm=tuple(float(v) for v in (box_mm[:2] + box_mm[2:]) / 2.0),
                bbox_mm=tuple(float(v) for v in box_mm),
                diameter_mm=float(sides_mm.max()),
                sop_instance_uid=sop_instance_uid,
                center_voxel=tuple(float(v) for v in (box_px[:2] + box_px[2:]) / 2.0),
            )
        )
    findings.sort(key=lambda f: -f.score)
    return findings


class ProjectionDetectionTask(Task):
    """RetinaNet detection on whole projection images; see the module docstring."""

    def __init__(self, config: ModelConfig, device: torch.device, *, score_threshold: float | None = None) -> None:
        """``score_threshold`` overrides ``postprocessing.score_threshold`` (threshold tuning, FROC curves)."""
        super().__init__(config, device)
        if config.task != "detection" or config.detector is None:
            raise ValueError(f"model {config.name!r} is not a detection model with a 'detector' section")
        if len(config.inferer.roi_size) != 2:
            raise ValueError(f"model {config.name!r}: a projection model needs a 2-D inferer.roi_size (X, Y)")
        self.input_shape = (int(config.inferer.roi_size[0]), int(config.inferer.roi_size[1]))
        self.in_channels = int(config.network.args.get("in_channels", 1))
        self.decoder = RetinaNetDecoder(config.detector, config.postprocessing, score_threshold=score_threshold)
        if self.decoder.spatial_dims != 2:
            raise ValueError(f"model {config.name!r}: detector.base_anchor_shapes must be 2-D (width, height)")

    @property
    def item_shape(self) -> tuple[int, ...]:
        return (self.in_channels, *self.input_shape)

    def plan(self, volume: Volume) -> ProjectionGeometry:
        if volume.shape[2] != 1:
            raise InvalidInputError(
                f"a projection image has one frame; got {volume.shape[2]} slices of {volume.shape[0]}x{volume.shape[1]}"
            )
        spacing = volume.spacing_mm
        return ProjectionGeometry.plan(
            volume.shape[:2], spacing[:2], self.input_shape, self.config.preprocessing.spacing_mm
        )

    def prepare(self, volume: Volume) -> PreparedStudy:
        start = time.perf_counter()
        geometry = self.plan(volume)
        pixels = torch.as_tensor(np.asarray(volume.voxels[:, :, 0], dtype=np.float32)).to(self.device)
        item = prepare_image(pixels, geometry, self.config.preprocessing, self.in_channels)
        preprocess_ms = (time.perf_counter() - start) * 1e3
        logger.debug(
            "prepared %s image %s at %.3fx%.3f mm -> %s in %s",
            volume.modality,
            geometry.image_shape,
            *geometry.spacing_mm,
            geometry.resized_shape,
            geometry.input_shape,
        )
        return PreparedStudy(
            items=[item], context=ProjectionContext(geometry), timing_ms={"resample_normalize": preprocess_ms}
        )

    def split_outputs(self, outputs: object, batch_size: int) -> list[Detections]:
        detections = self.decoder(outputs, self.input_shape)
        if len(detections) != batch_size:
            raise ValueError(f"network output holds {len(detections)} items, expected {batch_size}")
        return detections

    def finalize(self, volume: Volume, prepared: PreparedStudy, results: list[Detections]) -> TaskResult:
        """Findings on the image plane, without masks (the SEG renders the boxes, inference.outputs.regions)."""
        if len(results) != 1:
            raise ValueError(f"a projection image is one work item, got {len(results)} results")
        context: ProjectionContext = prepared.context
        findings = projection_findings(
            results[0],
            context.geometry,
            self.config.labels,
            min_size_mm=self.config.postprocessing.min_size_mm,
            sop_instance_uid=_sop_instance_uid(volume),
        )
        return TaskResult(findings)


def _sop_instance_uid(volume: Volume) -> str | None:
    """The UID of the instance (or frame) the image came from, for DICOM input."""
    if volume.source is None:
        return None
    for image in volume.source.images:
        if image.slice_index == 0:
            return image.sop_instance_uid
    return None
