"""Train the chest_xray opacity detector from scratch on synthetic radiographs, then evaluate it.

    .venv/bin/python models/chest_xray/train.py --out models/chest_xray/1

Reads the architecture, anchors and preprocessing from ``OUT/model.yaml`` and writes:

* ``OUT/model.pt``: the network's state dict.
* ``OUT/model.yaml``: only ``postprocessing.score_threshold`` is rewritten, to the threshold tuned on a
  validation set (the highest sensitivity with at most ``--max-val-fp`` false positives per image; among
  equals the highest threshold).
* ``OUT/metrics.json``: training and validation figures, and the held-out evaluation.
* ``OUT/MODEL_CARD.md``: the card, with this run's numbers (``--card-only`` rewrites it from metrics.json).

Training images are drawn like real ones (a full-size detector geometry, 1024-3000 pixels of 0.1-0.2 mm)
but rendered straight onto the model's input grid (``ProjectionGeometry`` of the task, the same pixel
centers as resampling the full image), tens of times cheaper than rendering full size and resampling.
They are normalised and padded by the task's own ``normalize_and_pad``; the network trains on random
crops (biased towards opacities) with MONAI's ``RetinaNetDetector`` (ATSS matcher, hard negative
sampler), Adam and a cosine learning rate.

The held-out evaluation goes through the full-resolution path: full-size phantoms (DX and CR,
MONOCHROME1 and MONOCHROME2, 12 and 16 bits) -> ``ProjectionDetectionTask.prepare`` -> network ->
``finalize`` via ``run_direct``. A planted opacity counts as found when a finding's center lies within
``--match-mm`` of its center; a finding farther than max(match, radius) from every opacity is a false
positive. Seeded: data, initialisation and sampling all derive from ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector

from inference.modelrepo.schema import ModelConfig
from inference.outputs.finding import Finding
from inference.phantoms.chest_xray import (
    BITS_STORED_CHOICES,
    PHOTOMETRICS,
    XRAY_MODALITIES,
    ChestXrayParams,
    PixelGrid,
    make_chest_xray,
    render_chest_xray,
    sample_chest_xray_params,
)
from inference.tasks.direct import load_network, run_direct
from inference.tasks.postprocess.detection import build_anchor_generator
from inference.tasks.postprocess.projection import ProjectionGeometry, projection_findings
from inference.tasks.projection import ProjectionDetectionTask, normalize_and_pad
from inference.training import cpu_name, setup

logger = logging.getLogger("train_chest_xray")

THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.10, 0.96, 0.05))


@dataclass(frozen=True)
class Example:
    image: torch.Tensor  # (1, X, Y) network input
    boxes: np.ndarray  # (N, 4) input-grid edge coordinates
    geometry: ProjectionGeometry
    centers_mm: np.ndarray  # (N, 2) planted centers, image-plane mm
    diameters_mm: np.ndarray  # (N,)


def input_grid(geometry: ProjectionGeometry) -> PixelGrid:
    """The phantom pixel grid whose pixel centers are the network input's (rows, columns order)."""
    (sx, sy), (ox, oy) = geometry.input_spacing_mm, geometry.input_origin_mm
    return PixelGrid(
        shape=(geometry.resized_shape[1], geometry.resized_shape[0]), spacing_mm=(sy, sx), origin_mm=(ox, oy)
    )


def make_example(params: ChestXrayParams, config: ModelConfig) -> Example:
    """Render ``params`` on the input grid the task would resample the full-size image to."""
    rows, cols = params.size_px
    spacing_row, spacing_col = params.pixel_spacing_mm
    geometry = ProjectionGeometry.plan(
        (cols, rows), (spacing_col, spacing_row), config.inferer.roi_size, config.preprocessing.spacing_mm
    )
    phantom = render_chest_xray(params, input_grid(geometry))
    image = normalize_and_pad(
        torch.from_numpy(np.ascontiguousarray(phantom.volume.voxels[:, :, 0])), geometry, config.preprocessing
    )
    centers = np.array([lesion.center_mm for lesion in phantom.lesions], dtype=np.float64).reshape(-1, 2)
    diameters = np.array([lesion.diameter_mm for lesion in phantom.lesions], dtype=np.float64)
    centers_edge = geometry.mm_to_input_edges(centers) if len(centers) else np.zeros((0, 2))
    half = diameters[:, None] / np.asarray(geometry.input_spacing_mm)[None, :] / 2.0
    boxes = np.concatenate([centers_edge - half, centers_edge + half], axis=1)
    return Example(image, boxes, geometry, centers, diameters)


