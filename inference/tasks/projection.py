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
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from inference.errors import InvalidInputError
from inference.io.volume import Volume
from inference.modelrepo.schema import ModelConfig, PreprocessConfig
from inference.tasks.base import PreparedStudy, Task, TaskResult
from inference.tasks.postprocess.detection import Detections, RetinaNetDecoder
from inference.tasks.postprocess.projection import ProjectionGeometry, image_sop_instance_uid, projection_findings
from inference.tasks.preprocess import zscore_foreground

logger = logging.getLogger(__name__)

__all__ = ["ProjectionContext", "ProjectionDetectionTask", "normalize_and_pad", "prepare_image"]


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
            sop_instance_uid=image_sop_instance_uid(volume),
        )
        return TaskResult(findings)
