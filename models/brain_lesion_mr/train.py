"""Train ``brain_lesion_mr`` (a small 3-D U-Net) on synthetic brain MR phantoms and evaluate it as the service reads.

    .venv/bin/python models/brain_lesion_mr/train.py --out models/brain_lesion_mr/1 [--iterations N] [--seed S]
        [--eval-studies N]

Writes to ``--out``: ``model.yaml``, ``model.pt`` (float32 state dict), ``metrics.json`` and ``MODEL_CARD.md``.
Everything is seeded: the same arguments on the same machine give the same weights, and the committed
version is what the defaults produce.

1. Training phantoms (``sample_brain_mr_params``: the generator's full ranges, 1-3 lesions asked for each),
   preprocessed by the model's own ``preprocess()`` and cached in memory; the target is ``lesion_mask()``
   evaluated at the voxel centers of the preprocessed grid (exact, no label resampling).
2. Training: MONAI's DiceCELoss (softmax; Dice of the lesion channel over the batch, plus cross-entropy) on
   random crops, most of them holding a lesion voxel (lesions equally likely, whatever their size); random
   flips and intensity jitter; Adam with warm-up and cosine decay.
3. Validation phantoms (their own seed): read through ``run_direct``, finalized at a grid of probability
   thresholds; the committed threshold has the best sensitivity where no study has more than one false
   positive.
4. Test phantoms (their own seed, the generator's full ranges, 0-3 lesions): read through ``run_direct`` -
   the code path of the service - for Dice on the input grid, lesion sensitivity (finding center within
   3 mm of the planted centroid), false positives per study and the reading time of typical studies.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: on a shared, oversubscribed CPU, spinning worker threads slow training ~10x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import datetime
import json
import logging
import math
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from scipy import ndimage

from inference.io.volume import Volume
from inference.modelrepo.schema import ModelConfig
from inference.outputs.finding import Finding
from inference.phantoms.brain_mr import BrainMRParams, lesion_mask, render_brain_mr, sample_brain_mr_params
from inference.tasks.base import PreparedStudy, TaskResult
from inference.tasks.direct import run_direct
from inference.tasks.preprocess import preprocess
from inference.tasks.segmentation import SegmentationTask
from inference.training import (
    crop_with_padding,
    machine_info,
    match_by_score,
    rng_stream,
    setup,
    time_reads,
    warmup_cosine,
    write_model_yaml,
)

logger = logging.getLogger("train_brain_lesion_mr")

SPACING_MM = 1.5  # a 5 mm lesion is 3-4 voxels across
MODEL_YAML: dict[str, Any] = {
    "name": "brain_lesion_mr",
    "task": "segmentation",
    "modalities": ["MR"],
    "labels": ["lesion"],
    "description": (
        "Focal brain lesions (5-40 mm, brighter or darker than the parenchyma) on T1-like MR. A small MONAI "
        "U-Net trained on synthetic phantoms only: research and demo use, not for clinical use."
    ),
    # The bias field is divided out before the z-score (a polynomial fit, inference/tasks/preprocess.py).
    "preprocessing": {"spacing_mm": [SPACING_MM] * 3, "normalize": "zscore_foreground", "bias_correction_degree": 2},
    "network": {
        "target": "monai.networks.nets.UNet",
        "args": {
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 2,  # background + lesion, softmax
            "channels": [16, 32, 64, 128],
            "strides": [2, 2, 2],
            "num_res_units": 2,
            # Batch norm, not instance norm: in eval mode it uses running statistics, so a prediction does not
            # depend on what else a patch holds (training crops and inference patches differ in size), and it
            # is several times faster on the CPU.
            "norm": "batch",
        },
        "weights": "model.pt",
    },
    # 96x96x64 voxels = 144x144x96 mm: a 250 mm field of view in 2x2 patches a plane; divisible by the total stride 8.
    # The smallest study read (FAILED_PRECONDITION below it): a slab of the head holding its smallest lesions whole.
    "input": {"min_shape": [16, 16, 4], "min_extent_mm": [40, 40, 12]},
    "inferer": {"roi_size": [96, 96, 64], "overlap": 0.25},
    "postprocessing": {"score_threshold": 0.5, "min_volume_ml": 0.01, "min_size_mm": 0.0, "max_detections": 10},
    "batching": {"max_batch_size": 4, "max_queue_delay_ms": 5.0},
    "autocast": "bf16",
    "promote": "auto",  # bundled versions take default routing once READY (docs/decisions.md)
}


@dataclass(frozen=True)
class TrainSettings:
    """One recipe; the defaults are version 1's (RECIPES)."""

    iterations: int = 3000
    batch_size: int = 4
    crop_voxels: tuple[int, int, int] = (48, 48, 48)  # 72 mm: a 40 mm lesion with its surroundings, cheap on a CPU
    positive_fraction: float = 0.6  # crops holding a lesion voxel
    # A positive crop's lesion is drawn with probability proportional to (its voxel count)^(-exponent / 3), i.e.
    # 1 / diameter^exponent: 0 draws lesions uniformly (a small lesion as often as a large one), 1 favours small
    # lesions by their size ratio (a 5 mm lesion 8x as often as a 40 mm one).
    lesion_size_exponent: float = 0.0
    # Dice per crop (a crop with a small lesion weighs as much as one with a large lesion) instead of over the
    # batch (where the voxels of large lesions outweigh small ones).
    dice_per_crop: bool = False
    head_fraction: float = 0.2  # crops centered in the head, lesion or not: the hard negatives; the rest anywhere
    learning_rate: float = 2e-3
    warmup_iterations: int = 20
    train_phantoms: int = 80
    max_lesions_per_training_phantom: int = 3
    val_phantoms: int = 10
    threshold_grid: tuple[float, ...] = (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)
    max_fp_per_study: int = 1  # validation constraint on the tuned threshold
    # postprocessing.min_score: the lowest score of a validation hit less this margin, down to a multiple of
    # min_score_step: no validation hit is lost, and the weak components a voxel threshold leaves are.
    min_score_margin: float = 0.05
    min_score_step: float = 0.05
    # ... and never under this: the validation phantoms come from the training generator, on which a weak component
    # is almost always a lesion; on phantoms written apart from it they are mostly not (docs/decisions.md).
    min_score_floor: float = 0.0
    hit_tolerance_mm: float = 3.0
    small_lesion_mm: float = 10.0  # sensitivity is also reported below / above this diameter
    timing_studies: int = 3
    timing_shape: tuple[int, int, int] = (256, 256, 160)  # a 3-D T1 at 1 mm
    timing_spacing_mm: float = 1.0