def random_crop(
    rng: np.random.Generator, example: Example, crop: int, positive_fraction: float
) -> tuple[torch.Tensor, np.ndarray]:
    """A ``crop``-pixel square of the input, centered near an opacity with probability ``positive_fraction``.

    Boxes are clipped to the crop; those with less than 40 % of their area inside are dropped. Random
    horizontal flips and gamma make the rest of the augmentation.
    """
    size = np.asarray(example.image.shape[1:])
    extent = np.maximum(np.asarray(example.geometry.resized_shape), crop)  # keep crops mostly on the image
    if len(example.boxes) and rng.random() < positive_fraction:
        box = example.boxes[rng.integers(len(example.boxes))]
        center = (box[:2] + box[2:]) / 2 + rng.uniform(-0.35, 0.35, size=2) * crop
        origin = np.rint(center - crop / 2).astype(int)
    else:
        origin = np.array([rng.integers(0, e - crop + 1) for e in extent])
    origin = np.clip(origin, 0, size - crop)
    image = example.image[:, origin[0] : origin[0] + crop, origin[1] : origin[1] + crop]
    boxes = example.boxes - np.tile(origin, 2)
    if len(boxes):
        clipped = np.clip(boxes, 0, crop)
        area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
        kept = np.prod(np.clip(clipped[:, 2:] - clipped[:, :2], 0, None), axis=1) >= 0.4 * area
        boxes = clipped[kept]
    if rng.random() < 0.5:
        image = image.flip(1)
        boxes = np.stack([crop - boxes[:, 2], boxes[:, 1], crop - boxes[:, 0], boxes[:, 3]], axis=1)
    image = image.clamp_min(0.0) ** float(np.exp(rng.uniform(np.log(0.7), np.log(1.4))))
    return image, boxes.reshape(-1, 4)


def build_detector(network: torch.nn.Module, config: ModelConfig) -> RetinaNetDetector:
    assert config.detector is not None
    detector = RetinaNetDetector(network, build_anchor_generator(config.detector))
    detector.set_atss_matcher(num_candidates=4, center_in_gt=False)
    detector.set_hard_negative_sampler(batch_size_per_image=64, positive_fraction=0.3, pool_size=20, min_neg=16)
    detector.set_target_keys(box_key="boxes", label_key="labels")
    return detector


def train(
    network: torch.nn.Module, config: ModelConfig, rng: np.random.Generator, args: argparse.Namespace
) -> dict[str, object]:
    detector = build_detector(network, config)
    detector.train()
    optimizer = torch.optim.Adam(network.parameters(), lr=args.lr)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup)
        * (0.02 + 0.98 * 0.5 * (1 + np.cos(np.pi * min(s, args.steps) / args.steps))),
    )
    start, start_cpu = time.perf_counter(), time.process_time()
    history = []
    window: list[tuple[float, float]] = []
    pool: list[Example] = []
    for step in range(args.steps):
        # A fresh image with probability 1 / crops_per_image per crop: about that many crops per rendered image.
        batch_images, targets = [], []
        for _ in range(args.batch_size):
            if not pool or rng.random() < 1.0 / args.crops_per_image:
                pool = [make_example(sample_chest_xray_params(rng), config)]
            image, boxes = random_crop(rng, pool[0], args.crop, args.positive_fraction)
            batch_images.append(image)
            targets.append(
                {
                    "boxes": torch.as_tensor(boxes, dtype=torch.float32),
                    "labels": torch.zeros(len(boxes), dtype=torch.long),
                }
            )
        losses = detector(torch.stack(batch_images), targets)
        loss = losses["classification"] + losses["box_regression"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 5.0)
        optimizer.step()
        schedule.step()
        window.append((losses["classification"].item(), losses["box_regression"].item()))
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            cls_loss, box_loss = np.mean(window, axis=0)
            elapsed = time.perf_counter() - start
            history.append({"step": step + 1, "cls": round(float(cls_loss), 4), "box": round(float(box_loss), 4)})
            logger.info(
                "step %d/%d  cls %.4f  box %.4f  lr %.2e  %.0f s",
                step + 1,
                args.steps,
                cls_loss,
                box_loss,
                schedule.get_last_lr()[0],
                elapsed,
            )
            window = []
    return {
        "train_s": round(time.perf_counter() - start, 1),
        "train_cpu_s": round(time.process_time() - start_cpu, 1),  # wall time depends on the machine's other jobs
        "history": history,
    }


