"""`radserve triton export`: a Triton model repository for every model version of a radserve repository.

For each model version: build the Task's network exactly as the server does (same factory, same weights
loading), wrap it so that it returns a flat tuple of tensors (:mod:`inference.backends.triton.layout`), trace it to
TorchScript on a random batch of one, save ``<out>/<name>/<triton version>/model.pt``, then **load the file
back and compare it with the eager network on a different random batch** (fp32, relative error below
``tolerance``, default 1e-4, on every output): an export that does not reproduce the network raises
:class:`ExportError` and writes no config. ``<out>/<name>/config.pbtxt`` (:mod:`inference.triton.config_pbtxt`)
carries the model's batching settings (``max_batch_size``, ``dynamic_batching.max_queue_delay_microseconds``
from ``batching.max_queue_delay_ms``), its instance group, and the input/output names, shapes and types.

Triton versions are positive integers: numeric radserve versions keep their number; otherwise versions are
numbered 1..n in radserve's version order and the mapping is stored in the config (``radserve_versions``),
where :class:`~inference.backends.triton.TritonBackend` finds it. Versions of one model must share their
input shape, outputs and batching (one config.pbtxt per model).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inference.backends.triton.layout import flatten
from inference.triton.config_pbtxt import DATA_TYPES, TensorSpec, TritonModelSpec, input_spec, render_config

logger = logging.getLogger(__name__)

__all__ = [
    "EXPORT_FORMAT",
    "VERSIONS_PARAMETER",
    "ExportError",
    "ExportedVersion",
    "export_repository",
    "repository_fingerprint",
]

EXPORT_FORMAT = 1  # bump when the exported layout changes (invalidates `triton serve`'s cache)
VERSIONS_PARAMETER = "radserve_versions"  # config.pbtxt parameter: JSON {radserve version: Triton version}
MANIFEST = "radserve-export.json"
PYTHON_MODEL = Path(__file__).with_name("python_model.py")


class ExportError(RuntimeError):
    """A model version could not be exported faithfully; the message names it and says why."""


@dataclass(frozen=True)
class ExportedVersion:
    name: str
    version: str  # radserve's
    triton_version: int
    path: Path  # model.pt
    num_outputs: int
    max_relative_error: float
    seconds: float


class _FlatOutputs(torch.nn.Module):
    """The network with its output flattened to a tuple, in :func:`inference.backends.triton.layout.flatten` order."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network
        self.layout: Any = None  # set by each (traced) call

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tensors, self.layout = flatten(self.network(image))
        return tuple(tensors)


def _load_network(config: Any, device: torch.device) -> tuple[Any, torch.nn.Module]:
    """(task, network with weights, eval, on ``device``): the server's own construction path."""
    from inference.tasks import task_class

    task = task_class(config)(config, device)
    return task, task.load_network()


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.detach().abs().max().clamp_min(1e-12)
    return float((got.detach().float() - expected.detach().float()).abs().max() / scale)


def _triton_versions(versions: Sequence[str]) -> dict[str, int]:
    if all(v.isdigit() and int(v) > 0 for v in versions):
        return {v: int(v) for v in versions}
    from inference.modelrepo.repository import version_key

    return {v: i for i, v in enumerate(sorted(versions, key=version_key), start=1)}


def _export_version(
    config: Any, directory: Path, *, device: torch.device, check_batch: int, tolerance: float, seed: int
) -> tuple[TritonModelSpec, float, int]:
    """Trace, save and verify one version into ``directory``; (spec without runtime, max rel. error, outputs)."""
    key = f"{config.name}:{config.version}"
    try:
        task, network = _load_network(config, device)
    except Exception as exc:
        raise ExportError(f"model {key}: cannot build the network with its weights: {exc}") from exc
    item_shape = tuple(int(s) for s in task.item_shape)
    generator = torch.Generator().manual_seed(seed)
    example = torch.rand((1, *item_shape), generator=generator).to(device)
    probe = torch.rand((check_batch, *item_shape), generator=generator).to(device)
    module = _FlatOutputs(network).eval()
    path = directory / "model.pt"
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export, but TorchScript is what Triton's PyTorch backend
        # loads. TracerWarnings flag data-dependent Python branches (MONAI's NaN checks), which the comparison
        # below, on another batch size and other values, would expose if they mattered.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example, check_trace=False, strict=False)
        layout = module.layout
        directory.mkdir(parents=True, exist_ok=True)
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path), map_location=device).eval()
        expected, _ = flatten(network(probe))
        got = loaded(probe)
    got = (got,) if isinstance(got, torch.Tensor) else tuple(got)
    if len(got) != len(expected):
        raise ExportError(f"model {key}: the exported module returns {len(got)} outputs, the network {len(expected)}")
    worst = 0.0
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        if tuple(g.shape) != tuple(e.shape):
            raise ExportError(
                f"model {key}: exported output {i} has shape {tuple(g.shape)}, the network's {tuple(e.shape)} "
                f"(batch of {check_batch}; traced on a batch of 1)"
            )
        error = _relative_error(g, e)
        worst = max(worst, error)
        if not error < tolerance:
            raise ExportError(
                f"model {key}: exported output {i} differs from the eager network by a relative error of "
                f"{error:.3g} (tolerance {tolerance:g}, fp32, random batch of {check_batch})"
            )
    outputs = []
    names = _names(layout)
    for name, tensor in zip(names, expected, strict=True):
        dtype = DATA_TYPES.get(str(tensor.dtype))
        if dtype is None:
            raise ExportError(f"model {key}: output {name} has dtype {tensor.dtype}, which has no Triton type here")
        outputs.append(TensorSpec(name, tuple(int(s) for s in tensor.shape[1:]), dtype))
    spec = TritonModelSpec(
        name=config.name,
        max_batch_size=config.batching.max_batch_size,
        max_queue_delay_ms=config.batching.max_queue_delay_ms,
        input=input_spec(item_shape),
        outputs=tuple(outputs),
        layout=layout,
    )
    return spec, worst, len(outputs)


