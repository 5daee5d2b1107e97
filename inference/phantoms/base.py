"""Types shared by all synthetic studies: a volume plus the ground truth planted in it."""

from __future__ import annotations

from dataclasses import dataclass

from inference.io.volume import Volume


@dataclass(frozen=True)
class PlantedLesion:
    """Ground truth for one planted lesion, in DICOM patient coordinates (LPS, mm)."""

    label: str  # e.g. "nodule"
    center_mm: tuple[float, float, float]
    diameter_mm: float  # longest diameter
    volume_ml: float | None = None


@dataclass(frozen=True)
class Phantom:
    volume: Volume  # voxels in modality units (HU for CT), affine voxel -> LPS mm
    lesions: tuple[PlantedLesion, ...]
