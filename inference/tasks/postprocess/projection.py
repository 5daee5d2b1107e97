"""Projection X-ray postprocessing: boxes on the model's input grid -> source pixels -> Findings in image-plane mm
(the projection contract of DESIGN.md: x = column x column spacing, y = row x row spacing from the center of the
top-left pixel), and the geometry that maps between them (made by the task's preprocessing)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from inference.io.volume import Volume
from inference.outputs.finding import Finding
from inference.tasks.postprocess.detection import Detections


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


def image_sop_instance_uid(volume: Volume) -> str | None:
    """The UID of the instance (or frame) the image came from, for DICOM input."""
    if volume.source is None:
        return None
    for image in volume.source.images:
        if image.slice_index == 0:
            return image.sop_instance_uid
    return None