@dataclass(frozen=True)
class Match:
    """One image's findings against its planted opacities."""

    found: int
    false_positives: int
    center_errors_mm: list[float]  # per found opacity, to the nearest finding
    diameter_errors_mm: list[float]  # per found opacity: that finding's diameter minus the planted one


def match(findings: Sequence[Finding], centers_mm: np.ndarray, diameters_mm: np.ndarray, match_mm: float) -> Match:
    """An opacity is found by a finding within ``match_mm`` of its center; a finding farther than
    max(match_mm, radius) from every opacity is a false positive."""
    centers = np.array([f.center_mm for f in findings], dtype=np.float64).reshape(-1, 2)
    center_errors, diameter_errors = [], []
    for center, diameter in zip(centers_mm, diameters_mm, strict=True):
        d = np.linalg.norm(centers - center, axis=1) if len(centers) else np.array([np.inf])
        if d.min() <= match_mm:
            center_errors.append(float(d.min()))
            diameter_errors.append(float(findings[int(d.argmin())].diameter_mm - diameter))
    false_positives = 0
    for center in centers:
        d = np.linalg.norm(centers_mm - center, axis=1) if len(centers_mm) else np.array([])
        if not np.any(d <= np.maximum(match_mm, diameters_mm / 2)):
            false_positives += 1
    return Match(len(center_errors), false_positives, center_errors, diameter_errors)


def tune_threshold(
    network: torch.nn.Module, config: ModelConfig, rng: np.random.Generator, args: argparse.Namespace
) -> dict[str, object]:
    """Sensitivity and FP per image at each threshold on input-grid validation images; pick the threshold."""
    task = ProjectionDetectionTask(config, torch.device("cpu"), score_threshold=min(THRESHOLDS))
    examples = [make_example(sample_chest_xray_params(rng), config) for _ in range(args.val_images)]
    findings = []
    network.eval()
    with torch.inference_mode():
        for start in range(0, len(examples), 8):
            chunk = examples[start : start + 8]
            detections = task.split_outputs(network(torch.stack([e.image for e in chunk])), len(chunk))
            findings += [
                projection_findings(d, e.geometry, config.labels, min_size_mm=config.postprocessing.min_size_mm)
                for d, e in zip(detections, chunk, strict=True)
            ]
    planted = sum(len(e.centers_mm) for e in examples)
    curve = []
    for threshold in THRESHOLDS:
        found = fps = 0
        for example, image_findings in zip(examples, findings, strict=True):
            kept = [f for f in image_findings if f.score >= threshold]
            result = match(kept, example.centers_mm, example.diameters_mm, args.match_mm)
            found, fps = found + result.found, fps + result.false_positives
        curve.append(
            {"threshold": threshold, "sensitivity": found / max(planted, 1), "fp_per_image": fps / len(examples)}
        )
    admissible = [c for c in curve if c["fp_per_image"] <= args.max_val_fp] or [curve[-1]]
    # The most sensitive operating point within the FP budget and, among equals, the one with the fewest false
    # positives (the highest threshold): the target is at most one false positive in any image.
    best = max(admissible, key=lambda c: (c["sensitivity"], c["threshold"]))
    logger.info(
        "validation (%d images, %d opacities): threshold %.2f -> sensitivity %.3f, %.2f FP/image",
        len(examples),
        planted,
        best["threshold"],
        best["sensitivity"],
        best["fp_per_image"],
    )
    return {"images": len(examples), "opacities": planted, "curve": curve, "chosen": best}


