"""Train ``lung_nodule_ct`` (a small 3-D RetinaNet) on synthetic chest CT phantoms and evaluate it as the service reads.

    .venv/bin/python models/lung_nodule_ct/train.py --out models/lung_nodule_ct/1 [--iterations N] [--seed S]
        [--eval-studies N]

Writes to ``--out``: ``model.yaml`` (with the score threshold tuned on validation phantoms), ``model.pt``
(float32 state dict), ``metrics.json`` and ``MODEL_CARD.md``. Everything is seeded: the same arguments on
the same machine give the same weights, and the committed version is what the defaults produce.

1. Training phantoms (``make_chest_ct``, smaller matrices than the clinical range but the full spacing and
   orientation ranges), preprocessed by the model's own ``preprocess()`` and cached in memory.
2. Training: MONAI's ``RetinaNetDetector`` in training mode (ATSS matching, sigmoid focal loss, smooth-L1
   box loss) on random crops that hold a nodule most of the time; Adam with a cosine schedule.
3. Validation phantoms (their own seed): read through ``run_direct`` at a low threshold; the score threshold
   is chosen there so that no validation study has more than one false positive.
4. Test phantoms (their own seed, the generator's full size ranges): sensitivity, false positives per scan,
   localisation error, and the reading time of 256x256x120 studies, all through ``run_direct`` - the code
   path of the service.
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
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from torchvision.ops import sigmoid_focal_loss

from inference.modelrepo.schema import ModelConfig
from inference.outputs.finding import Finding
from inference.phantoms.base import Phantom
from inference.phantoms.chest_ct import make_chest_ct
from inference.tasks.detection import DetectionTask
from inference.tasks.direct import run_direct
from inference.tasks.postprocess.detection import boxes_from_centers, build_anchor_generator
from inference.tasks.preprocess import preprocess
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

logger = logging.getLogger("train_lung_nodule_ct")

SPACING_MM = 1.5
# model.yaml, less the tuned score threshold. The network's feature maps have strides 4, 8 and 16 voxels
# (6, 12, 24 mm); anchors of 4-8 voxels on the finest map cover nodules of 5-30 mm with the coarser maps.
MODEL_YAML: dict[str, Any] = {
    "name": "lung_nodule_ct",
    "task": "detection",
    "modalities": ["CT"],
    "labels": ["nodule"],
    "description": (
        "Solid lung nodules (5-30 mm) on chest CT. A small MONAI RetinaNet trained on synthetic phantoms only: "
        "research and demo use, not for clinical use."
    ),
    "preprocessing": {
        "spacing_mm": [SPACING_MM] * 3,
        "a_min": -1000.0,
        "a_max": 500.0,
        "b_min": 0.0,
        "b_max": 1.0,
        "clip": True,
    },
    "network": {
        "target": "inference.networks.retinanet.build_retinanet",
        "args": {
            "spatial_dims": 3,
            "in_channels": 1,
            "num_classes": 1,
            "num_anchors": 3,
            "planes": [16, 32, 64, 128],
            "layers": [1, 1, 1, 1],
            "fpn_channels": 32,
            "returned_layers": [1, 2],
            "conv1_t_stride": [2, 2, 2],
            "conv1_t_size": [7, 7, 7],
        },
        "weights": "model.pt",
    },
    # 96 voxels = 144 mm; the patches overlap by at least 24 voxels = 36 mm > 30 mm, the largest nodule.
    # The smallest study read (FAILED_PRECONDITION below it): 16 x 16 x 4 voxels over at least 10 x 10 x 8 mm, a 5 mm
    # nodule with a margin.
    "input": {"min_shape": [16, 16, 4], "min_extent_mm": [10, 10, 8]},
    "inferer": {"roi_size": [96, 96, 96], "overlap": 0.25},
    "detector": {
        "feature_map_scales": [1, 2, 4],
        "base_anchor_shapes": [[4, 4, 4], [6, 6, 6], [8, 8, 8]],
        "size_divisible": [16, 16, 16],
    },
    "postprocessing": {"score_threshold": 0.5, "nms_iou": 0.1, "min_size_mm": 3.0, "max_detections": 10},
    "batching": {"max_batch_size": 4, "max_queue_delay_ms": 5.0},
    "autocast": "bf16",
    "promote": "auto",  # bundled versions take default routing once READY (docs/decisions.md)
    "progressive": True,  # a fixed HU window: read while the study arrives (docs/decisions.md)
}


@dataclass(frozen=True)
class TrainSettings:
    iterations: int = 700
    batch_size: int = 4
    crop_voxels: tuple[int, int, int] = (64, 64, 64)
    positive_fraction: float = 0.75  # crops built around a nodule; the rest are anywhere
    learning_rate: float = 1e-3
    warmup_iterations: int = 30
    weight_decay: float = 1e-4
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    train_phantoms: int = 64
    val_phantoms: int = 16
    decode_threshold: float = 0.05  # the lowest score ever kept, for threshold tuning
    max_fp_per_study: int = 1  # validation constraint on the tuned threshold
    hit_tolerance_mm: float = 3.0
    sensitivity_min_diameter_mm: float = 8.0
    timing_studies: int = 3
    timing_shape: tuple[int, int, int] = (256, 256, 120)


# Phantom sizes. Training and validation use smaller matrices and fewer slices than the clinical range to
# fit the CPU budget; the spacings and orientations cover the generator's full ranges (preprocessing
# resamples everything to 1.5 mm anyway). The test set uses the generator's own full ranges.
TRAIN_MATRICES = (128, 160, 192, 224, 256, 288, 320)
TRAIN_SLICES = (40, 180)


def make_phantom(rng: np.random.Generator, *, full_range: bool) -> Phantom:
    """One phantom; at least one nodule is asked for whenever the lungs can hold one."""
    if full_range:
        shape = None
    else:
        matrix = int(rng.choice(TRAIN_MATRICES))
        shape = (matrix, matrix, int(rng.integers(TRAIN_SLICES[0], TRAIN_SLICES[1] + 1)))
    seed = int(rng.integers(2**31))
    n_nodules = int(rng.integers(1, 6))
    try:
        return make_chest_ct(seed, shape=shape, n_nodules=n_nodules)
    except ValueError:  # lungs too small for that many nodules in this field of view
        return make_chest_ct(seed, shape=shape)


@dataclass
class TrainingStudy:
    image: torch.Tensor  # (1, X, Y, Z) float16, preprocessed
    boxes: np.ndarray  # (N, 6) voxel-edge xyzxyz in the preprocessed image


def target_boxes(phantom: Phantom, affine: np.ndarray) -> np.ndarray:
    """Planted nodules as boxes in the preprocessed image: centered on the truth, side = diameter."""
    if not phantom.lesions:
        return np.zeros((0, 6))
    inverse = np.linalg.inv(affine)
    centers_mm = np.array([lesion.center_mm for lesion in phantom.lesions])
    centers = centers_mm @ inverse[:3, :3].T + inverse[:3, 3]
    spacing_mm = np.linalg.norm(affine[:3, :3], axis=0)
    sizes = np.array([lesion.diameter_mm for lesion in phantom.lesions])[:, None] / spacing_mm[None, :]
    return boxes_from_centers(centers, sizes)


def build_training_set(config: ModelConfig, seed: int, count: int) -> list[TrainingStudy]:
    rng = rng_stream(seed, "train")
    studies = []
    for n in range(count):
        phantom = make_phantom(rng, full_range=False)
        pre = preprocess(phantom.volume, config.preprocessing)
        studies.append(TrainingStudy(pre.image.half(), target_boxes(phantom, pre.affine)))
        logger.debug(
            "training phantom %d: %s -> %s, %d nodules",
            n,
            phantom.volume.shape,
            tuple(pre.image.shape[1:]),
            len(phantom.lesions),
        )
    n_nodules = sum(len(s.boxes) for s in studies)
    logger.info("%d training phantoms, %d nodules", len(studies), n_nodules)
    return studies


def sample_crop(
    study: TrainingStudy, rng: np.random.Generator, settings: TrainSettings, pad_value: float
) -> tuple[torch.Tensor, np.ndarray]:
    """A training crop and its boxes (crop voxel-edge coordinates), flipped at random."""
    size = np.asarray(settings.crop_voxels)
    shape = np.asarray(study.image.shape[1:])
    boxes = study.boxes
    if len(boxes) and rng.random() < settings.positive_fraction:
        box = boxes[rng.integers(len(boxes))]
        margin = 2.0
        lo = np.ceil(box[3:] + margin - size).astype(int)
        hi = np.floor(box[:3] - margin).astype(int)
        center = np.round((box[:3] + box[3:]) / 2 - size / 2).astype(int)
        origin = np.where(
            lo <= hi, [rng.integers(a, b + 1) if a <= b else c for a, b, c in zip(lo, hi, center, strict=True)], center
        )
    else:  # anywhere, reaching up to a quarter crop outside the image as the padded patches do
        lo = -size // 4
        hi = np.maximum(shape - 3 * size // 4, lo)
        origin = np.array([rng.integers(a, b + 1) for a, b in zip(lo, hi, strict=True)])
    crop = crop_with_padding(study.image, origin, size, pad_value)
    crop_boxes = boxes - np.concatenate([origin, origin])
    centers = (crop_boxes[:, :3] + crop_boxes[:, 3:]) / 2
    inside = np.all((centers >= 0) & (centers < size), axis=1)
    crop_boxes = np.clip(crop_boxes[inside], 0, np.concatenate([size, size]))
    for axis in range(3):
        if rng.random() < 0.5:
            crop = crop.flip(axis + 1)
            crop_boxes[:, [axis, axis + 3]] = size[axis] - crop_boxes[:, [axis + 3, axis]]
    # Intensity jitter: other scanners and phantoms differ a little in HU, noise and contrast.
    crop = crop * float(rng.uniform(0.9, 1.1)) + float(rng.uniform(-0.03, 0.03))
    noise_sigma = float(rng.uniform(0.0, 0.015))
    if noise_sigma > 0:
        crop = crop + noise_sigma * torch.from_numpy(rng.standard_normal(crop.shape, dtype=np.float32))
    return crop, crop_boxes


class SigmoidFocalLoss(torch.nn.Module):
    """RetinaNet's classification loss: sigmoid focal loss summed over anchors, divided by the positives."""

    def __init__(self, alpha: float, gamma: float) -> None:
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = sigmoid_focal_loss(logits, targets, alpha=self.alpha, gamma=self.gamma, reduction="sum")
        return loss / targets.sum().clamp(min=1.0)


