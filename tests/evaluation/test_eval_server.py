"""`radserve eval` through the real server on generated datasets, checked against a scoring written here plainly.

Every `radserve eval` here runs in a subprocess whose imports of torch, MONAI, scipy, highdicom and the server's
modules raise: eval is a client of the API, like `radserve read` and the archive bridge, and this proves it on
the real command, not on an import of the package alone.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from inference.phantoms.dataset import make_dataset

ROOT = Path(__file__).resolve().parents[2]

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    HEAVY = {"torch", "torchvision", "monai", "scipy", "highdicom", "tritonclient"}
    ALLOWED = {"inference", "inference.api", "inference.client"}
    # The other clients of the API may load (the parser registers the bridge); no module of the server may. The CLI's
    # modules import the server only inside the handlers of server commands.
    ALLOWED_PACKAGES = ("inference.evaluation", "inference.api.gen", "inference.bridge", "inference.cli")

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HEAVY:
                raise ImportError(f"blocked: {name}")
            if name.startswith("inference") and name not in ALLOWED and not any(
                name == p or name.startswith(p + ".") for p in ALLOWED_PACKAGES
            ):
                raise ImportError(f"blocked server module: {name}")
            return None

    sys.meta_path.insert(0, Blocker())
    """
)


def run_eval(*args: str) -> subprocess.CompletedProcess[str]:
    """`radserve eval ARGS` with the heavy and server imports blocked."""
    script = BLOCKER + f"from inference.cli import main\nraise SystemExit(main({['eval', *args]!r}))\n"
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)


