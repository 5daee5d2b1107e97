"""In-process baselines, on the same studies and the same network as the service.

``direct``: the server's decode of the payload bytes, held in memory (``Study.decode``, the server's readers), then
radserve's own Task code path with no server (:func:`inference.tasks.direct.run_direct`): prepare (preprocessing
on the model's device), forward in batches of the model's ``max_batch_size``, split, finalize. Studies of one work
item (projection X-ray) are batched across consecutive studies, as the server's batcher does, so that ``direct``
uses the same batch sizes; CT studies go through ``run_direct`` one at a time. No file reading, no gRPC, no
queue: this is the ceiling for the service, which must decode too.

``naive``: what a researcher writes with MONAI alone, one study at a time: load the file (``LoadImage``, the
NIfTI the benchmark wrote from the same voxels; pydicom for an X-ray image), a CPU ``Compose`` of
``Orientation`` + ``Spacing`` + intensity scaling, then the same network with MONAI's ``RetinaNetDetector``:
``monai.inferers.sliding_window_inference`` (through ``SlidingWindowInferer``) with ``sw_batch_size=1`` for CT,
one whole image per forward pass for X-ray. Boxes are mapped back through the image's affine, so its findings
are in the same patient coordinates as the service's (it is slow, not wrong).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from inference.modelrepo.schema import ModelConfig
from inference.tasks import task_class
from inference.tasks.base import Task
from inference.tasks.direct import forward_items, load_network, run_direct

logger = logging.getLogger(__name__)


@dataclass
class BaselineResult:
    name: str  # direct | naive
    studies: int
    images: int
    wall_s: float
    cpu_s: float  # CPU time of this process during the measured pass
    latencies_ms: list[float] = field(default_factory=list)  # per study (direct, batched X-ray: per batch / size)
    findings: dict[str, list[list[float]]] = field(default_factory=dict)  # study name -> finding centers (mm)
    detail: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_ms or [0.0])
        return {
            "name": self.name,
            "studies": self.studies,
            "images": self.images,
            "wall_s": round(self.wall_s, 3),
            "studies_per_s": round(self.studies / self.wall_s, 4) if self.wall_s else None,
            "images_per_s": round(self.images / self.wall_s, 3) if self.wall_s else None,
            "cpu": {"process_cpu_s": round(self.cpu_s, 2), "cpu_s_per_study": round(self.cpu_s / self.studies, 3)},
            "latency_ms": {
                "p50": round(float(np.percentile(lat, 50)), 1),
                "mean": round(float(lat.mean()), 1),
                "max": round(float(lat.max()), 1),
            },
            **self.detail,
        }


def in_worker_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` in a fresh worker thread, as the server runs its forward passes (the batcher's thread).

    On a busy 2-core machine, torch's intra-op threads started from the main thread spin against other processes:
    the same batch of 8 X-ray images took 1.46 s from the main thread and 0.78 s from a worker thread (load 5.7).
    Both baselines run this way, so that they are not slowed by where they run.

    The thread is a daemon and the wait for it can be interrupted: a run ended by SIGTERM (benchmarks/run.py) writes
    its results and exits without waiting for a baseline that may take minutes more.
    """
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=work, name="baseline", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def load_task(model_dir: Any, device: torch.device) -> tuple[Task, torch.nn.Module]:
    """The task and network of one model version directory (``models/<name>/<version>``)."""
    config = ModelConfig.from_yaml(model_dir / "model.yaml")
    task = task_class(config)(config, device)
    return task, load_network(task)


# -- direct -----------------------------------------------------------------------------------------------------


def run_direct_baseline(
    task: Task, network: torch.nn.Module, studies: Sequence[Any], *, warmup: bool = True, passes: int = 2
) -> Any:
    """``studies``: :class:`benchmarks.workloads.Study` objects. Returns a :class:`BaselineResult`: the fastest of
    ``passes`` passes over the studies (a ceiling should not be lowered by a noisy moment; all passes are listed)."""
    return in_worker_thread(_run_direct_baseline, task, network, studies, warmup=warmup, passes=passes)