# The committed versions and the settings that wrote them; the version directory's name picks its recipe.
RECIPES: dict[str, TrainSettings] = {
    "1": TrainSettings(),
    # Small lesions: positive crops favour them, Dice per crop, more phantoms (so more distinct small lesions),
    # longer training; the threshold and the score floor tuned on 3x the validation studies, the floor at least 0.6.
    "2": TrainSettings(
        iterations=5000,
        train_phantoms=120,
        val_phantoms=30,
        lesion_size_exponent=1.0,
        dice_per_crop=True,
        threshold_grid=(0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9),
        min_score_floor=0.6,
    ),
}


def draw_params(rng: np.random.Generator, n_lesions: int | None, **kwargs: Any) -> BrainMRParams:
    """A phantom's parameters; asks for ``n_lesions`` and falls back to the drawn count if they do not fit."""
    seed = int(rng.integers(2**31))
    try:
        return sample_brain_mr_params(seed, n_lesions=n_lesions, **kwargs)
    except ValueError:  # the brain in this field of view cannot hold that many lesions
        return sample_brain_mr_params(seed, **kwargs)


@dataclass
class TrainingStudy:
    image: torch.Tensor  # (1, X, Y, Z) float16, preprocessed
    label: torch.Tensor  # (1, X, Y, Z) uint8: 1 where the voxel center lies in a planted lesion
    lesion_voxels: list[np.ndarray]  # per connected lesion, (N, 3) indices of its voxels: for positive crops
    head_voxels: np.ndarray  # (M, 3) indices of every 4th voxel per axis inside the head: for negative crops


def build_training_set(config: ModelConfig, seed: int, settings: TrainSettings) -> list[TrainingStudy]:
    rng = rng_stream(seed, "train")
    studies = []
    n_lesions = 0
    for n in range(settings.train_phantoms):
        params = draw_params(rng, int(rng.integers(1, settings.max_lesions_per_training_phantom + 1)))
        phantom = render_brain_mr(params)
        n_lesions += len(phantom.lesions)
        pre = preprocess(phantom.volume, config.preprocessing)
        label = lesion_mask(params, affine=pre.affine, shape=pre.image.shape[1:])
        components, count = ndimage.label(label)
        lesion_voxels = [np.argwhere(components == n) for n in range(1, count + 1)]
        studies.append(
            TrainingStudy(
                pre.image.half(),
                torch.from_numpy(label[None].astype(np.uint8)),
                lesion_voxels,
                head_voxels(params, pre.affine, label.shape),
            )
        )
        logger.debug(
            "training phantom %d: %s -> %s, %d lesions, %d lesion voxels",
            n,
            phantom.volume.shape,
            tuple(pre.image.shape[1:]),
            len(phantom.lesions),
            int(label.sum()),
        )
    logger.info("%d training phantoms, %d lesions", len(studies), n_lesions)
    return studies


