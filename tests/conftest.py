"""Shared test set-up: the `cuda` marker skips without a GPU; one real server per module that asks; model repositories
holding one bundled model, for modules that start their own server."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """The real server, with the bundled models on the CPU, on a free loopback port."""
    from inference.serverproc import ServerProcess

    log_path = tmp_path_factory.mktemp("server") / "server.log"
    proc = ServerProcess(models=ROOT / "models", device="cpu", log_path=log_path, extra_args=["--log-level", "DEBUG"])
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``model_repo(name)``: a new model repository holding only the bundled model ``name``.

    A server on it warms up one model rather than every bundled one, keeps answering "no model reads this modality"
    for the others when models are added to models/, and does not see models/ change while it runs: the model's
    files are copied (its training script and caches left out).
    """

    def make(name: str) -> Path:
        repo = tmp_path_factory.mktemp("models")
        shutil.copytree(ROOT / "models" / name, repo / name, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
        return repo

    return make


@pytest.fixture(scope="session")
def sr_finding_groups() -> Callable:
    """``sr_finding_groups(sr)``: a radserve SR's measurement groups per finding, read with highdicom.

    A list in finding order (tracking identifier "finding N"), each a dict of the finding's groups by role:
    "outline" and "center" (TID 1410, told apart by their geometric purpose), "center_3d" (TID 1411 volume surface)
    and "segment" (TID 1411 referenced segment); a role the report lacks is absent.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    def purpose(group) -> str | None:
        for item in group[0].ContentSequence:
            if item.ConceptNameCodeSequence[0].CodeValue == "130400":
                return str(item.ConceptCodeSequence[0].CodeValue)
        return None

    def read(sr: hd.sr.Comprehensive3DSR) -> list[dict]:
        found: dict[int, dict] = {}
        for group in sr.content.get_planar_roi_measurement_groups():
            role = "outline" if purpose(group) == codes.DCM.Outline.value else "center"
            number = int(group.tracking_identifier.removeprefix("finding "))
            assert role not in found.setdefault(number, {}), f"two {role} groups for finding {number}"
            found[number][role] = group
        for group in sr.content.get_volumetric_roi_measurement_groups():
            role = "segment" if group.reference_type == codes.DCM.ReferencedSegment else "center_3d"
            number = int(group.tracking_identifier.removeprefix("finding "))
            assert role not in found.setdefault(number, {}), f"two {role} groups for finding {number}"
            found[number][role] = group
        assert sorted(found) == list(range(1, len(found) + 1)), sorted(found)
        return [found[number] for number in sorted(found)]

    return read