def train(config: ModelConfig, studies: list[TrainingStudy], settings: TrainSettings, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    network = DetectionTask(config, torch.device("cpu")).build_network()
    n_params = sum(p.numel() for p in network.parameters())
    logger.info("network: %d parameters", n_params)
    detector = RetinaNetDetector(network, build_anchor_generator(config.detector))
    detector.set_atss_matcher(num_candidates=4, center_in_gt=False)
    detector.set_cls_loss(SigmoidFocalLoss(settings.focal_alpha, settings.focal_gamma))
    detector.set_box_regression_loss(
        torch.nn.SmoothL1Loss(beta=1.0 / 9, reduction="mean"), encode_gt=True, decode_pred=False
    )
    detector.train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)

    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup=settings.warmup_iterations, total=settings.iterations)
    )
    rng = rng_stream(seed, "crops")
    pad_value = config.preprocessing.b_min
    start = time.perf_counter()
    running = {"classification": 0.0, "box_regression": 0.0}
    for step in range(settings.iterations):
        crops, targets = [], []
        for _ in range(settings.batch_size):
            crop, boxes = sample_crop(studies[rng.integers(len(studies))], rng, settings, pad_value)
            crops.append(crop)
            targets.append(
                {
                    "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 6),
                    "labels": torch.zeros(len(boxes), dtype=torch.long),
                }
            )
        losses = detector(torch.stack(crops), targets)
        loss = losses["classification"] + losses["box_regression"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 10.0)
        optimizer.step()
        scheduler.step()
        for key in running:
            running[key] += float(losses[key].detach())
        if (step + 1) % 25 == 0:
            logger.info(
                "iteration %d/%d: cls %.4f box %.4f lr %.2e (%.0f s)",
                step + 1,
                settings.iterations,
                running["classification"] / 25,
                running["box_regression"] / 25,
                scheduler.get_last_lr()[0],
                time.perf_counter() - start,
            )
            running = dict.fromkeys(running, 0.0)
    return network.eval()