def head_voxels(params: BrainMRParams, affine: np.ndarray, shape: Sequence[int], step: int = 4) -> np.ndarray:
    """Indices of every ``step``-th voxel per axis of the grid ``affine`` whose center lies inside the head."""
    index = np.stack(np.meshgrid(*[np.arange(0, s, step) for s in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    x, y, z = (index @ affine[:3, :3].T + affine[:3, 3]).T
    return index[params.tissue("head").region.contains(x, y, z)]


def sample_crop(
    study: TrainingStudy, rng: np.random.Generator, settings: TrainSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """A training crop (1, *crop) float32 and its label (1, *crop) int64, flipped and jittered at random."""
    size = np.asarray(settings.crop_voxels)
    shape = np.asarray(study.image.shape[1:])
    draw = rng.random()
    if study.lesion_voxels and draw < settings.positive_fraction:
        # A lesion first, then one of its voxels: small lesions are seen at least as often as large ones.
        if settings.lesion_size_exponent:
            weights = np.array([len(v) for v in study.lesion_voxels], dtype=float) ** (
                -settings.lesion_size_exponent / 3
            )
            lesion = study.lesion_voxels[rng.choice(len(weights), p=weights / weights.sum())]
        else:
            lesion = study.lesion_voxels[rng.integers(len(study.lesion_voxels))]
        voxel = lesion[rng.integers(len(lesion))]
        origin = voxel - np.array([rng.integers(s // 8, s - s // 8) for s in size])  # the voxel, off the crop's edge
    elif len(study.head_voxels) and draw < settings.positive_fraction + settings.head_fraction:
        voxel = study.head_voxels[rng.integers(len(study.head_voxels))]
        origin = voxel - np.array([rng.integers(s // 4, s - s // 4) for s in size])
    else:  # anywhere, reaching up to a quarter crop outside the image as the padded patches do
        lo = -size // 4
        hi = np.maximum(shape - 3 * size // 4, lo)
        origin = np.array([rng.integers(a, b + 1) for a, b in zip(lo, hi, strict=True)])
    # The task pads patches with the image minimum (the background): so do the crops.
    crop = crop_with_padding(study.image, origin, size, float(study.image.min()))
    label = crop_with_padding(study.label, origin, size, 0.0).long()
    for axis in range(3):
        if rng.random() < 0.5:
            crop, label = crop.flip(axis + 1), label.flip(axis + 1)
    # Intensity jitter, small: the darkest lesions differ from grey matter by only a few noise sigmas.
    crop = crop * float(rng.uniform(0.95, 1.05)) + float(rng.uniform(-0.05, 0.05))
    return crop, label


def train(config: ModelConfig, studies: list[TrainingStudy], settings: TrainSettings, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    network = SegmentationTask(config, torch.device("cpu")).build_network()
    logger.info("network: %d parameters", sum(p.numel() for p in network.parameters()))
    network.train()
    # Dice of the lesion channel over the whole batch (crops without a lesion do not divide by zero), or per crop
    # (a crop without a lesion then adds a constant with no gradient), plus cross-entropy.
    loss_fn = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=not settings.dice_per_crop)
    optimizer = torch.optim.Adam(network.parameters(), lr=settings.learning_rate)

    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup=settings.warmup_iterations, total=settings.iterations)
    )
    rng = rng_stream(seed, "crops")
    start = time.perf_counter()
    running = 0.0
    for step in range(settings.iterations):
        pairs = [sample_crop(studies[rng.integers(len(studies))], rng, settings) for _ in range(settings.batch_size)]
        images = torch.stack([image for image, _ in pairs])
        labels = torch.stack([label for _, label in pairs])
        loss = loss_fn(network(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        running += float(loss.detach())
        if (step + 1) % 25 == 0:
            logger.info(
                "iteration %d/%d: DiceCE %.4f lr %.2e (%.0f s)",
                step + 1,
                settings.iterations,
                running / 25,
                scheduler.get_last_lr()[0],
                time.perf_counter() - start,
            )
            running = 0.0
    return network.eval()


class SweepTask(SegmentationTask):
    """The service's task, finalizing each study at several thresholds and keeping the masks for Dice.

    ``run_direct`` returns the Findings at the first threshold; ``self.sweep`` holds, per threshold, the
    Findings and the mask of the last study read. The thresholds share one forward pass per study.
    """

    def __init__(self, config: ModelConfig, thresholds: Sequence[float]) -> None:
        super().__init__(config, torch.device("cpu"), score_threshold=thresholds[0])
        self.thresholds = tuple(thresholds)
        self.sweep: dict[float, tuple[list[Finding], np.ndarray]] = {}

    def finalize(self, volume: Volume, prepared: PreparedStudy, results: list[Any]) -> TaskResult:
        self.sweep = {}
        first = None
        for threshold in self.thresholds:
            self.threshold = threshold
            output = super().finalize(volume, prepared, results)
            union = np.zeros(volume.shape, dtype=bool)
            for mask in output.masks or []:
                union[mask.slices] |= mask.mask
            self.sweep[threshold] = (output.findings, union)
            if first is None:
                first = output
        self.threshold = self.thresholds[0]
        assert first is not None  # thresholds is never empty
        return first


@dataclass(frozen=True)
class StudyResult:
    shape: tuple[int, ...]
    spacing_mm: tuple[float, ...]
    lesions: list[dict[str, Any]]  # center_mm, diameter_mm, volume_ml, contrast
    findings: list[dict[str, Any]]  # center_mm, score, diameter_mm, volume_ml
    dice: float | None  # None when the study has no lesion
    read_s: float


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def read_studies(
    config: ModelConfig,
    network: torch.nn.Module,
    rng: np.random.Generator,
    count: int,
    thresholds: Sequence[float],
) -> dict[float, list[StudyResult]]:
    """Read ``count`` fresh phantoms through ``run_direct``; per threshold, each study's findings and Dice."""
    task = SweepTask(config, thresholds)
    results: dict[float, list[StudyResult]] = {t: [] for t in thresholds}
    for n in range(count):
        params = draw_params(rng, None)
        phantom = render_brain_mr(params)
        start = time.perf_counter()
        run_direct(task, network, phantom.volume, batch_size=config.batching.max_batch_size)
        read_s = time.perf_counter() - start
        truth = lesion_mask(params)
        lesions = [
            {
                "center_mm": lesion.center_mm,
                "diameter_mm": lesion.diameter_mm,
                "volume_ml": lesion.volume_ml,
                "contrast": planted.contrast,
            }
            for lesion, planted in zip(phantom.lesions, params.lesions, strict=True)
        ]
        for threshold, (findings, predicted) in task.sweep.items():
            results[threshold].append(
                StudyResult(
                    shape=phantom.volume.shape,
                    spacing_mm=tuple(round(s, 3) for s in phantom.volume.spacing_mm),
                    lesions=lesions,
                    findings=[
                        {
                            "center_mm": f.center_mm,
                            "score": f.score,
                            "diameter_mm": f.diameter_mm,
                            "volume_ml": f.volume_ml,
                        }
                        for f in findings
                    ],
                    dice=dice(predicted, truth) if phantom.lesions else None,
                    read_s=read_s,
                )
            )
        first = results[thresholds[0]][-1]
        logger.info(
            "study %d %s %s mm: %d lesions %s; at %.2f: %d findings, Dice %s; read in %.1f s",
            n,
            phantom.volume.shape,
            first.spacing_mm,
            len(phantom.lesions),
            [f"{lesion['diameter_mm']:.0f} mm {lesion['contrast']}" for lesion in lesions],
            thresholds[0],
            len(first.findings),
            "n/a" if first.dice is None else f"{first.dice:.3f}",
            read_s,
        )
    return results


def match_study(study: StudyResult, tolerance_mm: float) -> tuple[list[int | None], int]:
    """One-to-one matching by decreasing score: each lesion's finding index (None: missed) and the FP count."""
    matched, _, false_positives = match_by_score(
        [f["center_mm"] for f in study.findings],
        [f["score"] for f in study.findings],
        [lesion["center_mm"] for lesion in study.lesions],
        tolerance_mm,
    )
    return matched, false_positives


def evaluate(results: list[StudyResult], tolerance_mm: float, small_mm: float) -> dict[str, Any]:
    groups: dict[str, list[bool]] = {"all": [], f"lt_{small_mm:g}mm": [], f"ge_{small_mm:g}mm": []}
    groups |= {"bright": [], "dark": []}
    errors, volume_errors, diameter_errors, fps = [], [], [], []
    for study in results:
        matched, fp = match_study(study, tolerance_mm)
        fps.append(fp)
        for lesion, n in zip(study.lesions, matched, strict=True):
            hit = n is not None
            size_group = f"lt_{small_mm:g}mm" if lesion["diameter_mm"] < small_mm else f"ge_{small_mm:g}mm"
            for group in ("all", size_group, lesion["contrast"]):
                groups[group].append(hit)
            if hit:
                finding = study.findings[n]
                errors.append(float(np.linalg.norm(np.subtract(finding["center_mm"], lesion["center_mm"]))))
                volume_errors.append(finding["volume_ml"] / lesion["volume_ml"] - 1.0)
                diameter_errors.append(finding["diameter_mm"] - lesion["diameter_mm"])
    dices = [s.dice for s in results if s.dice is not None]
    lesion_free = [fp for s, fp in zip(results, fps, strict=True) if not s.lesions]

    def stats(values: list[float]) -> dict[str, float | None]:
        if not values:
            return {"median": None, "p90": None, "max": None}
        return {
            "median": round(float(np.median(values)), 3),
            "p90": round(float(np.percentile(values, 90)), 3),
            "max": round(float(np.max(values)), 3),
        }

    return {
        "tolerance_mm": tolerance_mm,
        "lesions": {k: len(v) for k, v in groups.items()},
        "sensitivity": {k: (round(sum(v) / len(v), 4) if v else None) for k, v in groups.items()},
        "fp_per_study_mean": round(float(np.mean(fps)), 3) if fps else 0.0,
        "fp_per_study_max": int(max(fps)) if fps else 0,
        "studies_with_more_than_one_fp": int(sum(f > 1 for f in fps)),
        "lesion_free_studies": len(lesion_free),
        "lesion_free_studies_with_a_finding": int(sum(f > 0 for f in lesion_free)),
        "dice_per_study": {
            "studies": len(dices),
            "mean": round(float(np.mean(dices)), 4) if dices else None,
            "median": round(float(np.median(dices)), 4) if dices else None,
            "min": round(float(np.min(dices)), 4) if dices else None,
        },
        "localisation_error_mm": stats(errors),
        "abs_relative_volume_error": stats([abs(v) for v in volume_errors]),
        "diameter_error_mm": {"median": round(float(np.median(diameter_errors)), 2) if diameter_errors else None},
    }


def tune_threshold(
    results: dict[float, list[StudyResult]], settings: TrainSettings
) -> tuple[float, list[dict[str, Any]]]:
    """The threshold with the best sensitivity (then Dice) where no validation study exceeds the FP budget."""
    curve = []
    for threshold, studies in sorted(results.items()):
        m = evaluate(studies, settings.hit_tolerance_mm, settings.small_lesion_mm)
        curve.append(
            {
                "threshold": threshold,
                "sensitivity": m["sensitivity"]["all"],
                "dice_mean": m["dice_per_study"]["mean"],
                "fp_per_study_mean": m["fp_per_study_mean"],
                "fp_per_study_max": m["fp_per_study_max"],
            }
        )
    feasible = [c for c in curve if c["fp_per_study_max"] <= settings.max_fp_per_study]
    if not feasible:
        logger.warning("no threshold keeps every validation study within %d FP", settings.max_fp_per_study)
        feasible = [max(curve, key=lambda c: c["threshold"])]
    best = max(feasible, key=lambda c: (c["sensitivity"] or 0.0, c["dice_mean"] or 0.0, -abs(c["threshold"] - 0.5)))
    return float(best["threshold"]), curve


def tune_min_score(studies: list[StudyResult], settings: TrainSettings) -> float:
    """The floor on a finding's score (its mean probability) that keeps every validation hit, with a margin, and
    not under the recipe's ``min_score_floor``."""
    hit_scores = []
    for study in studies:
        matched, _ = match_study(study, settings.hit_tolerance_mm)
        hit_scores += [study.findings[n]["score"] for n in matched if n is not None]
    if not hit_scores:
        return settings.min_score_floor
    steps = math.floor((min(hit_scores) - settings.min_score_margin) / settings.min_score_step)
    return round(max(0.0, steps * settings.min_score_step, settings.min_score_floor), 2)


def with_min_score(studies: list[StudyResult], min_score: float) -> list[StudyResult]:
    """The studies with the findings under ``min_score`` left out, as the task leaves them out."""
    return [
        dataclasses.replace(study, findings=[f for f in study.findings if f["score"] >= min_score]) for study in studies
    ]


def time_reading(config: ModelConfig, network: torch.nn.Module, seed: int, settings: TrainSettings) -> dict[str, Any]:
    """Mean wall time of run_direct on typical 3-D T1 studies (after one warm-up read)."""
    task = SegmentationTask(config, torch.device("cpu"))
    rng = rng_stream(seed, "timing")
    volumes = [
        render_brain_mr(
            draw_params(
                rng,
                None,
                shape=settings.timing_shape,
                pixel_spacing_mm=settings.timing_spacing_mm,
                slice_spacing_mm=settings.timing_spacing_mm,
            )
        ).volume
        for _ in range(settings.timing_studies)
    ]
    times = time_reads(task, network, volumes, config.batching.max_batch_size)
    return {
        "shape": list(settings.timing_shape),
        "spacing_mm": settings.timing_spacing_mm,
        "seconds": [round(t, 2) for t in times],
        "mean_s": round(float(np.mean(times)), 2),
        "torch_threads": torch.get_num_threads(),
    }


def reuse_weights(
    out: Path, config: ModelConfig, recipe: str, seed: int, settings: TrainSettings
) -> tuple[torch.nn.Module, float, float, str]:
    """The network of OUT/model.pt, and the data and training seconds and the date of the run that wrote it
    (OUT/metrics.json), after checking that run had this recipe, seed and training settings; ValueError otherwise."""
    previous = json.loads((out / "metrics.json").read_text())
    trained = {k: previous["settings"].get(k) for k in ("iterations", "train_phantoms", "batch_size", "learning_rate")}
    wanted = {k: getattr(settings, k) for k in trained}
    if previous.get("recipe") != recipe or previous.get("seed") != seed or trained != wanted:
        raise ValueError(
            f"{out}/model.pt was trained with recipe {previous.get('recipe')}, seed {previous.get('seed')}, {trained}; "
            f"this run asks for recipe {recipe}, seed {seed}, {wanted}"
        )
    network = SegmentationTask(config, torch.device("cpu")).build_network()
    network.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    logger.info("reusing %s/model.pt, trained on %s", out, previous["date"])
    trained_on = previous.get("weights_trained_on", previous["date"])
    return network.eval(), previous["time_s"]["data"], previous["time_s"]["train"], trained_on


def write_config(path: Path, score_threshold: float, min_score: float = 0.0) -> ModelConfig:
    data = json.loads(json.dumps(MODEL_YAML))
    data["postprocessing"]["score_threshold"] = round(score_threshold, 2)
    data["postprocessing"]["min_score"] = round(min_score, 2)
    header = (
        "# Written by models/brain_lesion_mr/train.py (edit the script, not this file): the probability threshold\n"
        "# is tuned on validation phantoms so that no study has more than one false positive, and min_score\n"
        "# just under the lowest score of a lesion found there.\n"
    )
    return write_model_yaml(path, data, header)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="model version directory, e.g. models/brain_lesion_mr/2"
    )
    parser.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default=None,
        help="the settings of a committed version (default: the --out directory's name, else the newest)",
    )
    parser.add_argument("--iterations", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-studies", type=int, default=20, help="held-out test phantoms")
    parser.add_argument("--train-phantoms", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--val-studies", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--card-only", action="store_true", help="rewrite MODEL_CARD.md from OUT/metrics.json (and OUT/eval/)"
    )
    parser.add_argument(
        "--reuse-weights",
        action="store_true",
        help="keep OUT/model.pt (from a run of the same recipe, seed and sizes, per OUT/metrics.json) and redo what "
        "follows training: validation, tuning, test, timing, card",
    )
    args = parser.parse_args(argv)
    setup(args.threads)
    if args.card_only:
        metrics = json.loads((args.out / "metrics.json").read_text())
        config = ModelConfig.from_yaml(args.out / "model.yaml")
        (args.out / "MODEL_CARD.md").write_text(render_model_card(config, metrics, server_eval(args.out)))
        return 0
    recipe = args.recipe or (args.out.name if args.out.name in RECIPES else max(RECIPES, key=int))
    base = RECIPES[recipe]
    settings = dataclasses.replace(
        base,
        iterations=base.iterations if args.iterations is None else args.iterations,
        train_phantoms=base.train_phantoms if args.train_phantoms is None else args.train_phantoms,
        val_phantoms=base.val_phantoms if args.val_studies is None else args.val_studies,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    config = write_config(args.out / "model.yaml", MODEL_YAML["postprocessing"]["score_threshold"])

    t0 = time.perf_counter()
    trained_on = datetime.date.today().isoformat()
    if args.reuse_weights:
        network, t_data, t_train, trained_on = reuse_weights(args.out, config, recipe, args.seed, settings)
        t0 -= t_data + t_train  # the total counts the training that wrote the weights
    else:
        studies = build_training_set(config, args.seed, settings)
        t_data = time.perf_counter() - t0
        network = train(config, studies, settings, args.seed)
        t_train = time.perf_counter() - t0 - t_data
        del studies
        torch.save({k: v.float() for k, v in network.state_dict().items()}, args.out / "model.pt")

    t_eval = time.perf_counter()
    val = read_studies(config, network, rng_stream(args.seed, "val"), settings.val_phantoms, settings.threshold_grid)
    threshold, curve = tune_threshold(val, settings)
    min_score = tune_min_score(val[threshold], settings)
    min_score_validation = tune_min_score(val[threshold], dataclasses.replace(settings, min_score_floor=0.0))
    config = write_config(args.out / "model.yaml", threshold, min_score)
    val_metrics = evaluate(
        with_min_score(val[threshold], min_score), settings.hit_tolerance_mm, settings.small_lesion_mm
    )
    logger.info("validation at threshold %.2f, min_score %.2f: %s", threshold, min_score, json.dumps(val_metrics))
    test = read_studies(config, network, rng_stream(args.seed, "test"), args.eval_studies, (threshold,))[threshold]
    test_metrics = evaluate(test, settings.hit_tolerance_mm, settings.small_lesion_mm)
    t_eval = time.perf_counter() - t_eval
    timing = time_reading(config, network, args.seed, settings)
    total_s = time.perf_counter() - t0
    metrics = {
        "date": datetime.date.today().isoformat(),
        "weights_trained_on": trained_on,
        "command": (
            f"python models/brain_lesion_mr/train.py --out {args.out} --recipe {recipe} "
            f"--iterations {settings.iterations} --seed {args.seed} --eval-studies {args.eval_studies} "
            f"--train-phantoms {settings.train_phantoms} --val-studies {settings.val_phantoms}"
        ),
        "recipe": recipe,
        "seed": args.seed,
        "settings": dataclasses.asdict(settings),
        "parameters": sum(p.numel() for p in network.parameters()),
        "weights_bytes": (args.out / "model.pt").stat().st_size,
        "score_threshold": threshold,
        "min_score": min_score,
        "min_score_validation": min_score_validation,  # before the recipe's floor
        "validation": {"studies": len(val[threshold]), **val_metrics},
        "validation_curve": curve,
        "test": {
            "studies": len(test),
            "mean_read_s": round(float(np.mean([r.read_s for r in test])), 2),
            "max_read_s": round(float(np.max([r.read_s for r in test])), 2),
            **test_metrics,
        },
        "reading_time_typical": timing,
        "machine": machine_info(),
        "time_s": {
            "data": round(t_data, 1),
            "train": round(t_train, 1),
            "evaluation": round(t_eval, 1),
            "total": round(total_s, 1),
        },
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (args.out / "MODEL_CARD.md").write_text(render_model_card(config, metrics, server_eval(args.out)))
    logger.info("test: %s", json.dumps(metrics["test"]))
    logger.info("reading time: %s", json.dumps(timing))
    logger.info("done in %.0f s", total_s)
    return 0


def _bias_line(config: ModelConfig) -> str:
    degree = config.preprocessing.bias_correction_degree
    if not degree:
        return ""
    return (
        "\n  the bias field divided out (`inference.tasks.preprocess.correct_bias`: the exponential of a "
        f"degree-{degree}\n  polynomial of the position, fitted to the log intensity of the head's commonest tissue);"
    )


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


# The bar of issue 16 for the brain model, on held-out phantoms read through the server.
BAR = {"large_sensitivity": 0.95, "small_sensitivity": 0.70, "max_fp_in_a_study": 1}


def server_eval(out: Path) -> str:
    """The card's section on a held-out set read through the server by ``radserve eval`` (``OUT/eval/eval.json``,
    written by the command the section quotes), or "" when the version has not been measured so."""
    path = out / "eval" / "eval.json"
    if not path.exists():
        return ""
    body = json.loads(path.read_text())
    label = body["labels"]["lesion"]
    overall, buckets = label["overall"], label["buckets"]
    manifest = body.get("dataset_manifest") or {}

    def group(names: Sequence[str]) -> tuple[int, int]:
        return sum(buckets[n]["lesions"] for n in names), sum(buckets[n]["hits"] for n in names)

    large, small = group(["10-20", ">=20"]), group(["<6", "6-10"])
    rate = lambda pair: pair[1] / pair[0] if pair[0] else None  # noqa: E731
    met = lambda ok: "**met**" if ok else "**not met**"  # noqa: E731
    large_ok = rate(large) is not None and rate(large) >= BAR["large_sensitivity"]
    fp_ok = overall["fp_max_in_a_study"] <= BAR["max_fp_in_a_study"]
    small_ok = rate(small) is not None and rate(small) >= BAR["small_sensitivity"]
    rows = "\n".join(
        f"| {name} mm | {b['lesions']} | {b['hits']} | {_pct(b['sensitivity'])} | {_num(b['cpm'])} |"
        for name, b in buckets.items()
    )
    seg = label.get("segmentation") or {}
    dice = (seg.get("dice_per_study") or {}).get("mean")
    lesion_wise = ((seg.get("lesion_wise") or {}).get("overall")) or {}
    compare = body.get("compare")
    command = f"radserve eval DATASET --model {body['model']}:{body['model_version']}"
    command += f" --compare {compare['paired']['a']}" if compare else ""
    paragraphs = [
        f"{body['studies']} studies written by `radserve phantoms make --modality MR --count {manifest.get('count')} "
        f"--seed {manifest.get('seed')}` (the generator's full ranges: lesions of 5-40 mm, bright and dark, bias "
        f"fields of 5-20 %, slices of 1-5 mm; seeds apart from the training script's), read on {body['date'][:10]} "
        f"through the server on the CPU by `{command} --out {out}/eval` (`eval/eval.json`, `eval/froc.png`). "
        "A hit is a finding whose center lies within the lesion's radius (at least 3 mm), one finding per lesion.",
        f"| lesions | count | found | sensitivity | CPM |\n|---|---|---|---|---|\n| all | {overall['lesions']} | "
        f"{overall['hits']} | {_pct(overall['sensitivity'])} | {_num(overall['cpm'])} |\n{rows}",
        f"False positives: {overall['false_positives']} in {overall['studies']} studies "
        f"({_num(overall['fp_per_study'])} per study), at most {overall['fp_max_in_a_study']} in one study. Dice per "
        f"study {_num(dice)} (mean over the studies with lesion voxels); lesion-wise, the mask covers "
        f"{lesion_wise.get('detected')} of {lesion_wise.get('lesions')} lesions.",
        f"The bar of issue 16 on these studies: lesions of 10 mm and more found at >= 95 % with at most 1 false "
        f"positive in any study: {large[1]} of {large[0]} ({_pct(rate(large))}), at most "
        f"{overall['fp_max_in_a_study']} false positive(s) in a study, {met(large_ok and fp_ok)}; lesions of 5-10 mm "
        f"at >= 70 %: {small[1]} of {small[0]} ({_pct(rate(small))}), {met(small_ok)}.",
    ]
    if compare:
        c = compare["paired"]
        entry = c["labels"]["lesion"]
        les = entry["lesions"]

        def diff(metric: str) -> str:
            low, high = entry[metric]["ci95"]
            return f"{entry[metric]['difference']:+.3f} [{low:+.3f}, {high:+.3f}]"

        paragraphs.append(
            f"Paired with `{c['a']}` on the same studies (`{c['b']}` minus `{c['a']}`, 95 % bootstrap interval over "
            f"studies): sensitivity {diff('sensitivity')}, false positives per study {diff('fp_per_study')}, CPM "
            f"{diff('cpm')}; lesions found by both {les['both']}, only by `{c['a']}` {les['only_a']}, only by "
            f"`{c['b']}` {les['only_b']}, by neither {les['neither']} (exact McNemar p = {les['mcnemar_p']:.3g})."
        )
    wrapped = [p if p.startswith("|") else textwrap.fill(p, width=116, break_on_hyphens=False) for p in paragraphs]
    return "\n## Held-out phantoms read through the server (`radserve eval`)\n\n" + "\n\n".join(wrapped) + "\n"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _trained_words(m: dict[str, Any]) -> str:
    trained = m.get("weights_trained_on", m["date"])
    return "" if trained == m["date"] else f" (weights trained on {trained}, tuned and measured again)"


def _unfamiliar_words(s: dict[str, Any]) -> str:
    if not s.get("min_score_floor"):
        return ""
    return (
        "\n* Small dark structures the phantoms do not have (sulci, vessels) look like small dark lesions to it; the "
        'floor\n  on a finding\'s score keeps most out (docs/decisions.md, "brain_lesion_mr version 2").'
    )


def _floor_words(s: dict[str, Any], m: dict[str, Any]) -> str:
    floor = s.get("min_score_floor", 0.0)
    if not floor:
        return " (no validation lesion is lost)"
    tuned = m.get("min_score_validation")
    return (
        f" ({tuned:g} there), but not under {floor:g}: on brain\nphantoms written apart from the training generator "
        "(sulci, linear bias fields, thick slices; docs/decisions.md)\nthe weaker components were mostly false "
        "positives"
    )


def _sampling_words(s: dict[str, Any]) -> str:
    exponent = s.get("lesion_size_exponent", 0.0)
    if not exponent:
        return "a lesion drawn uniformly, so small lesions are seen as often\nas large ones"
    return (
        f"a lesion drawn with probability proportional to 1 / diameter^{exponent:g}\n(from its voxel count), so "
        "small lesions are seen more often than large ones"
    )


def render_model_card(config: ModelConfig, m: dict[str, Any], server: str = "") -> str:
    """MODEL_CARD.md with this run's numbers, and ``server``: the section on the held-out set read through the
    server (``server_eval``), when there is one."""
    t, s, timing, val = m["test"], m["settings"], m["reading_time_typical"], m["validation"]
    version = m.get("recipe", config.version)
    dice_over = "each crop" if s.get("dice_per_crop") else "the batch"
    net = config.network.args
    sens, n_les = t["sensitivity"], t["lesions"]
    small = f"{s['small_lesion_mm']:g}mm"
    err, vol = t["localisation_error_mm"], t["abs_relative_volume_error"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    d = t["dice_per_study"]
    dice_row = f"{fmt(d['mean'])} (median {fmt(d['median'])}, min {fmt(d['min'])})"
    contrast_row = f"{_pct(sens['bright'])} / {_pct(sens['dark'])}"
    return f"""# brain_lesion_mr version {version} — model card

Written by `models/brain_lesion_mr/train.py` on {m["date"]}{_trained_words(m)}; the numbers below are that run's.

## Intended use

Segmentation of focal brain lesions (5-40 mm, brighter or darker than the surrounding parenchyma) on T1-like
brain MR, as the reference segmentation model of radserve: for research, demos, tests and benchmarks of the
serving stack. **Trained and tested on synthetic phantoms only. Not a medical device; not for clinical use.**
On real MR it has never been evaluated and must be assumed not to work.

## Architecture

MONAI `UNet` (`monai.networks.nets.UNet`, referenced directly from `model.yaml`): channels {net["channels"]},
strides {net["strides"]}, {net["num_res_units"]} residual units per level, {net["norm"]} normalisation, PReLU;
{net["out_channels"]} output channels (background, lesion) with a softmax. {m["parameters"]:,} parameters;
`model.pt` is a float32 state dict of {m["weights_bytes"] / 1e6:.2f} MB.

* Preprocessing: RAS orientation, {config.preprocessing.spacing_mm[0]:g} mm isotropic spacing (bilinear);\
{_bias_line(config)}
  z-score normalisation over the head (the voxels above {config.preprocessing.foreground_fraction:g} x the
  {config.preprocessing.percentile_high:g}th percentile: the noisy air around the head is left out, so the scale
  does not depend on the field of view or the scanner's intensity units).
* Inference: sliding-window patches of {list(config.inferer.roi_size)} voxels, overlap {config.inferer.overlap},
  padded with the image minimum; patch probabilities blended with a Gaussian importance map (MONAI
  `compute_importance_map`, sigma 0.125 of the ROI); the probability map interpolated (trilinear) at the
  input volume's voxel centers, thresholded at {config.postprocessing.score_threshold}; 26-connected components
  under {config.postprocessing.min_volume_ml:g} ml or with a mean probability under {config.postprocessing.min_score:g}
  dropped, at most {config.postprocessing.max_detections} kept.
* Output: one `Finding(label="lesion")` per component — centroid and voxel-edge bounding box in LPS mm,
  longest extent as `diameter_mm`, `volume_ml`, mean probability as `score` — and the mask on the input
  grid per finding (`TaskResult.masks`), which is the DICOM SEG's segment of that finding.

## Training data

`inference.phantoms.brain_mr`: T1-like head MR in arbitrary units (0-1100): nested ellipsoids for scalp
(650-850), skull (40-110), CSF (100-200), cortical grey matter (0.62-0.72 x white matter) and white matter
(600-720), two CSF ventricles; lesions are spheres or lobulated unions of balls, 5-40 mm (log-uniform),
bright (1.25-1.6 x) or dark (0.5-0.8 x) the tissue at their center (white matter, else grey matter: a dark
lesion in white matter can be as dark as the cortex), with partial-volume edges, anywhere in the brain; a smooth
multiplicative bias field (5-20 %) and Rician noise (sigma 1.5-4 % of white matter); pixel spacing 0.8-1.5 mm,
slice spacing 1-5 mm, 200-250 mm field of view, 90-170 mm coverage, axial orientations with random flips.
{s["train_phantoms"]} training phantoms with 1-{s["max_lesions_per_training_phantom"]} lesions asked for each.
Target: the analytic lesions evaluated at the preprocessed grid's voxel centers.

## Training

MONAI `DiceCELoss` (softmax; Dice of the lesion channel over {dice_over}, plus cross-entropy).
{s["iterations"]} iterations of {s["batch_size"]} random {"x".join(map(str, s["crop_voxels"]))} crops
({s["positive_fraction"]:.0%} holding a voxel of {_sampling_words(s)};
{s["head_fraction"]:.0%} centered anywhere in the head, the hard negatives; the rest anywhere;
random flips, intensity jitter); Adam, lr {s["learning_rate"]:g} with
warm-up and cosine decay. Training took {m["time_s"]["train"] / 60:.1f} min (data {m["time_s"]["data"] / 60:.1f}
min) on the machine below; the whole script, evaluation included, {m["time_s"]["total"] / 60:.1f} min.

The probability threshold {m["score_threshold"]} was chosen on {val["studies"]} validation phantoms (own seed)
among {s["threshold_grid"][0]}-{s["threshold_grid"][-1]}: the best lesion sensitivity (then Dice) where no
validation study has more than {s["max_fp_per_study"]} false positive. The floor on a finding's score,
{m["min_score"]:g}, is the lowest score of a lesion found there less {s["min_score_margin"]:g}, rounded down to a
multiple of {s["min_score_step"]:g}{_floor_words(s, m)}. Weak components just over the threshold
(thin rims along tissue edges on thick slices) are thus not reported. There: sensitivity
{_pct(val["sensitivity"]["all"])}, Dice {fmt(val["dice_per_study"]["mean"])}, {val["fp_per_study_mean"]:.2f} FP
per study (max {val["fp_per_study_max"]}).

## Held-out test metrics

{t["studies"]} test phantoms from their own seed with the generator's full ranges (0-3 lesions each), read
with `run_direct` (the service's prepare / batched forward / split / finalize). A finding is a hit when its
center is within {t["tolerance_mm"]:g} mm of a planted lesion's centroid (one finding per lesion, by
decreasing score); every other finding is a false positive. Dice is computed on the input grid against the
voxels whose center lies in a planted lesion, per study with at least one lesion.

| metric | value |
|---|---|
| Dice per study, mean ({d["studies"]} studies) | {dice_row} |
| sensitivity, all lesions ({n_les["all"]}) | {_pct(sens["all"])} |
| sensitivity, lesions < {small} ({n_les["lt_" + small]}) | {_pct(sens["lt_" + small])} |
| sensitivity, lesions >= {small} ({n_les["ge_" + small]}) | {_pct(sens["ge_" + small])} |
| sensitivity, bright / dark lesions ({n_les["bright"]} / {n_les["dark"]}) | {contrast_row} |
| false positives per study, mean / max | {t["fp_per_study_mean"]:.2f} / {t["fp_per_study_max"]} |
| studies with more than one false positive | {t["studies_with_more_than_one_fp"]} |
| lesion-free studies with a finding | {t["lesion_free_studies_with_a_finding"]} of {t["lesion_free_studies"]} |

Localisation error of the hits: median {fmt(err["median"])} mm, 90th percentile {fmt(err["p90"])} mm, max
{fmt(err["max"])} mm. Absolute relative volume error of the hits: median {fmt(vol["median"])}, 90th percentile
{fmt(vol["p90"])}. Mean reading time of the test studies {t["mean_read_s"]} s (max {t["max_read_s"]} s).
{server}
## Reading time

A {"x".join(map(str, timing["shape"]))} study at {timing["spacing_mm"]:g} mm (a 3-D T1), `run_direct` with
batches of {config.batching.max_batch_size}, {timing["torch_threads"]} torch threads: **{timing["mean_s"]} s**
mean over {len(timing["seconds"])} studies ({timing["seconds"]} s), on {m["machine"]["cores"]} CPU cores
({m["machine"]["cpu"]}, torch {m["machine"]["torch"]}), shared with other work.

## Reproduce

```
{m["command"]}
```

Seeded (phantoms, crops, initialisation): the same command on the same machine and thread count writes the
same `model.pt`. `metrics.json` holds every number above and the settings.

## Limitations

* Synthetic data only: ellipsoidal anatomy, no gyri, sulci, vessels, skull base or motion; one T1-like
  contrast. Expect false positives and misses on anything else.
* At {config.preprocessing.spacing_mm[0]:g} mm the smallest lesions are 3-4 voxels across, and on 5 mm slices
  they show on one or two slices with partial volume: they are found less reliably than large ones.
* `diameter_mm` is the largest distance between two voxel centers of the mask, `volume_ml` its voxel count:
  both inherit the mask's errors.
* Lesions under 10 mm are found less often than larger ones ({_pct(sens["lt_" + small])} against
  {_pct(sens["ge_" + small])} in the table above), dark ones least: on 1.5 mm voxels, with noise and a bias field,
  a 5 mm lesion a few percent darker than its surroundings is hard to tell from noise. Trained for
  {m["time_s"]["train"] / 60:.0f} CPU minutes.{_unfamiliar_words(s)}
* The bias correction is a much simplified N4: a smooth field only, and one strong enough to carry one tissue
  to another's intensity can mislead it (docs/decisions.md, "MR bias field"), leaving a residual field the
  network was not trained on.
"""


if __name__ == "__main__":
    sys.exit(main())
