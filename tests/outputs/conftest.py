"""A small chest CT written as DICOM and read back, with findings made from its planted truth."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference.io.dicom import read_dicom_series
from inference.io.volume import Volume
from inference.outputs.finding import Finding
from inference.phantoms import PlantedLesion, make_chest_ct, write_dicom_series

SCORES = (0.91, 0.42)


@dataclass(frozen=True)
class CtStudy:
    volume: Volume  # read back from the DICOM files, with SourceRefs
    datasets: tuple[pydicom.Dataset, ...]  # the written instances without pixel data, file order
    lesions: tuple[PlantedLesion, ...]
    findings: tuple[Finding, ...]


def findings_from_truth(volume: Volume, lesions: tuple[PlantedLesion, ...]) -> tuple[Finding, ...]:
    """What a perfect detector would report: the planted centers, diameters and volumes."""
    findings = []
    for lesion, score in zip(lesions, SCORES, strict=False):
        center = np.asarray(lesion.center_mm)
        half = lesion.diameter_mm / 2.0
        nearest = volume.nearest_source_image(center)
        findings.append(
            Finding(
                label=lesion.label,
                score=score,
                center_mm=tuple(float(v) for v in center),
                bbox_mm=tuple(float(v) for v in np.r_[center - half, center + half]),
                diameter_mm=lesion.diameter_mm,
                volume_ml=lesion.volume_ml,
                sop_instance_uid=nearest.sop_instance_uid if nearest is not None else None,
                center_voxel=tuple(float(v) for v in volume.lps_to_voxel(center)[0]),
            )
        )
    return tuple(findings)


@pytest.fixture(scope="session")
def ct_study(tmp_path_factory: pytest.TempPathFactory) -> CtStudy:
    phantom = make_chest_ct(7, shape=(64, 64, 16), pixel_spacing_mm=0.7, slice_spacing_mm=2.0, n_nodules=2)
    assert len(phantom.lesions) == 2
    paths = write_dicom_series(phantom, tmp_path_factory.mktemp("ct"), shuffle=np.random.default_rng(1))
    volume = read_dicom_series(paths)
    datasets = tuple(pydicom.dcmread(p, stop_before_pixels=True) for p in paths)
    return CtStudy(volume, datasets, phantom.lesions, findings_from_truth(volume, phantom.lesions))


@pytest.fixture(scope="session")
def dciodvfy_errors() -> Callable[[Path], list[str]]:
    """A function returning dciodvfy's Error lines for a file; skips the test without dciodvfy."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")

    def run(path: Path) -> list[str]:
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        return [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]

    return run