@dataclass(frozen=True)
class StudyResult:
    lesions: list[tuple[tuple[float, float, float], float]]  # (center_mm, diameter_mm)
    findings: list[tuple[tuple[float, ...], float]]  # (center_mm, score), at the decode threshold
    read_s: float
    shape: tuple[int, ...]


def read_studies(
    config: ModelConfig,
    network: torch.nn.Module,
    rng: np.random.Generator,
    count: int,
    *,
    full_range: bool,
    settings: TrainSettings,
) -> list[StudyResult]:
    task = DetectionTask(config, torch.device("cpu"), score_threshold=settings.decode_threshold)
    results = []
    for n in range(count):
        phantom = make_phantom(rng, full_range=full_range)
        start = time.perf_counter()
        findings: list[Finding] = run_direct(task, network, phantom.volume, batch_size=config.batching.max_batch_size)
        read_s = time.perf_counter() - start
        results.append(
            StudyResult(
                lesions=[(lesion.center_mm, lesion.diameter_mm) for lesion in phantom.lesions],
                findings=[(f.center_mm, f.score) for f in findings],
                read_s=read_s,
                shape=phantom.volume.shape,
            )
        )
        logger.info(
            "study %d %s: %d nodules, %d findings >= %.2f, read in %.1f s",
            n,
            phantom.volume.shape,
            len(phantom.lesions),
            len(findings),
            settings.decode_threshold,
            read_s,
        )
    return results