def _run_direct_baseline(
    task: Task, network: torch.nn.Module, studies: Sequence[Any], *, warmup: bool, passes: int
) -> Any:
    batch_size = task.config.batching.max_batch_size
    # What the server holds once a read is received: the payload's bytes, in memory (no file reading, no gRPC).
    payloads = {study.name: study.payload_files() for study in studies}
    if warmup:  # the first group (one full batch): kernels and allocations for that batch size
        _direct_pass(task, network, studies, payloads, batch_size, max_groups=1)
    best: BaselineResult | None = None
    walls = []
    for _ in range(max(1, passes)):
        start, cpu_start = time.perf_counter(), time.process_time()
        latencies, findings, decode_s = _direct_pass(task, network, studies, payloads, batch_size)
        wall_s = time.perf_counter() - start
        walls.append(round(wall_s, 3))
        result = BaselineResult(
            "direct",
            len(studies),
            sum(s.spec.n_images for s in studies),
            wall_s,
            time.process_time() - cpu_start,
            latencies,
            findings,
            {
                "batch_size": batch_size,
                "method": "decode from memory, then run_direct's stages, batches filled across consecutive studies",
                "decode_ms_per_study": round(decode_s * 1e3 / len(studies), 1),
            },
        )
        if best is None or result.wall_s < best.wall_s:
            best = result
    best.detail["passes_wall_s"] = walls
    return best


def _direct_pass(
    task: Task,
    network: torch.nn.Module,
    studies: Sequence[Any],
    payloads: dict[str, list[bytes]],
    batch_size: int,
    max_groups: int | None = None,
):
    """Decode each study's payload bytes (the server's readers), prepare studies until their items fill a batch,
    forward them in batches of ``batch_size``, finalize. Returns latencies, findings and the seconds spent decoding.

    Decoding is in the ceiling because the service must do it too, on the same cores; a study without a streamed
    payload (shared memory) starts from its decoded volume. A study with at least ``batch_size`` items is a group of
    its own: exactly :func:`run_direct`. Studies with fewer (one patch, one X-ray image) share batches, as the
    server's batcher makes them share forward passes.
    """
    latencies: list[float] = []
    findings: dict[str, list[list[float]]] = {}
    group: list[tuple[Any, Any, Any]] = []
    groups_done = 0
    decode_s = 0.0
    start = time.perf_counter()
    for i, study in enumerate(studies):
        decode_start = time.perf_counter()
        volume = study.decode(payloads[study.name]) if payloads.get(study.name) else study.volume
        decode_s += time.perf_counter() - decode_start
        group.append((study, volume, task.prepare(volume)))
        if sum(len(p.items) for _, _, p in group) < batch_size and i + 1 < len(studies):
            continue
        results = forward_items(task, network, [item for _, _, p in group for item in p.items], batch_size)
        first = 0
        for member, volume, prepared in group:
            found = task.finalize(volume, prepared, results[first : first + len(prepared.items)]).findings
            first += len(prepared.items)
            findings[member.name] = [list(f.center_mm) for f in found]
        elapsed_ms = (time.perf_counter() - start) * 1e3
        latencies += [elapsed_ms] * len(group)
        group, start = [], time.perf_counter()
        groups_done += 1
        if max_groups is not None and groups_done >= max_groups:
            break
    return latencies, findings, decode_s


def check_direct_matches_run_direct(task: Task, network: torch.nn.Module, study: Any) -> float:
    """Largest distance (mm) between the pooled direct path's findings and run_direct's, for one study."""
    payloads = {study.name: study.payload_files()}
    ours = _direct_pass(task, network, [study], payloads, task.config.batching.max_batch_size)[1][study.name]
    theirs = [list(f.center_mm) for f in run_direct(task, network, study.volume, task.config.batching.max_batch_size)]
    if len(ours) != len(theirs):
        return float("inf")
    return float(np.max(np.abs(np.subtract(ours, theirs)))) if ours else 0.0


# -- naive ------------------------------------------------------------------------------------------------------


def run_naive_baseline(task: Task, network: torch.nn.Module, studies: Sequence[Any], *, warmup: bool = False) -> Any:
    """MONAI alone, one study at a time (see the module docstring). Returns a :class:`BaselineResult`.

    No warm-up by default: a researcher's script reads each study cold, and for CT the first-call costs are
    small next to a naive read."""
    return in_worker_thread(_run_naive_baseline, task, network, studies, warmup=warmup)


def _run_naive_baseline(task: Task, network: torch.nn.Module, studies: Sequence[Any], *, warmup: bool) -> Any:
    reader = naive_ct if task.config.modalities[0] in ("CT", "MR") else naive_xray
    if warmup:
        reader(task.config, network, studies[0], task.device)
    latencies: list[float] = []
    findings: dict[str, list[list[float]]] = {}
    start_all, cpu_start = time.perf_counter(), time.process_time()
    for study in studies:
        start = time.perf_counter()
        findings[study.name] = reader(task.config, network, study, task.device)
        latencies.append((time.perf_counter() - start) * 1e3)
    wall_s = time.perf_counter() - start_all
    return BaselineResult(
        "naive",
        len(studies),
        sum(s.spec.n_images for s in studies),
        wall_s,
        time.process_time() - cpu_start,
        latencies,
        findings,
        {"sw_batch_size": 1, "method": "MONAI LoadImage + CPU Compose + RetinaNetDetector"},
    )


