"""The Finding: one suspicious region for a radiologist to review, in patient coordinates."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Finding:
    label: str
    score: float
    # 3-D studies: LPS mm. Projection X-ray: [x, y] mm on the image plane (DESIGN.md contract).
    center_mm: tuple[float, ...]
    bbox_mm: tuple[float, ...]  # [x0, y0, z0, x1, y1, z1] (or [x0, y0, x1, y1] on an X-ray image plane)
    diameter_mm: float  # longest diameter
    volume_ml: float | None = None
    sop_instance_uid: str | None = None  # the source image nearest to center_mm (DICOM input only)
    center_voxel: tuple[float, ...] | None = None  # [i, j, k] in the input volume (X-ray: center_px [col, row])

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["center_mm"] = [round(float(v), 3) for v in self.center_mm]
        data["bbox_mm"] = [round(float(v), 3) for v in self.bbox_mm]
        data["score"] = round(float(self.score), 4)
        data["diameter_mm"] = round(float(self.diameter_mm), 3)
        if self.center_voxel is not None:
            data["center_voxel"] = [round(float(v), 2) for v in self.center_voxel]
        if self.volume_ml is not None:
            data["volume_ml"] = round(float(self.volume_ml), 4)
        return {k: v for k, v in data.items() if v is not None}