def match_study(study: StudyResult, threshold: float, tolerance_mm: float) -> tuple[list[float | None], int]:
    """One-to-one matching by decreasing score: each lesion's hit distance (None: missed) and the FP count."""
    findings = [f for f in study.findings if f[1] >= threshold]
    _, distances, false_positives = match_by_score(
        [center for center, _ in findings],
        [score for _, score in findings],
        [center for center, _ in study.lesions],
        tolerance_mm,
    )
    return distances, false_positives


def evaluate(
    results: list[StudyResult], threshold: float, tolerance_mm: float, min_diameter_mm: float
) -> dict[str, Any]:
    hits_large = total_large = hits_all = total_all = 0
    fps = []
    errors = []
    for study in results:
        distances, fp = match_study(study, threshold, tolerance_mm)
        fps.append(fp)
        for (_, diameter), d in zip(study.lesions, distances, strict=True):
            total_all += 1
            hits_all += d is not None
            if diameter >= min_diameter_mm:
                total_large += 1
                hits_large += d is not None
                if d is not None:
                    errors.append(d)
    return {
        "threshold": threshold,
        "tolerance_mm": tolerance_mm,
        "nodules_ge_min": total_large,
        "sensitivity_ge_min": hits_large / total_large if total_large else float("nan"),
        "nodules_all": total_all,
        "sensitivity_all": hits_all / total_all if total_all else float("nan"),
        "fp_per_scan_mean": float(np.mean(fps)) if fps else 0.0,
        "fp_per_scan_max": int(max(fps)) if fps else 0,
        "studies_with_more_than_one_fp": int(sum(f > 1 for f in fps)),
        "localisation_error_mm": {
            "median": float(np.median(errors)) if errors else None,
            "p90": float(np.percentile(errors, 90)) if errors else None,
            "max": float(np.max(errors)) if errors else None,
        },
    }