def _names(layout: Any) -> list[str]:
    from inference.backends.triton.layout import layout_names

    return layout_names(layout)


def export_repository(
    models: Path,
    out: Path,
    *,
    runtime: str = "pytorch",
    instance_kind: str = "gpu",
    instance_count: int = 1,
    device: str = "cpu",
    only: Sequence[str] = (),
    check_batch: int = 2,
    tolerance: float = 1e-4,
    seed: int = 0,
) -> list[ExportedVersion]:
    """Export every model version of ``models`` (or those named in ``only``) into the Triton repository ``out``.

    Raises ExportError when a version cannot be parsed, built or traced, or its export does not match the
    eager network; a repository version that fails to parse is an error too (a deployment must not silently
    lose a model).
    """
    from inference.modelrepo.repository import discover

    if check_batch < 2:
        raise ValueError(f"check_batch must be >= 2 (the trace uses a batch of 1), got {check_batch}")
    torch_device = torch.device(device)
    sources = [s for s in discover(Path(models)) if not only or s.name in only]
    missing = sorted(set(only) - {s.name for s in sources})
    if missing:
        raise ExportError(f"no model named {missing} in {models}")
    if not sources:
        raise ExportError(f"no model versions in {models}")
    configs = []
    for source in sources:
        try:
            configs.append(source.load_config())
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ExportError(f"model {source.key} cannot be exported: {exc}") from exc

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    by_name: dict[str, list[Any]] = {}
    for config in configs:
        by_name.setdefault(config.name, []).append(config)
    exported: list[ExportedVersion] = []
    manifest: dict[str, Any] = {"format": EXPORT_FORMAT, "torch": torch.__version__, "runtime": runtime, "models": {}}
    for name, versions in sorted(by_name.items()):
        mapping = _triton_versions([c.version for c in versions])
        model_dir = out / name
        if model_dir.exists():
            shutil.rmtree(model_dir)
        spec: TritonModelSpec | None = None
        for config in versions:
            start = time.perf_counter()
            version_dir = model_dir / str(mapping[config.version])
            try:
                version_spec, error, num_outputs = _export_version(
                    config, version_dir, device=torch_device, check_batch=check_batch, tolerance=tolerance, seed=seed
                )
            except BaseException:
                shutil.rmtree(model_dir, ignore_errors=True)  # no half-exported model for Triton to trip on
                raise
            if spec is not None and version_spec != spec:
                shutil.rmtree(model_dir, ignore_errors=True)
                raise ExportError(
                    f"model {name}: version {config.version} differs from another version in its input, outputs "
                    "or batching; Triton needs one config.pbtxt per model, so export them under different names"
                )
            spec = version_spec
            if runtime == "python":
                shutil.copyfile(PYTHON_MODEL, version_dir / "model.py")
            seconds = time.perf_counter() - start
            exported.append(
                ExportedVersion(
                    name, config.version, mapping[config.version], version_dir / "model.pt", num_outputs, error, seconds
                )
            )
            logger.info(
                "exported %s:%s as Triton version %d (%d outputs, max relative error %.2g) in %.1f s",
                name,
                config.version,
                mapping[config.version],
                num_outputs,
                error,
                seconds,
            )
        assert spec is not None
        spec = TritonModelSpec(
            **{**spec.__dict__, "runtime": runtime, "instance_kind": instance_kind, "instance_count": instance_count}
        )
        extra = {} if all(str(v) == k for k, v in mapping.items()) else {VERSIONS_PARAMETER: json.dumps(mapping)}
        (model_dir / "config.pbtxt").write_text(render_config(spec, extra_parameters=extra))
        manifest["models"][name] = {v: {"triton_version": t} for v, t in mapping.items()}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return exported


def repository_fingerprint(models: Path, **options: Any) -> str:
    """A digest of everything an export depends on: the versions' files, the options, torch, this code."""
    from inference.backends.triton import layout
    from inference.modelrepo.repository import discover

    h = hashlib.sha256()
    h.update(
        json.dumps(
            {"format": EXPORT_FORMAT, "torch": torch.__version__, **options}, sort_keys=True, default=str
        ).encode()
    )
    for source in discover(Path(models)):
        h.update(source.key.encode() + b"\0" + source.digest()[0].encode())
    # This package's code and the tensor layout it exports with (kept with the backend that reads it).
    for path in [*sorted(Path(__file__).parent.glob("*.py")), Path(layout.__file__)]:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
