"""The model.yaml schema, as typed dataclasses checked at construction.

A model version directory ``models/<name>/<version>/`` holds ``model.yaml``, the weights and a model
card. ``ModelConfig.from_yaml`` validates the YAML against these classes; every bound violated raises
ValueError quoting the offending value and its key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TASKS = ("detection", "segmentation")
MODALITIES = ("CT", "MR", "CR", "DX")
AUTOCAST = ("none", "bf16", "fp16")
BACKENDS = ("torch", "triton")
PROMOTE = ("auto", "manual")  # model.yaml `promote:` (README "Shadow and promote")
# A network's `target` must live in one of these packages: model.yaml is data, not a way to run any code.
# Network packages only: "monai." as a whole would admit e.g. monai.bundle.run, which evaluates a config file.
ALLOWED_TARGET_PREFIXES = ("monai.networks.", "monai.apps.detection.networks.", "inference.networks.")
# network.target of a model loaded from a MONAI bundle: the network comes from ModelConfig.network_factory
# (the bundle's network_def, built by MONAI's ConfigParser; see inference/modelrepo/bundle.py). model.yaml
# cannot use it: it cannot supply a factory, and a config with this target and no factory is rejected.
BUNDLE_NETWORK_TARGET = "bundle:network_def"


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


NORMALIZE_MODES = ("window", "zscore", "zscore_foreground", "percentile")
BLEND_MODES = ("gaussian", "constant")


@dataclass(frozen=True)
class PreprocessConfig:
    spacing_mm: tuple[float, ...] = (2.0, 2.0, 2.0)
    # Intensity window mapped linearly to [b_min, b_max] (clipped), e.g. HU for CT.
    a_min: float = -1000.0
    a_max: float = 500.0
    b_min: float = 0.0
    b_max: float = 1.0
    clip: bool = True
    # Per-image z-score normalisation instead of a fixed window (MR), or a per-image window between two
    # intensity percentiles mapped to [b_min, b_max] (projection X-ray, whose stored values have no fixed scale).
    # zscore: mean and standard deviation of the non-zero voxels (MONAI's NormalizeIntensity(nonzero=True)).
    # zscore_foreground: of the voxels above foreground_fraction x the percentile_high intensity, i.e. the body
    # without the noisy air around it, so the scale does not depend on the field of view (docs/decisions.md).
    normalize: str = "window"  # window | zscore | zscore_foreground | percentile
    percentile_low: float = 1.0
    percentile_high: float = 99.0
    foreground_fraction: float = 0.15
    # MR only: divide out a smooth multiplicative bias field before normalising, the exponential of a polynomial
    # of this degree in the voxel position fitted to the log intensity of the head's commonest tissue
    # (inference.tasks.preprocess.correct_bias). 0: no correction.
    bias_correction_degree: int = 0

    def __post_init__(self) -> None:
        if self.bias_correction_degree not in (0, 1, 2, 3):
            raise ValueError(
                f"preprocessing.bias_correction_degree must be 0 (off), 1, 2 or 3, got {self.bias_correction_degree!r}"
            )
        for s in self.spacing_mm:
            _positive("preprocessing.spacing_mm", s)
        if not self.a_max > self.a_min:
            raise ValueError(f"preprocessing.a_max ({self.a_max}) must exceed a_min ({self.a_min})")
        if self.normalize not in NORMALIZE_MODES:
            raise ValueError(f"preprocessing.normalize must be one of {NORMALIZE_MODES}, got {self.normalize!r}")
        if not 0.0 < self.foreground_fraction < 1.0:
            raise ValueError(f"preprocessing.foreground_fraction must be in (0, 1), got {self.foreground_fraction!r}")
        if not 0.0 <= self.percentile_low < self.percentile_high <= 100.0:
            raise ValueError(
                f"preprocessing.percentile_low ({self.percentile_low}) and percentile_high ({self.percentile_high}) "
                "must satisfy 0 <= low < high <= 100"
            )


@dataclass(frozen=True)
class NetworkConfig:
    target: str  # dotted path of a class or factory, e.g. inference.networks.retinanet.build_retinanet
    args: dict[str, Any] = field(default_factory=dict)
    weights: str = "model.pt"  # relative to the version directory

    def __post_init__(self) -> None:
        if not self.target.startswith(ALLOWED_TARGET_PREFIXES) and self.target != BUNDLE_NETWORK_TARGET:
            raise ValueError(
                f"network.target {self.target!r} is not allowed; it must start with one of {ALLOWED_TARGET_PREFIXES}"
            )


@dataclass(frozen=True)
class InfererConfig:
    roi_size: tuple[int, ...] = (96, 96, 96)
    overlap: float = 0.25
    # How overlapping segmentation windows are blended: MONAI's importance maps. "gaussian" weighs patch centers
    # over edges (radserve's models); "constant" is the plain mean, MONAI SlidingWindowInferer's default.
    mode: str = "gaussian"

    def __post_init__(self) -> None:
        if self.mode not in BLEND_MODES:
            raise ValueError(f"inferer.mode must be one of {BLEND_MODES}, got {self.mode!r}")
        for s in self.roi_size:
            if int(s) != s or s < 8:
                raise ValueError(f"inferer.roi_size entries must be integers >= 8, got {self.roi_size!r}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"inferer.overlap must be in [0, 1), got {self.overlap!r}")


@dataclass(frozen=True)
class DetectorConfig:
    """Anchor layout of a RetinaNet detector (what MONAI's AnchorGeneratorWithAnchorShape needs)."""

    feature_map_scales: tuple[int, ...] = (1, 2, 4)
    base_anchor_shapes: tuple[tuple[float, ...], ...] = ((6, 8, 4), (8, 6, 5), (10, 10, 6))
    size_divisible: tuple[int, ...] = (16, 16, 8)


@dataclass(frozen=True)
class InputConfig:
    """The smallest study the model reads (README "Errors": FAILED_PRECONDITION below it), along the axes of its
    inferer.roi_size: voxels of the study as sent (X = columns, Y = rows, Z = slices), and its field of view in mm.
    Empty: no minimum. A one-slice CT, a 16 x 16 X-ray or a volume much smaller than what the model was trained on
    gets an answer naming this minimum instead of findings the model cannot stand behind."""

    min_shape: tuple[int, ...] = ()
    min_extent_mm: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if any(isinstance(s, bool) or int(s) != s or s < 1 for s in self.min_shape):
            raise ValueError(f"input.min_shape entries must be integers >= 1, got {self.min_shape!r}")
        if any(not 0 <= float(e) < 1e4 for e in self.min_extent_mm):
            raise ValueError(f"input.min_extent_mm entries must be in [0, 10000) mm, got {self.min_extent_mm!r}")


@dataclass(frozen=True)
class PostprocessConfig:
    score_threshold: float = 0.5
    nms_iou: float = 0.2
    min_size_mm: float = 0.0
    max_detections: int = 20
    # Segmentation: connected components smaller than this are dropped.
    min_volume_ml: float = 0.0
    # Segmentation: connected components whose mean probability (the finding's score) is under this are dropped.
    # score_threshold draws the masks' edges; this decides which components are findings (a weak, thin rim of
    # probability just over score_threshold is not). 0: every component is a finding.
    min_score: float = 0.0
    # Detection: how the overlapping boxes (IoU > nms_iou) of one object become one finding. "nms" keeps the
    # best-scoring box; "fusion" keeps its score with the score-weighted mean of the group's boxes (box
    # voting), which localises better when many anchors fire on one object.
    box_merge: str = "nms"  # nms | fusion

    def __post_init__(self) -> None:
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"postprocessing.score_threshold must be in [0, 1], got {self.score_threshold!r}")
        if not 0.0 <= self.min_score < 1.0:
            raise ValueError(f"postprocessing.min_score must be in [0, 1), got {self.min_score!r}")
        if not self.min_volume_ml >= 0.0:
            raise ValueError(f"postprocessing.min_volume_ml must be >= 0, got {self.min_volume_ml!r}")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"postprocessing.nms_iou must be in (0, 1], got {self.nms_iou!r}")
        if self.max_detections < 1:
            raise ValueError(f"postprocessing.max_detections must be >= 1, got {self.max_detections!r}")
        if self.box_merge not in ("nms", "fusion"):
            raise ValueError(f"postprocessing.box_merge must be 'nms' or 'fusion', got {self.box_merge!r}")


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 4
    max_queue_delay_ms: float = 5.0
    max_queue_size: int = 256  # patches or images waiting; beyond it a read gets UNAVAILABLE

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch_size <= 4096:
            raise ValueError(f"batching.max_batch_size must be in [1, 4096], got {self.max_batch_size!r}")
        if not 0.0 <= self.max_queue_delay_ms <= 60_000:
            raise ValueError(f"batching.max_queue_delay_ms must be in [0, 60000], got {self.max_queue_delay_ms!r}")
        if self.max_queue_size < self.max_batch_size:
            raise ValueError(
                f"batching.max_queue_size ({self.max_queue_size}) must be >= max_batch_size ({self.max_batch_size})"
            )


