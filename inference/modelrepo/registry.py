"""The models a server has loaded, and how a read picks one."""

from __future__ import annotations

import asyncio
import importlib
import logging
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import torch

from inference.backends.torch import TorchBackend
from inference.engine.runner import ModelRunner
from inference.engine.task import Task
from inference.errors import ModalityMismatchError, ModelNotFoundError
from inference.modelrepo.repository import scan_repository, version_key
from inference.modelrepo.schema import ModelConfig

logger = logging.getLogger(__name__)

# (task, spatial dims of the network input) -> "module:Class"; imported on first use.
TASK_CLASSES = {
    ("detection", 3): "inference.tasks.detection:DetectionTask",
    ("segmentation", 3): "inference.tasks.segmentation:SegmentationTask",
    ("detection", 2): "inference.tasks.projection:ProjectionDetectionTask",
}


def task_class(config: ModelConfig) -> type[Task]:
    key = (config.task, len(config.inferer.roi_size))
    if key not in TASK_CLASSES:
        raise ValueError(f"no implementation for a {key[1]}-D {key[0]} model; known: {sorted(TASK_CLASSES)}")
    module, name = TASK_CLASSES[key].split(":")
    return getattr(importlib.import_module(module), name)


def build_runner(config: ModelConfig, device: torch.device, io_executor: Executor | None = None) -> ModelRunner:
    task = task_class(config)(config, device)
    backend = TorchBackend.from_weights(task.build_network(), config.weights_path, device, autocast=config.autocast)
    return ModelRunner(config, task, backend, io_executor)


@dataclass(frozen=True)
class VersionState:
    version: str
    state: str  # READY | FAILED
    reason: str = ""


class ModelRegistry:
    def __init__(self, device: torch.device, io_executor: Executor | None = None) -> None:
        self.device = device
        self._io_executor = io_executor
        self._runners: dict[str, dict[str, ModelRunner]] = {}
        self._failures: dict[str, str] = {}

    async def load_repository(self, root: Path, *, warmup: bool = True) -> None:
        scan = scan_repository(root)
        self._failures.update(scan.failures)
        for config in scan.configs:
            key = f"{config.name}:{config.version}"
            try:
                # Weights loading and warm-up are heavy: off the event loop, so health keeps answering.
                runner = await asyncio.to_thread(build_runner, config, self.device, self._io_executor)
                if warmup:
                    await asyncio.to_thread(runner.warmup)
            except Exception as exc:  # a broken version must not stop the others
                logger.exception("model %s failed to load", key)
                self._failures[key] = f"{type(exc).__name__}: {exc}"
                continue
            await runner.start()
            self._runners.setdefault(config.name, {})[config.version] = runner
            logger.info("model %s ready (%s, %s)", key, config.task, "/".join(config.modalities))

    @property
    def runners(self) -> list[ModelRunner]:
        return [r for versions in self._runners.values() for r in versions.values()]

    def resolve(self, name: str | None, version: str | None, modality: str) -> ModelRunner:
        """The runner for a read: by name (newest version unless given), else by the study's modality."""
        if name:
            versions = self._runners.get(name)
            if not versions:
                raise ModelNotFoundError(f"model {name!r} is not loaded; loaded models: {sorted(self._runners)}")
            if version:
                if version not in versions:
                    raise ModelNotFoundError(f"model {name!r} has no version {version!r}; versions: {sorted(versions)}")
                runner = versions[version]
            else:
                runner = versions[max(versions, key=version_key)]
            if modality not in runner.config.modalities:
                raise ModalityMismatchError(
                    f"model {name!r} reads {'/'.join(runner.config.modalities)} studies, not {modality}"
                )
            return runner
        for versions in sorted(self._runners.items()):
            newest = versions[1][max(versions[1], key=version_key)]
            if modality in newest.config.modalities:
                return newest
        raise ModalityMismatchError(f"no loaded model reads {modality} studies")

    def list_models(self) -> list[tuple[ModelConfig, list[VersionState], str]]:
        rows = []
        for name in sorted(self._runners):
            versions = self._runners[name]
            states = [VersionState(v, "READY") for v in sorted(versions, key=version_key)]
            states += [
                VersionState(k.split(":", 1)[1], "FAILED", r)
                for k, r in self._failures.items()
                if k.startswith(f"{name}:")
            ]
            newest = versions[max(versions, key=version_key)]
            rows.append((newest.config, states, str(newest.device)))
        return rows

    async def close(self, *, drain: bool = True) -> None:
        for runner in self.runners:
            await runner.stop(drain=drain)
        self._runners.clear()
