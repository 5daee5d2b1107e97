"""The Volume: voxels plus the geometry that places them in the patient.

Conventions (see docs/decisions.md, "Coordinates"):

* ``voxels`` is indexed ``[i, j, k]`` = ``[column, row, slice]`` of the source images, i.e. the DICOM
  pixel array of slice k transposed. For NIfTI it is the file's own (i, j, k) order.
* ``affine`` is a 4x4 float64 matrix mapping the voxel index ``(i, j, k, 1)`` of a voxel *center* to
  DICOM patient coordinates (LPS, mm). Column 0 is ImageOrientationPatient[0:3] x column spacing,
  column 1 is ImageOrientationPatient[3:6] x row spacing, column 2 is the step between consecutive
  slices, column 3 is ImagePositionPatient of slice 0.
* Projection X-ray is a volume with one slice; its findings are reported on the image plane.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# LPS <-> RAS: negate the first two world axes. Its own inverse.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class SourceImage:
    """One source DICOM instance (or frame) that contributed slice ``slice_index`` of the volume."""

    sop_instance_uid: str
    sop_class_uid: str
    slice_index: int
    frame_number: int | None = None  # 1-based, for multi-frame instances


@dataclass(frozen=True)
class SourceRefs:
    """DICOM context of a volume read from DICOM: what derived objects (SR, SEG) must reference.

    ``header`` is the first instance's dataset without pixel data; it carries the patient and study
    attributes a derived object copies. It is never logged.
    """

    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str | None
    images: tuple[SourceImage, ...]
    header: object | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Volume:
    voxels: np.ndarray  # (X, Y, Z), float32, modality units (HU for CT)
    affine: np.ndarray  # (4, 4) float64, voxel index -> LPS mm
    modality: str  # DICOM Modality: CT, MR, CR, DX
    source: SourceRefs | None = None
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.voxels.ndim != 3:
            raise ValueError(f"Volume.voxels must be 3-D (X, Y, Z), got shape {self.voxels.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"Volume.affine must be 4x4, got {self.affine.shape}")
        if not np.all(np.isfinite(self.affine)) or abs(np.linalg.det(self.affine[:3, :3])) < 1e-9:
            raise ValueError("Volume.affine must be finite and invertible")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.voxels.shape)  # type: ignore[return-value]

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Distance between neighbouring voxel centers along i, j, k."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    def voxel_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """Map (N, 3) voxel indices (may be fractional) to (N, 3) LPS mm."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def lps_to_voxel(self, xyz: np.ndarray) -> np.ndarray:
        """Map (N, 3) LPS mm to (N, 3) fractional voxel indices."""
        xyz = np.atleast_2d(np.asarray(xyz, dtype=np.float64))
        inv = np.linalg.inv(self.affine)
        return xyz @ inv[:3, :3].T + inv[:3, 3]

    def nearest_source_image(self, xyz: np.ndarray) -> SourceImage | None:
        """The source image whose slice is nearest to the LPS point ``xyz``, or None without DICOM context."""
        if self.source is None or not self.source.images:
            return None
        k = float(self.lps_to_voxel(xyz)[0, 2])
        k_index = int(np.clip(round(k), 0, self.shape[2] - 1))
        by_slice = {img.slice_index: img for img in self.source.images}
        return by_slice.get(k_index)
