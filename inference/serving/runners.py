"""The runner factory: a model version's configuration -> a :class:`ModelRunner` (its Task, its Backend, its batcher).

Which Task reads a model is :func:`inference.tasks.task_class`; where its network runs is :func:`backend_of`
(model.yaml's ``backend:``, else the server's ``--backend``). On torch the network is built and its weights loaded
by the task (:meth:`Task.load_network`); on Triton no weights are loaded here: Triton serves the export of the version
(``radserve triton export``).
"""

from __future__ import annotations

from concurrent.futures import Executor

import torch

from inference.backends.torch import TorchBackend
from inference.config import TritonConfig
from inference.engine.runner import ModelRunner
from inference.modelrepo.schema import ModelConfig
from inference.tasks import task_class

__all__ = ["backend_of", "build_runner"]


def backend_of(config: ModelConfig, default: str = "torch") -> str:
    """Where a version's network runs: model.yaml's ``backend`` when set, else the server's ``--backend``."""
    return config.backend or default


def build_runner(
    config: ModelConfig,
    device: torch.device,
    io_executor: Executor | None = None,
    *,
    backend: str = "torch",
    triton: TritonConfig | None = None,
) -> ModelRunner:
    """A runner for ``config`` on ``device`` (not started, not warmed up)."""
    task = task_class(config)(config, device)
    if backend_of(config, backend) == "triton":
        from inference.backends.triton import TritonBackend

        triton_backend = TritonBackend(
            config.name,
            config.version,
            task.item_shape,
            triton or TritonConfig(),
            max_batch_size=config.batching.max_batch_size,
            device=device,
        )
        return ModelRunner(config, task, triton_backend, io_executor)
    return ModelRunner(config, task, TorchBackend(task.load_network(), device, autocast=config.autocast), io_executor)