def read_json(server, folder: Path, *extra: str) -> dict:
    args = [sys.executable, "-m", "inference.cli", "read", str(folder), "--server", server.target, "--format", "json"]
    result = subprocess.run([*args, *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def image_folder(study: Path, tmp: Path) -> Path:
    """The study's images alone (what a user would point `radserve read` at)."""
    out = tmp / study.name
    out.mkdir(parents=True)
    for path in study.iterdir():
        if path.suffix == ".dcm":
            (out / path.name).symlink_to(path)
    return out


def truth_dims(study: Path) -> str:
    """ "xy" for a projection X-ray study (its DX image), "xyz" for a series."""
    return "xy" if (study / "image.dcm").exists() else "xyz"


def plain_score(truth: list[dict], findings: list[dict]) -> tuple[int, int]:
    """(hits, false positives): findings by decreasing score, each to the nearest free lesion of its label within
    max(radius, 3 mm); every finding left over is a false positive."""
    free = list(range(len(truth)))
    hits = 0
    for finding in sorted(findings, key=lambda f: -f["score"]):
        reach = [
            (math.dist(finding["center_mm"], truth[n]["center_mm"]), n)
            for n in free
            if truth[n]["label"] == finding["label"]
            and math.dist(finding["center_mm"], truth[n]["center_mm"]) <= max(truth[n]["diameter_mm"] / 2, 3.0)
        ]
        if reach:
            free.remove(min(reach)[1])
            hits += 1
    return hits, len(findings) - hits


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("datasets")
    sets = {
        "CT": make_dataset(root / "ct", "CT", 3, seed=7, shape=(128, 128, 48)),
        "DX": make_dataset(root / "dx", "DX", 2, seed=7, shape=(768, 768)),
        "MR": make_dataset(root / "mr", "MR", 3, seed=4, shape=(112, 112, 36)),
    }
    # Truth that no model can agree with, so that misses and false positives are certain: the first study with a
    # lesion loses it from its truth (its finding becomes a false positive), and the next gets a lesion in air.
    ct = sets["CT"]
    with_lesion = [s for s in ct if json.loads((s / "truth.json").read_text())["findings"]]
    truth = json.loads((with_lesion[0] / "truth.json").read_text())
    truth["findings"] = truth["findings"][1:]
    (with_lesion[0] / "truth.json").write_text(json.dumps(truth))
    other = next(s for s in ct if s != with_lesion[0])
    truth = json.loads((other / "truth.json").read_text())
    first = pydicom.dcmread(sorted(other.glob("*.dcm"))[0], stop_before_pixels=True)
    corner = [float(v) + 2.0 for v in first.ImagePositionPatient]  # just inside the field of view, in air
    truth["findings"].append({"label": "nodule", "center_mm": corner, "diameter_mm": 12.0})
    (other / "truth.json").write_text(json.dumps(truth))
    return {modality: folders[0].parent for modality, folders in sets.items()}


@pytest.mark.parametrize(("modality", "model"), [("CT", "lung_nodule_ct"), ("DX", "chest_xray")])
def test_eval_counts_agree_with_a_plain_scoring_of_the_same_findings(server, datasets, tmp_path, modality, model):
    dataset = datasets[modality]
    out = tmp_path / "out"
    result = run_eval(str(dataset), "--server", server.target, "--model", model, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "blocked" not in result.stderr
    report = json.loads((out / "eval.json").read_text())
    assert (out / "froc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    studies = sorted(p for p in dataset.iterdir() if p.is_dir())
    assert f"[{len(studies)}/{len(studies)}]" in result.stderr  # progress, one line per study

    lesions = hits = false_positives = 0
    for study in studies:
        truth = json.loads((study / "truth.json").read_text())["findings"]
        findings = read_json(server, image_folder(study, tmp_path / "images"))["findings"]
        h, fp = plain_score(truth, findings)
        lesions, hits, false_positives = lesions + len(truth), hits + h, false_positives + fp
        per_study = next(s for s in report["per_study"] if s["study"] == study.name)
        eval_centers = np.array([f["center_mm"] for f in per_study["findings"]]).reshape(-1, len(truth_dims(study)))
        read_centers = np.array([f["center_mm"] for f in findings]).reshape(eval_centers.shape)
        assert np.allclose(eval_centers, read_centers, atol=1e-3)  # the same findings, read the same way
    label = {"CT": "nodule", "DX": "opacity"}[modality]
    overall = report["labels"][label]["overall"]
    assert (overall["studies"], overall["lesions"], overall["hits"], overall["false_positives"]) == (
        len(studies),
        lesions,
        hits,
        false_positives,
    )
    assert overall["sensitivity"] == pytest.approx(hits / lesions, abs=1e-4)
    assert overall["fp_per_study"] == pytest.approx(false_positives / len(studies), abs=1e-4)
    assert report["model"] == model and report["model_version"] == "1"
    buckets = report["labels"][label]["buckets"]
    assert sum(b["lesions"] for b in buckets.values()) == lesions and sum(b["hits"] for b in buckets.values()) == hits
    if modality == "CT":  # the truth edited above: at least one miss and one false positive
        assert hits < lesions and false_positives >= 1
    assert f"model {model}:1 on {len(studies)} studies" in result.stdout


def test_dice_and_lesion_wise_detection_agree_with_the_seg_mapped_by_its_references(server, datasets, tmp_path):
    dataset = datasets["MR"]
    out = tmp_path / "out"
    result = run_eval(str(dataset), "--server", server.target, "--model", "brain_lesion_mr", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "eval.json").read_text())
    segmentation = report["labels"]["lesion"]["segmentation"]
    assert segmentation["studies"] == 3

    measured = 0
    for study in sorted(p for p in dataset.iterdir() if p.is_dir()):
        truth = np.asarray(nib.load(study / "mask.nii.gz").dataobj)
        seg_path = tmp_path / f"{study.name}.seg.dcm"
        body = read_json(server, image_folder(study, tmp_path / "images"), "--seg", str(seg_path))
        predicted = np.zeros(truth.shape, dtype=bool)
        if body["findings"]:
            # Independently of eval's geometry: a frame's source image by UID, its slice by file name (slice order).
            slice_of = {
                pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: int(p.stem.split("_")[1])
                for p in study.glob("*.dcm")
            }
            seg = pydicom.dcmread(seg_path)
            frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
            for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
                source = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                predicted[:, :, slice_of[source]] |= frame.T.astype(bool)
        per_study = next(s for s in report["per_study"] if s["study"] == study.name)
        counts = per_study["segmentation"]["voxels"].get("lesion", {"intersection": 0, "truth": 0, "predicted": 0})
        assert counts == {
            "intersection": int(np.sum(predicted & (truth > 0))),
            "truth": int(np.sum(truth > 0)),
            "predicted": int(predicted.sum()),
        }
        covered = [
            None if not np.any(truth == n) else bool(np.any(predicted & (truth == n)))
            for n in range(1, len(per_study["truth"]) + 1)
        ]
        assert per_study["segmentation"]["lesion_covered"] == covered
        measured += int(np.sum(truth > 0) > 0)
    assert segmentation["dice_per_study"]["studies"] == measured > 0
    assert "segmentation over 3 studies with masks: Dice per study mean" in result.stdout


def test_compare_reports_paired_differences_of_two_versions(server, datasets, tmp_path):
    out = tmp_path / "out"
    args = ["--server", server.target, "--model", "brain_lesion_mr:1", "--compare", "brain_lesion_mr:1"]
    result = run_eval(str(datasets["MR"]), *args, "--out", str(out), "--resamples", "200")
    assert result.returncode == 0, result.stderr
    paired = json.loads((out / "eval.json").read_text())["compare"]["paired"]
    assert paired["a"] == paired["b"] == "brain_lesion_mr:1" and paired["studies"] == 3
    lesion = paired["labels"]["lesion"]
    # One version against itself: every difference and interval is zero, no lesion is found by one only.
    assert lesion["sensitivity"]["difference"] == 0.0 and lesion["sensitivity"]["ci95"] == [0.0, 0.0]
    assert lesion["lesions"]["only_a"] == lesion["lesions"]["only_b"] == 0
    assert "paired over 3 studies: a = brain_lesion_mr:1, b = brain_lesion_mr:1" in result.stdout


def test_a_read_that_fails_stops_the_evaluation_naming_the_study(server, datasets):
    result = run_eval(str(datasets["MR"]), "--server", server.target, "--model", "brain_lesion_mr:99")
    assert result.returncode == 1
    assert "error: study study_000" in result.stderr and ": NOT_FOUND: " in result.stderr