def evaluate(config: ModelConfig, rng: np.random.Generator, args: argparse.Namespace) -> dict[str, object]:
    """Held-out full-size phantoms through the task and run_direct, as the service reads them."""
    torch.manual_seed(0)
    task = ProjectionDetectionTask(config, torch.device("cpu"))
    network = load_network(task)
    run_direct(task, network, make_chest_xray(rng, n_opacities=1).volume)  # warm-up, not counted
    groups: dict[str, dict[str, float]] = {}
    images, reads_s, found_total, planted_total, fp_total = [], [], 0, 0, 0
    center_errors: list[float] = []
    diameter_errors: list[float] = []
    for n in range(args.test_images):
        modality = XRAY_MODALITIES[n % 2]
        photometric = PHOTOMETRICS[(n // 2) % 2]
        bits = BITS_STORED_CHOICES[(n // 4) % 2]
        phantom = make_chest_xray(rng, modality=modality, photometric=photometric, bits_stored=bits)
        start = time.perf_counter()
        findings = run_direct(task, network, phantom.volume, batch_size=1)
        reads_s.append(time.perf_counter() - start)
        centers = np.array([lesion.center_mm for lesion in phantom.lesions], dtype=np.float64).reshape(-1, 2)
        diameters = np.array([lesion.diameter_mm for lesion in phantom.lesions], dtype=np.float64)
        result = match(findings, centers, diameters, args.match_mm)
        found, fps = result.found, result.false_positives
        center_errors += result.center_errors_mm
        diameter_errors += result.diameter_errors_mm
        found_total, planted_total, fp_total = found_total + found, planted_total + len(centers), fp_total + fps
        for key in (modality, photometric, f"{bits}-bit"):
            g = groups.setdefault(key, {"images": 0, "opacities": 0, "found": 0, "false_positives": 0})
            g["images"] += 1
            g["opacities"] += len(centers)
            g["found"] += found
            g["false_positives"] += fps
        shape = phantom.volume.shape
        images.append(
            {
                "size_px": [shape[1], shape[0]],
                "spacing_mm": round(phantom.volume.spacing_mm[0], 4),
                "modality": modality,
                "photometric": photometric,
                "bits_stored": bits,
                "opacity_diameters_mm": [round(float(d), 1) for d in diameters],
                "found": found,
                "false_positives": fps,
                "read_s": round(reads_s[-1], 3),
            }
        )
        logger.info(
            "test %d: %dx%d %s %s %d-bit, %d/%d found, %d FP, %.2f s",
            n,
            shape[1],
            shape[0],
            modality,
            photometric,
            bits,
            found,
            len(centers),
            fps,
            reads_s[-1],
        )
    benchmark = {}
    for size in (512, 2048):  # DESIGN.md: X-ray timings for 512x512 and 2048x2048 16-bit DX images
        volume = make_chest_xray(rng, size_px=(size, size), modality="DX", bits_stored=16).volume
        times = []
        for _ in range(3):
            start = time.perf_counter()
            run_direct(task, network, volume, batch_size=1)
            times.append(time.perf_counter() - start)
        benchmark[f"{size}x{size}"] = round(statistics.fmean(times), 3)
    for g in groups.values():
        g["sensitivity"] = round(g["found"] / max(g["opacities"], 1), 4)
        g["fp_per_image"] = round(g["false_positives"] / g["images"], 4)
    return {
        "images": len(images),
        "opacities": planted_total,
        "found": found_total,
        "sensitivity": round(found_total / max(planted_total, 1), 4),
        "false_positives": fp_total,
        "fp_per_image": round(fp_total / len(images), 4),
        "center_error_mm": {
            "mean": round(statistics.fmean(center_errors), 2) if center_errors else None,
            "max": round(max(center_errors), 2) if center_errors else None,
        },
        "diameter_error_mm": {  # finding's diameter minus the planted one, for the found
            "mean": round(statistics.fmean(diameter_errors), 2) if diameter_errors else None,
            "mean_abs": round(statistics.fmean(np.abs(diameter_errors)), 2) if diameter_errors else None,
        },
        "read_s_per_image": {
            "median": round(statistics.median(reads_s), 3),
            "mean": round(statistics.fmean(reads_s), 3),
            "max": round(max(reads_s), 3),
        },
        "read_s_16bit_dx": benchmark,
        "groups": groups,
        "per_image": images,
    }


def write_threshold(model_yaml: Path, threshold: float) -> None:
    """Rewrite the one ``score_threshold:`` line of model.yaml, keeping its comments."""
    text = model_yaml.read_text()
    pattern = re.compile(r"^(\s+score_threshold:\s*)[0-9.]+", re.MULTILINE)
    if len(pattern.findall(text)) != 1:
        raise ValueError(f"{model_yaml} must have exactly one score_threshold line")
    model_yaml.write_text(pattern.sub(lambda m: f"{m.group(1)}{threshold:.2f}", text))


def write_model_card(out: Path, metrics: dict) -> Path:
    """MODEL_CARD.md from a run's metrics, so that the card always states that run's numbers."""
    config = ModelConfig.from_yaml(out / "model.yaml")
    assert config.detector is not None
    args, test, val, training = metrics["args"], metrics["test"], metrics["validation"], metrics["training"]
    net = config.network.args
    group_rows = "\n".join(
        f"| {name} | {g['images']} | {g['opacities']} | {100 * g['sensitivity']:.1f} % | {g['fp_per_image']:.2f} |"
        for name, g in sorted(test["groups"].items())
    )
    bench, diameter = test["read_s_16bit_dx"], test["diameter_error_mm"]
    cpu_s = training.get("train_cpu_s")
    cpu = f" ({cpu_s / 60:.1f} min of CPU time)" if cpu_s else ""
    anchors = [list(a) for a in config.detector.base_anchor_shapes]
    card = f"""# chest_xray — model card

Written by `models/chest_xray/train.py` on {metrics["date"]}; the numbers below are that run's (`metrics.json`).

## Intended use

Detection of round opacities (8-40 mm) in the lung fields of PA chest radiographs (CR, DX), as the reference
projection X-ray model of radserve: for research, demos, tests and benchmarks of the serving stack.
**Trained and tested on synthetic phantoms only. Not a medical device; not for clinical use.** On real
radiographs it has never been evaluated and must be assumed not to work.

## Architecture

MONAI `RetinaNet` (2-D) over a thin ResNet + FPN (`inference.networks.retinanet.build_retinanet`, shared with
the CT detector): planes {list(net["planes"])}, layers {list(net["layers"])} (built up to layer
{max(net["returned_layers"])}), an FPN of {net["fpn_channels"]} channels on feature maps of strides 8, 16 and 32
(the last max-pooled), {net["num_anchors"]} square anchors per location ({anchors} input pixels x
{list(config.detector.feature_map_scales)}), one class (`opacity`). {metrics["parameters"]:,} parameters;
`model.pt` is a float32 state dict of {metrics["weights_bytes"] / 1e6:.2f} MB.

* Preprocessing (`ProjectionDetectionTask.prepare`): the image is resampled (antialiased bilinear) with one
  pixel size on both axes so that its field of view fills {list(config.inferer.roi_size)} pixels, never finer
  than {list(config.preprocessing.spacing_mm)} mm, and padded at the high end; intensities: the
  {config.preprocessing.percentile_low:g}st-{config.preprocessing.percentile_high:g}th percentiles of the
  resampled image -> [0, 1], clipped. The image must be in the MONOCHROME2 sense: the DICOM reader inverts
  MONOCHROME1.
* Decoding: MONAI anchors, box coder and box selector (`RetinaNetDecoder`, shared with the CT detector);
  score threshold {config.postprocessing.score_threshold:.2f} (tuned on validation, see below), NMS IoU
  {config.postprocessing.nms_iou}, boxes under {config.postprocessing.min_size_mm:g} mm dropped, at most
  {config.postprocessing.max_detections} per image.
* Output: one `Finding(label="opacity")` per box on the image plane (the projection contract): `center_mm`
  [x, y] = [column x column spacing, row x row spacing] from the center of the top-left pixel, `bbox_mm`
  [x0, y0, x1, y1], `diameter_mm` the longest box side, `center_voxel` = center_px [column, row],
  `sop_instance_uid` of the image.
* Batching: one {list(config.inferer.roi_size)} work item per image, so images of any size from many requests
  share a forward pass (max batch {config.batching.max_batch_size}, {config.batching.max_queue_delay_ms:g} ms
  delay); bf16 autocast on CUDA.

## Training data

`inference.phantoms.chest_xray`: PA chest radiographs of 1024-3000 pixels a side at 0.1-0.2 mm (fields of view
150-450 mm), anatomy scaled to the field of view: body outline (air outside), two lung fields, posterior and
anterior ribs, clavicles, spine, mediastinum and heart, a faint lung texture, a vertical gradient and Gaussian
noise; 0-3 non-overlapping round opacities of 8-40 mm (capped by the lung size in small fields of view) with a
smooth profile `(1 - (d/r)^2)^p`, p 0.5-1, contrast 0.2-0.45 of soft tissue, inside the lung fields, clear of
heart and mediastinum; 12- or 16-bit values, DX or CR, MONOCHROME1 or MONOCHROME2 (storage only: the phantom
volume holds what the reader returns). Training images are drawn with full-size geometry but rendered directly
on the model's input grid (the pixel centers resampling would give), a fresh image every
{args["crops_per_image"]} crops on average.

## Training

MONAI `RetinaNetDetector` in training mode: ATSS matcher (4 candidates per level), hard negative sampler (64
anchors per image, 30 % positive), BCE classification loss, smooth-L1 box regression. {args["steps"]} steps of
{args["batch_size"]} random {args["crop"]}x{args["crop"]} crops ({100 * args["positive_fraction"]:.0f} % centered
near an opacity; horizontal flips, gamma 0.7-1.4); Adam, lr {args["lr"]:g} with warm-up and cosine decay;
{args["threads"]} torch thread. Training took {training["train_s"] / 60:.1f} min{cpu} on the machine below.
The score threshold is the one with the highest sensitivity at no more than {args["max_val_fp"]:g} false
positives per image (among equals the highest) on {val["images"]} validation images ({val["opacities"]}
opacities, input-grid renders, own seed): {val["chosen"]["threshold"]:.2f}, with a validation sensitivity of
{100 * val["chosen"]["sensitivity"]:.1f} % at {val["chosen"]["fp_per_image"]:.2f} FP/image.

## Held-out test metrics

{test["images"]} full-size phantoms from their own seed (1024-3000 px; every combination of DX/CR,
MONOCHROME1/2 and 12/16 bits; 0-3 opacities), read with `run_direct` (the service's prepare / forward / split /
finalize) from the full-resolution volume. An opacity is found when a finding's center lies within
{metrics["match_mm"]:g} mm of its center; a finding farther than max({metrics["match_mm"]:g} mm, radius) from
every opacity is a false positive.

| metric | value |
|---|---|
| sensitivity ({test["opacities"]} opacities) | **{100 * test["sensitivity"]:.1f} %** ({test["found"]} found) |
| false positives per image | **{test["fp_per_image"]:.2f}** ({test["false_positives"]} in {test["images"]} images) |
| center error of the found, mean / max | {test["center_error_mm"]["mean"]} / {test["center_error_mm"]["max"]} mm |
| `diameter_mm` minus the planted diameter, mean / mean absolute | {diameter["mean"]} / {diameter["mean_abs"]} mm |

| group | images | opacities | sensitivity | FP / image |
|---|---|---|---|---|
{group_rows}

MONOCHROME1 and MONOCHROME2 differ only in how the file stores the image: `tests/tasks/test_projection.py`
checks that the reader's inversion gives the task the same input.

## Reading time

`run_direct`, batch 1, {metrics["machine"]}, torch {metrics["torch"]},
{metrics["date"]}: a 2048x2048 16-bit DX image **{bench["2048x2048"]:.2f} s**, 512x512 {bench["512x512"]:.2f} s
(mean of 3 reads); the held-out images (1024-3000 px) median {test["read_s_per_image"]["median"]:.2f} s, max
{test["read_s_per_image"]["max"]:.2f} s. Resampling the full-size image is included.

## Reproduce

```
{metrics["command"]}
```

Seeded (phantoms, crops, initialisation): the same command on the same software and thread count writes the
same `model.pt`. `metrics.json` holds every number above, the validation curve and each test image;
`--card-only` rewrites this card from it.

## Limitations

* Synthetic data only: elliptic lung fields, regular ribs, no vessels, hila, devices, lines, collimation,
  lateral views or real noise texture. Expect false positives and misses on anything else.
* Opacities are round, smooth and isolated: no consolidation, clusters, cavities or calcification.
* The input must be PA-like in standard display orientation (the patient's left on the image's right, head
  up); horizontal flips were in training, rotations and vertical flips were not.
* Small opacities in large fields of view are 6-7 input pixels across; anything under ~8 mm is out of scope.
* Positions are image-plane mm at the spacing the reader used (PixelSpacing, else ImagerPixelSpacing, which is
  at the detector and not corrected for magnification).
"""
    path = out / "MODEL_CARD.md"
    path.write_text(card)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "1")
    parser.add_argument("--seed", type=int, default=20261128)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=192)
    parser.add_argument("--crops-per-image", type=int, default=2)
    parser.add_argument("--positive-fraction", type=float, default=0.6)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--val-images", type=int, default=64)
    parser.add_argument("--max-val-fp", type=float, default=0.25)
    parser.add_argument("--test-images", type=int, default=32)
    parser.add_argument("--match-mm", type=float, default=5.0)
    # One thread: on this shared 2-core machine a 2-thread step measured 6-8x slower than a 1-thread step
    # under load (OpenMP barriers spin while other jobs hold the cores).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--card-only", action="store_true", help="rewrite MODEL_CARD.md from OUT/metrics.json")
    args = parser.parse_args(argv)
    setup(args.threads)
    if args.card_only:
        write_model_card(args.out, json.loads((args.out / "metrics.json").read_text()))
        return 0

    torch.manual_seed(args.seed)
    train_seq, val_seq, test_seq = np.random.SeedSequence(args.seed).spawn(3)
    model_yaml = args.out / "model.yaml"
    config = ModelConfig.from_yaml(model_yaml)
    task = ProjectionDetectionTask(config, torch.device("cpu"))
    network = task.build_network()
    n_params = sum(p.numel() for p in network.parameters())
    logger.info(
        "training %s: %d parameters, %d steps of %d crops of %d px",
        config.name,
        n_params,
        args.steps,
        args.batch_size,
        args.crop,
    )

    started = datetime.now(UTC)
    training = train(network, config, np.random.default_rng(train_seq), args)
    weights = args.out / config.network.weights
    torch.save(network.state_dict(), weights)
    validation = tune_threshold(network, config, np.random.default_rng(val_seq), args)
    write_threshold(model_yaml, float(validation["chosen"]["threshold"]))  # type: ignore[index]
    config = ModelConfig.from_yaml(model_yaml)
    test = evaluate(config, np.random.default_rng(test_seq), args)
    logger.info(
        "held-out (%d full-size images, %d opacities): sensitivity %.3f, %.2f FP/image, median read %.2f s",
        test["images"],
        test["opacities"],
        test["sensitivity"],
        test["fp_per_image"],
        test["read_s_per_image"]["median"],  # type: ignore[index]
    )
    metrics = {
        "model": f"{config.name}:{config.version}",
        "date": started.strftime("%Y-%m-%d"),
        "machine": f"{cpu_name()} ({os.cpu_count()} cores, shared with other jobs), {args.threads} torch thread(s)",
        "torch": torch.__version__,
        "command": "python models/chest_xray/train.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "parameters": n_params,
        "weights_bytes": weights.stat().st_size,
        "score_threshold": config.postprocessing.score_threshold,
        "match_mm": args.match_mm,
        "training": training,
        "validation": validation,
        "test": test,
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_model_card(args.out, metrics)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