def tune_threshold(results: list[StudyResult], settings: TrainSettings) -> tuple[float, list[dict[str, Any]]]:
    """The middle of the widest-sensitivity threshold range where no study exceeds the FP budget."""
    grid = np.round(np.arange(max(settings.decode_threshold, 0.05), 0.96, 0.01), 2)
    curve = [evaluate(results, float(t), settings.hit_tolerance_mm, settings.sensitivity_min_diameter_mm) for t in grid]
    feasible = [c for c in curve if c["fp_per_scan_max"] <= settings.max_fp_per_study]
    if not feasible:
        logger.warning("no threshold keeps every validation study within %d FP; using 0.95", settings.max_fp_per_study)
        return 0.95, curve
    best = max(c["sensitivity_ge_min"] for c in feasible)
    plateau = [c["threshold"] for c in feasible if c["sensitivity_ge_min"] >= best - 1e-9]
    return float(plateau[len(plateau) // 2]), curve


def time_reading(config: ModelConfig, network: torch.nn.Module, seed: int, settings: TrainSettings) -> dict[str, Any]:
    """Mean wall time of run_direct on 256x256x120 studies (after one warm-up read)."""
    task = DetectionTask(config, torch.device("cpu"))
    rng = rng_stream(seed, "timing")
    phantoms = [
        make_chest_ct(int(rng.integers(2**31)), shape=settings.timing_shape) for _ in range(settings.timing_studies)
    ]
    times = time_reads(task, network, [p.volume for p in phantoms], config.batching.max_batch_size)
    return {
        "shape": list(settings.timing_shape),
        "spacings_mm": [[round(s, 3) for s in p.volume.spacing_mm] for p in phantoms],
        "seconds": [round(t, 2) for t in times],
        "mean_s": round(float(np.mean(times)), 2),
        "torch_threads": torch.get_num_threads(),
    }


def write_config(path: Path, score_threshold: float) -> ModelConfig:
    data = json.loads(json.dumps(MODEL_YAML))
    data["postprocessing"]["score_threshold"] = round(score_threshold, 2)
    header = (
        "# Written by models/lung_nodule_ct/train.py (edit the script, not this file): the score threshold is\n"
        "# tuned on validation phantoms so that no study has more than one false positive.\n"
    )
    return write_model_yaml(path, data, header)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="model version directory, e.g. models/lung_nodule_ct/1")
    parser.add_argument("--iterations", type=int, default=TrainSettings.iterations)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-studies", type=int, default=20, help="held-out test phantoms")
    parser.add_argument("--val-studies", type=int, default=TrainSettings.val_phantoms)
    parser.add_argument("--train-phantoms", type=int, default=TrainSettings.train_phantoms)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    setup(args.threads)
    settings = dataclasses.replace(
        TrainSettings(), iterations=args.iterations, val_phantoms=args.val_studies, train_phantoms=args.train_phantoms
    )
    args.out.mkdir(parents=True, exist_ok=True)
    config = write_config(args.out / "model.yaml", MODEL_YAML["postprocessing"]["score_threshold"])

    t0 = time.perf_counter()
    studies = build_training_set(config, args.seed, settings.train_phantoms)
    t_data = time.perf_counter() - t0
    network = train(config, studies, settings, args.seed)
    t_train = time.perf_counter() - t0 - t_data
    del studies
    torch.save({k: v.float() for k, v in network.state_dict().items()}, args.out / "model.pt")

    val = read_studies(
        config, network, rng_stream(args.seed, "val"), settings.val_phantoms, full_range=False, settings=settings
    )
    threshold, curve = tune_threshold(val, settings)
    config = write_config(args.out / "model.yaml", threshold)
    val_metrics = evaluate(val, threshold, settings.hit_tolerance_mm, settings.sensitivity_min_diameter_mm)
    logger.info("validation at threshold %.2f: %s", threshold, json.dumps(val_metrics))

    test = read_studies(
        config, network, rng_stream(args.seed, "test"), args.eval_studies, full_range=True, settings=settings
    )
    test_metrics = {
        f"hit_within_{tol:g}mm": evaluate(test, threshold, tol, settings.sensitivity_min_diameter_mm)
        for tol in (3.0, 5.0)
    }
    timing = time_reading(config, network, args.seed, settings)
    total_s = time.perf_counter() - t0
    metrics = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", *(sys.argv if argv is None else [sys.argv[0], *argv])]),
        "seed": args.seed,
        "settings": dataclasses.asdict(settings),
        "parameters": sum(p.numel() for p in network.parameters()),
        "weights_bytes": (args.out / "model.pt").stat().st_size,
        "score_threshold": threshold,
        "validation": {"studies": len(val), **val_metrics},
        "validation_curve": [
            {
                k: c[k]
                for k in ("threshold", "sensitivity_ge_min", "sensitivity_all", "fp_per_scan_mean", "fp_per_scan_max")
            }
            for c in curve
        ],
        "test": {
            "studies": len(test),
            "mean_read_s": round(float(np.mean([r.read_s for r in test])), 2),
            "max_read_s": round(float(np.max([r.read_s for r in test])), 2),
            **test_metrics,
        },
        "reading_time_256x256x120": timing,
        "machine": machine_info(),
        "time_s": {"data": round(t_data, 1), "train": round(t_train, 1), "total": round(total_s, 1)},
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (args.out / "MODEL_CARD.md").write_text(render_model_card(config, metrics))
    logger.info("test: %s", json.dumps(metrics["test"]))
    logger.info("reading time 256x256x120: %s", json.dumps(timing))
    logger.info("done in %.0f s", total_s)
    return 0


def _pct(value: float) -> str:
    return "n/a" if value != value else f"{100 * value:.1f} %"  # NaN when there was no such nodule


def render_model_card(config: ModelConfig, m: dict[str, Any]) -> str:
    """MODEL_CARD.md with this run's numbers."""
    t3, t5, val = m["test"]["hit_within_3mm"], m["test"]["hit_within_5mm"], m["validation"]
    err = t5["localisation_error_mm"]
    timing = m["reading_time_256x256x120"]
    s = m["settings"]
    net = config.network.args
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    return f"""# lung_nodule_ct — model card

Written by `models/lung_nodule_ct/train.py` on {m["date"]}; the numbers below are that run's.

## Intended use

Detection of solid lung nodules (5-30 mm) on chest CT, as the reference detection model of radserve: for
research, demos, tests and benchmarks of the serving stack. **Trained and tested on synthetic phantoms only.
Not a medical device; not for clinical use.** On real CT it has never been evaluated and must be assumed
not to work (real anatomy has vessels, airways, ribs and heart that the phantoms do not have).

## Architecture

MONAI `RetinaNet` (the architecture family of MONAI's `lung_nodule_ct_detection` bundle) built by
`inference.networks.retinanet.build_retinanet`: a ResNet backbone of basic blocks (layers
{net["layers"]}, planes {net["planes"]}, first convolution {net["conv1_t_size"]} with stride
{net["conv1_t_stride"]}, then max pooling), an FPN of {net["fpn_channels"]} channels over layers
{net["returned_layers"]} plus a max-pooled level (strides 4, 8 and 16 voxels), and RetinaNet's
classification and box-regression heads. {m["parameters"]:,} parameters; `model.pt` is a float32 state dict
of {m["weights_bytes"] / 1e6:.2f} MB.

* Preprocessing: RAS orientation, {config.preprocessing.spacing_mm[0]:g} mm isotropic spacing (bilinear), HU
  window [{config.preprocessing.a_min:g}, {config.preprocessing.a_max:g}] -> [0, 1].
* Inference: sliding-window patches of {list(config.inferer.roi_size)} voxels, overlap
  {config.inferer.overlap} (patches overlap by >= 36 mm, more than the largest nodule); anchors
  {[list(a) for a in config.detector.base_anchor_shapes]} voxels x scales {list(config.detector.feature_map_scales)};
  per patch: sigmoid score >= {config.postprocessing.score_threshold}, top 100 per level, NMS IoU
  {config.postprocessing.nms_iou}; per study: boxes cut by an interior patch border dropped, NMS, at most
  {config.postprocessing.max_detections} findings, boxes under {config.postprocessing.min_size_mm:g} mm dropped.
* Output: `Finding(label="nodule")` with the box center and bounding box in LPS mm, the longest box side as
  `diameter_mm`, the center's voxel in the input volume and the nearest source image.

## Training data

`inference.phantoms.chest_ct.make_chest_ct`: chest CT in HU — air -1000, body soft tissue 30-60 HU, two
ellipsoidal lungs about -850 HU, Gaussian noise sigma 10-40 HU, 0-5 solid spherical or lobulated nodules of
5-30 mm and 0-100 HU with partial-volume edges; pixel spacing 0.5-1.0 mm, slice spacing 0.625-3 mm, axial
orientations with random flips. {s["train_phantoms"]} training phantoms with matrices
{TRAIN_MATRICES[0]}-{TRAIN_MATRICES[-1]} and {TRAIN_SLICES[0]}-{TRAIN_SLICES[1]} slices (smaller than the
clinical range, to fit a CPU budget; the spacing and orientation ranges are the generator's full ranges), 1-5
nodules asked for each. Targets: one cube per nodule, centered on its planted centroid, side = its longest
diameter, in the preprocessed image's voxel-edge coordinates.

## Training

MONAI `RetinaNetDetector` in training mode: ATSS matching (4 candidates per level), sigmoid focal loss
(alpha {s["focal_alpha"]}, gamma {s["focal_gamma"]}, normalised by the positive anchors), smooth-L1 box
regression on encoded targets. {s["iterations"]} iterations of {s["batch_size"]} random
{"x".join(map(str, s["crop_voxels"]))} crops ({s["positive_fraction"]:.0%} around a nodule, the rest anywhere,
random flips, intensity and noise jitter); AdamW, lr {s["learning_rate"]:g} with warm-up and cosine decay.
Training took {m["time_s"]["train"] / 60:.1f} min (data {m["time_s"]["data"] / 60:.1f} min) on the machine below;
the whole script, evaluation included, {m["time_s"]["total"] / 60:.1f} min.

The score threshold {m["score_threshold"]} was chosen on {val["studies"]} validation phantoms (own seed):
the middle of the threshold range with the best sensitivity for nodules >= 8 mm where no validation study
has more than {s["max_fp_per_study"]} false positive. At it the validation sensitivity (>= 8 mm, 3 mm) was
{_pct(val["sensitivity_ge_min"])} with {val["fp_per_scan_mean"]:.2f} FP/scan (max {val["fp_per_scan_max"]}).

## Held-out test metrics

{m["test"]["studies"]} test phantoms from their own seed, with the generator's full ranges (matrix 128-512,
40-400 slices), read with `run_direct` (the service's prepare / batched forward / split / finalize) at the
committed threshold. A finding is a hit when its center is within the tolerance of a planted nodule's
centroid (one finding per nodule, by decreasing score); every other finding is a false positive.

| metric | within 3 mm | within 5 mm |
|---|---|---|
| sensitivity, nodules >= 8 mm ({t3["nodules_ge_min"]}) | {_pct(t3["sensitivity_ge_min"])} \
| {_pct(t5["sensitivity_ge_min"])} |
| sensitivity, all nodules ({t3["nodules_all"]}) | {_pct(t3["sensitivity_all"])} | {_pct(t5["sensitivity_all"])} |
| false positives per scan, mean | {t3["fp_per_scan_mean"]:.2f} | {t5["fp_per_scan_mean"]:.2f} |
| false positives per scan, max | {t3["fp_per_scan_max"]} | {t5["fp_per_scan_max"]} |

Localisation error of the >= 8 mm nodules hit within 5 mm: median {fmt(err["median"])} mm, 90th percentile
{fmt(err["p90"])} mm, max {fmt(err["max"])} mm. Mean reading time of the test studies
{m["test"]["mean_read_s"]} s (max {m["test"]["max_read_s"]} s).

## Reading time

A {"x".join(map(str, timing["shape"]))} study, `run_direct` with batches of {config.batching.max_batch_size},
{timing["torch_threads"]} torch threads: **{timing["mean_s"]} s** mean over {len(timing["seconds"])} studies
({timing["seconds"]} s; spacings {timing["spacings_mm"]} mm), on {m["machine"]["cores"]} CPU cores
({m["machine"]["cpu"]}, torch {m["machine"]["torch"]}), shared with other work.

## Reproduce

```
{m["command"]}
```

Seeded (phantoms, crops, initialisation): the same command on the same machine writes the same `model.pt`.
`metrics.json` holds every number above, the validation threshold curve and the settings.

## Limitations

* Synthetic data only: smooth ellipsoidal lungs, no vessels, airways, bones or motion; nodules only inside
  the lungs (no juxta-pleural nodules). Expect false positives and misses on anything else.
* Nodules under 8 mm (4-5 voxels at {config.preprocessing.spacing_mm[0]:g} mm) are found less reliably.
* `diameter_mm` is the longest side of the predicted box, not a measured nodule diameter.
"""


if __name__ == "__main__":
    sys.exit(main())