@dataclass(frozen=True)
class ModelConfig:
    name: str
    version: str
    task: str
    modalities: tuple[str, ...]
    labels: tuple[str, ...]
    network: NetworkConfig
    preprocessing: PreprocessConfig = field(default_factory=PreprocessConfig)
    inferer: InfererConfig = field(default_factory=InfererConfig)
    input: InputConfig = field(default_factory=InputConfig)
    detector: DetectorConfig | None = None
    postprocessing: PostprocessConfig = field(default_factory=PostprocessConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    autocast: str = "bf16"  # applies on CUDA only
    compile: bool = False  # torch.compile the network, warmed up before serving (CUDA only; server --compile: all)
    # Read while the study arrives (docs/decisions.md, "Progressive reading"): patches are preprocessed and inferred
    # as the slices covering them come in. Only for preprocessing that is voxel-local (see progressive_refusal).
    progressive: bool = False
    # Where the network runs: "torch" (in the server) or "triton" (a Triton Inference Server); unset: the
    # server's --backend.
    backend: str | None = None
    description: str = ""
    # "auto": once READY, the version takes default routing (the newest such version serves reads naming no
    # version); "manual": it serves only reads naming it until `radserve models promote` (the promotion guard,
    # inference.serving.promotion). The first version of a model takes default routing either way.
    promote: str = "manual"
    directory: Path | None = field(default=None, compare=False)
    # Builds the bare network instead of network.target; set only by the MONAI bundle loader (never from
    # model.yaml), together with network.target == BUNDLE_NETWORK_TARGET.
    network_factory: Callable[[], Any] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or ":" in self.name:
            raise ValueError(f"model name {self.name!r} must be non-empty without '/' or ':'")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        bad = [m for m in self.modalities if m not in MODALITIES]
        if not self.modalities or bad:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {list(self.modalities)!r}")
        if not self.labels:
            raise ValueError("labels must name at least one class")
        if self.autocast not in AUTOCAST:
            raise ValueError(f"autocast must be one of {AUTOCAST}, got {self.autocast!r}")
        if self.promote not in PROMOTE:
            raise ValueError(f"promote must be one of {PROMOTE}, got {self.promote!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be true or false, got {self.compile!r}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not isinstance(self.progressive, bool):
            raise ValueError(f"progressive must be true or false, got {self.progressive!r}")
        if self.progressive and self.progressive_refusal() is not None:
            raise ValueError(
                f"progressive: true, but this model cannot be read progressively: {self.progressive_refusal()}"
            )
        if self.task == "detection" and self.detector is None:
            raise ValueError("a detection model needs a 'detector' section (anchor shapes)")
        if (self.network.target == BUNDLE_NETWORK_TARGET) != (self.network_factory is not None):
            raise ValueError(
                f"network.target {BUNDLE_NETWORK_TARGET!r} and a network factory go together; "
                "both are set by the MONAI bundle loader only"
            )
        for name in ("min_shape", "min_extent_mm"):
            if len(getattr(self.input, name)) not in (0, len(self.inferer.roi_size)):
                raise ValueError(
                    f"input.{name} {getattr(self.input, name)!r} must have one entry per axis of inferer.roi_size "
                    f"{self.inferer.roi_size!r}"
                )
        if len(self.inferer.roi_size) != len(self.preprocessing.spacing_mm):
            raise ValueError(
                f"inferer.roi_size {self.inferer.roi_size!r} and preprocessing.spacing_mm "
                f"{self.preprocessing.spacing_mm!r} must have the same number of dimensions"
            )

    def progressive_refusal(self) -> str | None:
        """Why this model cannot be read while its study arrives (None: it can, if ``progressive`` says so).

        A patch can be made from the slices covering it only when every step after the resampling is voxel-local.
        """
        pre = self.preprocessing
        if len(self.inferer.roi_size) != 3:
            return "a 2-D model reads one image: there is nothing to read before it is complete"
        if self.task != "detection":
            return f"a {self.task} model pads its patches with the study's minimum, known only at the end"
        if pre.normalize != "window":
            return f"preprocessing.normalize {pre.normalize!r} needs a statistic of the whole study"
        if pre.bias_correction_degree:
            return "the bias field is fitted to the whole study"
        return None

    @property
    def weights_path(self) -> Path:
        if self.directory is None:
            raise ValueError(f"model {self.name}:{self.version} has no directory")
        return self.directory / self.network.weights

    @classmethod
    def from_dict(
        cls,
        data: dict[str, Any],
        *,
        version: str,
        directory: Path | None = None,
        network_factory: Callable[[], Any] | None = None,
    ) -> ModelConfig:
        if not isinstance(data, dict):
            raise ValueError(f"model.yaml must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"version", "directory", "network_factory"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"model.yaml has unknown keys {unknown}; known keys are {sorted(known)}")
        sections = {
            "network": NetworkConfig,
            "preprocessing": PreprocessConfig,
            "inferer": InfererConfig,
            "input": InputConfig,
            "detector": DetectorConfig,
            "postprocessing": PostprocessConfig,
            "batching": BatchingConfig,
        }
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in sections and value is not None:
                kwargs[key] = _build_section(sections[key], key, value)
            elif key in ("modalities", "labels"):
                kwargs[key] = tuple(str(v) for v in value)
            else:
                kwargs[key] = value
        for required in ("name", "task", "modalities", "labels", "network"):
            if required not in kwargs:
                raise ValueError(f"model.yaml misses the required key {required!r}")
        return cls(version=str(version), directory=directory, network_factory=network_factory, **kwargs)

    @classmethod
    def from_yaml(cls, path: Path) -> ModelConfig:
        """Load ``models/<name>/<version>/model.yaml``; the version is the directory's name."""
        path = Path(path)
        with path.open() as f:
            data = yaml.safe_load(f)
        return cls.from_dict(data, version=path.parent.name, directory=path.parent)


def _to_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_to_tuple(v) for v in value)
    return value


def _build_section(section_cls: type, key: str, value: Any) -> Any:
    if not isinstance(value, dict):
        raise ValueError(f"model.yaml section {key!r} must be a mapping, got {type(value).__name__}")
    known = {f.name for f in dataclasses.fields(section_cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"model.yaml section {key!r} has unknown keys {unknown}; known keys are {sorted(known)}")
    kwargs = {k: (v if k == "args" else _to_tuple(v)) for k, v in value.items()}
    return section_cls(**kwargs)