def _detector(config: ModelConfig, network: torch.nn.Module):
    """MONAI's RetinaNetDetector around the same network, with the model's anchors and box selection."""
    from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
    from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape

    anchors = AnchorGeneratorWithAnchorShape(
        feature_map_scales=tuple(config.detector.feature_map_scales),
        base_anchor_shapes=tuple(tuple(s) for s in config.detector.base_anchor_shapes),
        indexing="ij",
    )
    detector = RetinaNetDetector(network, anchors, size_divisible=tuple(config.detector.size_divisible))
    post = config.postprocessing
    detector.set_box_selector_parameters(
        score_thresh=post.score_threshold,
        topk_candidates_per_level=100,
        nms_thresh=post.nms_iou,
        detections_per_img=post.max_detections,
    )
    return detector.eval()


def naive_ct(config: ModelConfig, network: torch.nn.Module, study: Any, device: torch.device) -> list[list[float]]:
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation, ScaleIntensityRange, Spacing

    pre = config.preprocessing
    transforms = Compose(
        [
            LoadImage(image_only=True, reader="NibabelReader"),
            EnsureChannelFirst(),
            Orientation(axcodes="RAS"),
            Spacing(pixdim=pre.spacing_mm, mode="bilinear"),
            ScaleIntensityRange(a_min=pre.a_min, a_max=pre.a_max, b_min=pre.b_min, b_max=pre.b_max, clip=pre.clip),
        ]
    )
    image = transforms(str(study.nifti))  # MetaTensor (1, X, Y, Z), affine: voxel -> RAS mm
    detector = _detector(config, network)
    detector.set_sliding_window_inferer(
        roi_size=tuple(config.inferer.roi_size), sw_batch_size=1, overlap=config.inferer.overlap, mode="constant"
    )
    with torch.inference_mode():
        detections = detector(image.as_tensor()[None].to(device), use_inferer=True)[0]
    boxes = detections["boxes"].cpu().numpy().astype(np.float64)  # voxel edges, [x0, y0, z0, x1, y1, z1]
    centers_index = (boxes[:, :3] + boxes[:, 3:]) / 2.0 - 0.5
    affine_ras = np.asarray(image.affine, dtype=np.float64)
    centers_ras = centers_index @ affine_ras[:3, :3].T + affine_ras[:3, 3]
    return (centers_ras * [-1.0, -1.0, 1.0]).tolist()  # RAS -> LPS


def naive_xray(config: ModelConfig, network: torch.nn.Module, study: Any, device: torch.device) -> list[list[float]]:
    import pydicom
    from monai.data import MetaTensor
    from monai.transforms import Compose, ScaleIntensityRangePercentiles, Spacing, SpatialPad

    pre = config.preprocessing
    ds = pydicom.dcmread(study.files[0])
    spacing = [float(v) for v in (ds.get("PixelSpacing") or ds.ImagerPixelSpacing)]  # (row, column)
    pixels = torch.as_tensor(ds.pixel_array.T.astype(np.float32))  # (columns, rows): x first
    affine = torch.diag(torch.tensor([spacing[1], spacing[0], 1.0, 1.0], dtype=torch.float64))
    image = MetaTensor(pixels[None], affine=affine)
    fov_mm = np.asarray(pixels.shape) * [spacing[1], spacing[0]]
    zoom = max(1.0, float(np.max(fov_mm / (np.asarray(config.inferer.roi_size) * pre.spacing_mm))))
    transforms = Compose(
        [
            Spacing(pixdim=[s * zoom for s in pre.spacing_mm], mode="bilinear"),
            ScaleIntensityRangePercentiles(
                lower=pre.percentile_low, upper=pre.percentile_high, b_min=pre.b_min, b_max=pre.b_max, clip=pre.clip
            ),
            SpatialPad(spatial_size=tuple(config.inferer.roi_size), method="end", value=pre.b_min),
        ]
    )
    image = transforms(image)
    detector = _detector(config, network)
    with torch.inference_mode():
        detections = detector(image.as_tensor()[None].to(device))[0]
    boxes = detections["boxes"].cpu().numpy().astype(np.float64)
    centers_index = (boxes[:, :2] + boxes[:, 2:]) / 2.0 - 0.5
    affine_out = np.asarray(image.affine, dtype=np.float64)
    return (centers_index @ affine_out[:2, :2].T + affine_out[:2, 3]).tolist()  # image-plane mm
