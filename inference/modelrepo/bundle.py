"""MONAI bundles (model-zoo layout) as radserve models.

Over 500 lines: this docstring is the mapping table that README "MONAI bundles" sends users to (about 60 lines);
the code is one function per row of it.

A bundle directory holds ``configs/metadata.json``, ``configs/inference.json`` (or ``.yaml``) and
``models/model.pt`` (a state dict) or ``models/model.ts`` (TorchScript). :func:`load_bundle` maps it onto a
:class:`~inference.modelrepo.schema.ModelConfig`, the same schema a ``model.yaml`` fills:

=====================  ===========================================================================================
ModelConfig            bundle
=====================  ===========================================================================================
name, version          metadata ``name`` (as an identifier: "Spleen CT segmentation" -> spleen_ct_segmentation,
                       else the directory's name) and ``version``; inside a repository, the layout
                       ``<name>/<version>/`` wins (see :mod:`inference.modelrepo.repository`)
task                   detection when ``network_def`` is a RetinaNet (or the config has a ``detector``),
                       else segmentation
modalities             metadata ``network_data_format.inputs.*.modality`` (or a top-level ``modality``;
                       ``format: hounsfield`` means CT); default CT
labels                 metadata ``network_data_format.outputs.*.channel_def`` without "background"; a detection
                       bundle whose output names no class gets "lesion" (the zoo's lung_nodule_ct_detection: its
                       output is a dict of boxes; ``{"radserve": {"labels": ["nodule"]}}`` renames it)
preprocessing          ``Spacingd.pixdim`` -> spacing_mm; ``ScaleIntensityRanged`` a_min/a_max/b_min/b_max/clip;
                       ``NormalizeIntensityd`` -> zscore. ``Orientationd`` must be RAS (radserve always reorients
                       to RAS); loading, channel-first and type conversions are radserve's own. Any other
                       preprocessing transform fails the load: a model fed differently than it was trained would
                       read silently wrong
inferer                ``inferer.roi_size``/``overlap`` (SlidingWindowInferer), or the detection layout's
                       ``infer_patch_size`` and ``detector_ops`` ``set_sliding_window_inferer(overlap=...)``;
                       ``sw_batch_size`` -> batching.max_batch_size; segmentation: ``inferer.mode`` (gaussian or
                       constant, MONAI's default) -> inferer.mode, the blending of overlapping windows;
                       detection: per-patch boxes merged by NMS
detector               ``anchor_generator`` feature_map_scales/base_anchor_shapes and ``size_divisible``
postprocessing         detection: ``set_box_selector_parameters(nms_thresh=...)`` -> nms_iou; the score threshold,
                       top-k and detections per image stay radserve's (the zoo's score_thresh=0.02 and
                       detections_per_img=300 are FROC-evaluation settings). radserve's postprocessing replaces
                       the bundle's (Activationsd/AsDiscreted/Invertd/SaveImaged, boxes to world coordinates):
                       findings in LPS mm
network                built from ``network_def`` by MONAI's ConfigParser (``ModelConfig.network_factory``);
                       ``network.target`` is the marker ``bundle:network_def``
=====================  ===========================================================================================

An optional ``"radserve"`` mapping in metadata.json, shaped like model.yaml (without ``network``), overrides
the mapped values, e.g. ``{"radserve": {"preprocessing": {"spacing_mm": [0.7, 0.7, 1.25]}}}`` for a bundle
whose preprocessing does not resample.

Trust model: a bundle is code. MONAI's ConfigParser evaluates ``$`` expressions with Python's ``eval`` and
imports the modules a config names, and a TorchScript file is a program. Bundles are therefore loaded only
from the server's own filesystem, by an operator (the model repository, or ``radserve models load DIR``),
never uploaded by clients. Beyond what the parser does for the ids radserve asks for, nothing runs: only
``network_def`` is instantiated and a few leaves (pixdim, a_min, roi_size, anchor shapes...) are resolved.
The ``$`` expressions that do run are therefore: the config's ``$import`` statements (MONAI runs them all
before resolving any id), those ``network_def`` depends on (the zoo's lung bundle builds its ResNet50 and FPN
in ``backbone`` and ``feature_extractor`` expressions), and those the leaves refer to (its
``"_disabled_": "@whether_resampled_luna16"`` is ``$(not @whether_raw_luna16)``). ``device``, ``network``,
datalists, ``evaluating``, ``initialize``, ``run``, handlers, data loaders, checkpoint loaders, the bundle's
own inferer and postprocessing are never resolved; the bundle's ``scripts/`` folder is not put on
``sys.path``; ``detector_ops`` expressions are read with ``ast`` (literal arguments only), never evaluated;
state dicts are loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import ast
import json
import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from inference.modelrepo.schema import BUNDLE_NETWORK_TARGET, ModelConfig

logger = logging.getLogger(__name__)

__all__ = ["bundle_identity", "config_file", "is_bundle", "load_bundle", "weights_file"]

METADATA = Path("configs") / "metadata.json"
CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
WEIGHTS_NAMES = (Path("models") / "model.pt", Path("models") / "model.ts")
DEFAULT_VERSION = "1"

# Preprocessing transforms radserve does itself (loading, channel-first, types) and so skips.
_OWN_TRANSFORMS = {
    "LoadImage",
    "EnsureChannelFirst",
    "AddChannel",
    "AsChannelFirst",
    "EnsureType",
    "ToTensor",
    "ToNumpy",
    "CastToType",
    "ToDevice",
    "Identity",
}
_MAPPED_TRANSFORMS = {"Orientation", "Spacing", "ScaleIntensityRange", "NormalizeIntensity"}
_REF = re.compile(r"@([\w#:]+)")
_MODALITY_ALIASES = {
    "CT": ("CT",),
    "HOUNSFIELD": ("CT",),
    "MR": ("MR",),
    "MRI": ("MR",),
    "CR": ("CR",),
    "DX": ("DX",),
    "XR": ("CR", "DX"),
    "XRAY": ("CR", "DX"),
    "CXR": ("CR", "DX"),
}


def is_bundle(path: Path) -> bool:
    """A MONAI bundle directory: ``configs/metadata.json`` or ``configs/inference.{json,yaml}``."""
    path = Path(path)
    return (path / METADATA).is_file() or any((path / "configs" / n).is_file() for n in CONFIG_NAMES)


def config_file(path: Path) -> Path:
    for name in CONFIG_NAMES:
        candidate = Path(path) / "configs" / name
        if candidate.is_file():
            return candidate
    raise ValueError(f"bundle {Path(path).name!r} has no configs/inference.json (or .yaml)")


def weights_file(path: Path) -> Path | None:
    """``models/model.pt`` (state dict), else ``models/model.ts`` (TorchScript), else None."""
    for name in WEIGHTS_NAMES:
        if (Path(path) / name).is_file():
            return Path(path) / name
    return None


def _metadata(path: Path) -> dict[str, Any]:
    meta_path = Path(path) / METADATA
    if not meta_path.is_file():
        return {}
    with meta_path.open() as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{METADATA} must hold a JSON object, got {type(data).__name__}")
    return data


def _identifier(text: str) -> str:
    return re.sub(r"[^a-z0-9.\-]+", "_", text.strip().lower()).strip("_")


def bundle_identity(path: Path) -> tuple[str, str]:
    """(name, version) of a bundle from its metadata: ``name`` as an identifier, else the directory name;
    ``version``, else "1". Reads JSON only (nothing is evaluated), so scanning a repository is safe and cheap."""
    path = Path(path)
    try:
        meta = _metadata(path)
    except (OSError, ValueError):
        meta = {}
    name = _identifier(str(meta.get("name", ""))) or _identifier(path.name) or path.name
    version = str(meta.get("version", "")).strip().replace(":", "_").replace("/", "_") or DEFAULT_VERSION
    return name, version


# -- parsing ---------------------------------------------------------------------------------------------


def _parser(path: Path) -> Any:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    if (path / METADATA).is_file():
        parser.read_meta(_renamed_deprecated_ids(_metadata(path)))
    parser.read_config(str(config_file(path)))
    # The zoo's configs use "bundle_root": "." (the working directory); point it at the bundle.
    parser["bundle_root"] = str(path)
    return parser


def _renamed_deprecated_ids(meta: dict[str, Any]) -> dict[str, Any]:
    """metadata.json with MONAI's deprecated keys renamed, as ``read_meta`` would, without its UserWarning.

    The zoo's published metadata still says ``optional_packages_version``; MONAI renames it with a warning on
    every parse (twice per load here), which an operator cannot act on.
    """
    try:
        from monai.bundle.utils import DEPRECATED_ID_MAPPING
    except ImportError:  # an older or newer MONAI without the mapping: read_meta does what it does
        return meta
    meta = dict(meta)
    for old, new in DEPRECATED_ID_MAPPING.items():
        if old in meta and new not in meta:
            meta[new] = meta.pop(old)
    return meta


_MISSING = object()


def _has(parser: Any, id_: str) -> bool:
    try:
        return parser.get(id_, _MISSING) is not _MISSING
    except (KeyError, IndexError, ValueError, TypeError):  # e.g. indexing into a string
        return False


def _resolve(parser: Any, id_: str, default: Any = None) -> Any:
    """The parsed value of one leaf (references and expressions resolved by MONAI's parser)."""
    if not _has(parser, id_):
        return default
    return parser.get_parsed_content(id_, instantiate=False)


def _target_name(target: Any) -> str:
    return str(target).rsplit(".", 1)[-1] if isinstance(target, str) else ""


def _transform_ids(parser: Any) -> list[str]:
    """Ids of the preprocessing transforms, following ``"$@preprocessing_transforms"``-style references."""
    if not _has(parser, "preprocessing"):
        return []
    pre = parser.get("preprocessing")
    holder, raw = (
        ("preprocessing#transforms", pre.get("transforms")) if isinstance(pre, dict) else ("preprocessing", pre)
    )
    if isinstance(raw, list):
        return [f"{holder}#{i}" for i in range(len(raw))]
    if isinstance(raw, str):
        ids = []
        for ref in _REF.findall(raw):
            ref = ref.replace("::", "#")
            value = parser.get(ref)
            if isinstance(value, list):
                ids += [f"{ref}#{i}" for i in range(len(value))]
            elif isinstance(value, dict):
                ids.append(ref)
        return ids
    return []


def _map_preprocessing(parser: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    unsupported = []
    declared_spacing = None
    for tid in _transform_ids(parser):
        raw = parser.get(tid)
        if not isinstance(raw, dict):
            unsupported.append(str(raw)[:60])
            continue
        name = _target_name(raw.get("_target_"))
        base = name[:-1] if name.endswith("d") and name[:-1] in _OWN_TRANSFORMS | _MAPPED_TRANSFORMS else name
        if _resolve(parser, f"{tid}#_disabled_", False) is True:
            # A disabled Spacingd still states the spacing the model expects (e.g. the lung nodule bundle's,
            # disabled for data resampled beforehand); radserve always resamples, so it uses that spacing.
            if base == "Spacing":
                declared_spacing = _resolve(parser, f"{tid}#pixdim")
            continue
        if base in _OWN_TRANSFORMS:
            continue
        if base == "Orientation":
            axcodes = _resolve(parser, f"{tid}#axcodes", "RAS")
            if str(axcodes).upper() != "RAS":
                raise ValueError(f"bundle preprocessing {name} axcodes {axcodes!r}: radserve reorients to RAS only")
        elif base == "Spacing":
            pixdim = _resolve(parser, f"{tid}#pixdim")
            pixdim = [pixdim] * 3 if isinstance(pixdim, (int, float)) else list(pixdim or [])
            out["spacing_mm"] = [float(v) for v in pixdim]
        elif base == "ScaleIntensityRange":
            for key in ("a_min", "a_max", "b_min", "b_max"):
                value = _resolve(parser, f"{tid}#{key}")
                if value is None:
                    raise ValueError(f"bundle preprocessing {name} needs {key}")
                out[key] = float(value)
            out["clip"] = bool(_resolve(parser, f"{tid}#clip", False))
            out["normalize"] = "window"
        elif base == "NormalizeIntensity":
            out["normalize"] = "zscore"
        else:
            unsupported.append(name or "?")
    if "spacing_mm" not in out and declared_spacing is not None:
        pixdim = declared_spacing
        out["spacing_mm"] = [float(v) for v in ([pixdim] * 3 if isinstance(pixdim, (int, float)) else pixdim)]
    if unsupported:
        raise ValueError(
            f"bundle preprocessing transforms {unsupported} are not supported by radserve's bundle mapping "
            f"(supported: Orientationd RAS, Spacingd, ScaleIntensityRanged, NormalizeIntensityd, and "
            f"{sorted(_OWN_TRANSFORMS)}); override with a 'radserve' section in metadata.json only if they are "
            "equivalent"
        )
    return out


def _literal_kwargs(expressions: Any, method: str) -> dict[str, Any]:
    """Literal keyword arguments of ``.method(...)`` calls in ``$`` expressions, read with ``ast`` (not run)."""
    found: dict[str, Any] = {}
    for expression in expressions if isinstance(expressions, list) else [expressions]:
        if not isinstance(expression, str) or not expression.startswith("$"):
            continue
        try:
            tree = ast.parse(_REF.sub("_ref", expression[1:]), mode="eval")
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == method:
                for keyword in node.keywords:
                    try:
                        found[keyword.arg] = ast.literal_eval(keyword.value)
                    except (ValueError, TypeError, SyntaxError, RecursionError):
                        continue
    return found


def _ints(value: Any, what: str) -> list[int]:
    if isinstance(value, (int, float)):
        value = [value]
    try:
        return [int(v) for v in value]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bundle {what} must be integers, got {value!r}") from exc


def _modalities(meta: dict[str, Any]) -> list[str]:
    words: list[str] = []
    inputs = (meta.get("network_data_format") or {}).get("inputs") or {}
    for spec in inputs.values() if isinstance(inputs, dict) else []:
        if isinstance(spec, dict):
            words += re.split(r"[^A-Za-z]+", str(spec.get("modality", "")))
            if str(spec.get("format", "")).lower() == "hounsfield":
                words.append("CT")
    words += re.split(r"[^A-Za-z]+", str(meta.get("modality", "")))
    found: list[str] = []
    for word in words:
        for modality in _MODALITY_ALIASES.get(word.upper().replace("-", ""), ()):
            if modality not in found:
                found.append(modality)
    return found or ["CT"]


def _channel_labels(meta: dict[str, Any]) -> list[str]:
    outputs = (meta.get("network_data_format") or {}).get("outputs") or {}
    for spec in outputs.values() if isinstance(outputs, dict) else []:
        channel_def = spec.get("channel_def") if isinstance(spec, dict) else None
        if isinstance(channel_def, dict) and channel_def:
            ordered = sorted(channel_def.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0)
            return [str(v) for _, v in ordered if str(v).strip().lower() != "background"]
    return []


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _network_factory(path: Path) -> Callable[[], Any]:
    """Builds ``network_def`` with a fresh ConfigParser (no state shared between builds)."""

    def build() -> Any:
        import torch

        network = _parser(path).get_parsed_content("network_def", instantiate=True)
        if not isinstance(network, torch.nn.Module):
            raise ValueError(f"bundle network_def built a {type(network).__name__}, not a torch.nn.Module")
        return network

    def load_torchscript() -> Any:
        import torch

        return torch.jit.load(str(path / WEIGHTS_NAMES[1]), map_location="cpu")

    return load_torchscript if weights_file(path) == path / WEIGHTS_NAMES[1] else build


def load_bundle(path: Path, *, name: str | None = None, version: str | None = None) -> ModelConfig:
    """Map the bundle at ``path`` onto a ModelConfig (see the module docstring); ValueError says what is wrong.

    ``name``/``version`` override the metadata's (the repository layout). The network is not built here:
    ``ModelConfig.network_factory`` builds it when the model is loaded.
    """
    path = Path(path).resolve()
    if not path.is_dir():
        raise ValueError(f"bundle {str(path)!r} is not a directory")
    meta = _metadata(path)
    meta_name, meta_version = bundle_identity(path)
    name = name or meta_name
    version = version or meta_version
    weights = weights_file(path)
    if weights is None:
        raise ValueError("bundle weights models/model.pt (state dict) or models/model.ts (TorchScript) are missing")
    parser = _parser(path)
    if not _has(parser, "network_def"):
        raise ValueError(f"bundle config {config_file(path).name} has no network_def")
    network_def = parser.get("network_def")
    target = network_def.get("_target_", "") if isinstance(network_def, dict) else str(network_def)
    detection = "RetinaNet" in str(target) or _has(parser, "detector")
    net_keys = network_def if isinstance(network_def, dict) else {}

    args: dict[str, Any] = {}
    for key in ("spatial_dims", "in_channels", "out_channels", "num_classes", "num_anchors"):
        if key in net_keys:
            value = _resolve(parser, f"network_def#{key}")
            if isinstance(value, (int, float)):
                args[key] = int(value)
    inputs = (meta.get("network_data_format") or {}).get("inputs") or {}
    first_input = next(iter(inputs.values()), {}) if isinstance(inputs, dict) else {}
    args.setdefault("in_channels", int(first_input.get("num_channels", 1) or 1))
    spatial_dims = args.get("spatial_dims", _resolve(parser, "spatial_dims", 3))
    if int(spatial_dims) != 3:
        raise ValueError(f"only 3-D bundles are supported, network_def has spatial_dims {spatial_dims}")

    labels = _channel_labels(meta)
    data: dict[str, Any] = {
        "name": name,
        "task": "detection" if detection else "segmentation",
        "modalities": _modalities(meta),
        "description": (
            f"MONAI bundle {meta.get('name', path.name)!s} {meta.get('version', '')!s}: "
            f"{meta.get('description', '')!s}".strip()
        ),
        "preprocessing": _map_preprocessing(parser),
        "postprocessing": {},
    }
    if _has(parser, "amp") and _resolve(parser, "amp") is False:
        data["autocast"] = "none"

    inferer = parser.get("inferer") if _has(parser, "inferer") else None
    detector_ops = parser.get("detector_ops") if _has(parser, "detector_ops") else []
    window = _literal_kwargs(detector_ops, "set_sliding_window_inferer")
    mode = None
    if isinstance(inferer, dict) and "roi_size" in inferer:
        roi = _resolve(parser, "inferer#roi_size")
        overlap = _resolve(parser, "inferer#overlap", 0.25)
        sw_batch = _resolve(parser, "inferer#sw_batch_size", None)
        mode = _resolve(parser, "inferer#mode", "constant")  # MONAI SlidingWindowInferer's default
    elif _has(parser, "infer_patch_size"):
        roi = _resolve(parser, "infer_patch_size")
        overlap = window.get("overlap", 0.25)
        sw_batch = window.get("sw_batch_size")
    else:
        roi = first_input.get("spatial_shape")
        overlap, sw_batch = 0.25, None
    if roi is None:
        raise ValueError("bundle has no inferer.roi_size, infer_patch_size or input spatial_shape")
    data["inferer"] = {"roi_size": _ints(roi, "roi_size"), "overlap": float(overlap)}
    if mode is not None and not detection:  # detection merges per-patch boxes by NMS, not blended maps
        data["inferer"]["mode"] = str(mode)
    if sw_batch:
        data["batching"] = {"max_batch_size": int(sw_batch)}

    if detection:
        anchors = "anchor_generator" if _has(parser, "anchor_generator") else None
        if anchors is None:
            raise ValueError("detection bundle has no anchor_generator (feature_map_scales, base_anchor_shapes)")
        size_div = _resolve(parser, "network_def#size_divisible") if "size_divisible" in net_keys else None
        size_div = size_div if size_div is not None else _resolve(parser, "size_divisible", 1)
        size_div = [size_div] * 3 if isinstance(size_div, (int, float)) else size_div
        data["detector"] = {
            "feature_map_scales": _ints(_resolve(parser, f"{anchors}#feature_map_scales", [1, 2, 4]), "scales"),
            "base_anchor_shapes": [
                [float(v) for v in shape] for shape in _resolve(parser, f"{anchors}#base_anchor_shapes", [])
            ],
            "size_divisible": _ints(size_div, "size_divisible"),
        }
        selector = _literal_kwargs(detector_ops, "set_box_selector_parameters")
        if "nms_thresh" in selector:
            data["postprocessing"]["nms_iou"] = float(selector["nms_thresh"])
        num_classes = args.get("num_classes", 1)
        labels = labels[:num_classes] or (
            ["lesion"] if num_classes == 1 else [f"class_{i}" for i in range(num_classes)]
        )
    else:
        out_channels = args.get("out_channels")
        if not labels:
            labels = [f"class_{i}" for i in range(1, out_channels)] if out_channels and out_channels > 1 else ["mask"]
    data["labels"] = labels

    override = meta.get("radserve") or {}
    if not isinstance(override, dict):
        raise ValueError("metadata.json 'radserve' must be a mapping shaped like model.yaml")
    forbidden = sorted(set(override) & {"network", "name"})
    if forbidden:
        raise ValueError(f"metadata.json 'radserve' cannot set {forbidden}")
    data = _deep_merge(data, override)
    if "spacing_mm" not in data["preprocessing"]:
        raise ValueError(
            "bundle preprocessing has no Spacingd: radserve needs the model's voxel spacing; add Spacingd or "
            "set radserve.preprocessing.spacing_mm in metadata.json"
        )
    data["network"] = {"target": BUNDLE_NETWORK_TARGET, "args": args, "weights": str(weights.relative_to(path))}
    config = ModelConfig.from_dict(data, version=version, directory=path, network_factory=_network_factory(path))
    logger.info(
        "bundle %s mapped to %s:%s (%s, %s, spacing %s mm, roi %s)",
        path.name,
        config.name,
        config.version,
        config.task,
        "/".join(config.modalities),
        config.preprocessing.spacing_mm,
        config.inferer.roi_size,
    )
    return config


def iter_bundle_files(path: Path) -> Iterable[Path]:
    """The files that define a bundle version (watched for changes): its configs and its weights."""
    path = Path(path)
    configs = path / "configs"
    if configs.is_dir():
        yield from sorted(p for p in configs.iterdir() if p.suffix in (".json", ".yaml", ".yml") and p.is_file())
    for name in WEIGHTS_NAMES:
        yield path / name
