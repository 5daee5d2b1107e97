"""The model-specific stages around the batched forward pass.

A :class:`Task` turns a Volume into same-shape work items (``prepare``), turns one batched network
output into per-item results (``split_outputs``, run in the batcher's worker right after the forward
pass), and turns a study's item results into Findings (``finalize``). The engine owns everything in
between: queueing, batching across requests, the backend call. Detection and segmentation are Tasks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from inference.io.volume import Volume
from inference.modelrepo.schema import ModelConfig
from inference.postprocess.finding import Finding


@dataclass
class PreparedStudy:
    items: list[torch.Tensor]  # each (C, *item_shape), on the model's device
    context: Any  # task-specific: geometry, patch plan...
    timing_ms: dict[str, float] = field(default_factory=dict)


class Task(ABC):
    """Model-specific preprocessing and postprocessing; see the module docstring."""

    def __init__(self, config: ModelConfig, device: torch.device) -> None:
        self.config = config
        self.device = device

    @property
    @abstractmethod
    def item_shape(self) -> tuple[int, ...]:
        """Shape (C, *spatial) of every work item of this model."""
        raise NotImplementedError(f"{type(self).__name__} must define item_shape")

    @abstractmethod
    def build_network(self) -> torch.nn.Module:
        """The bare network the backend runs (no weights loaded)."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_network")

    @abstractmethod
    def prepare(self, volume: Volume) -> PreparedStudy:
        """Preprocess a study and cut it into work items."""
        raise NotImplementedError(f"{type(self).__name__} must implement prepare")

    @abstractmethod
    def split_outputs(self, outputs: Any, batch_size: int) -> list[Any]:
        """Split one batched network output into ``batch_size`` per-item results (small, on the CPU)."""
        raise NotImplementedError(f"{type(self).__name__} must implement split_outputs")

    def masks(self, prepared: PreparedStudy) -> dict[str, np.ndarray] | None:
        """After ``finalize``: label -> boolean mask in the input volume's grid, for DICOM SEG; None if the
        task produces no masks (detection)."""
        return None

    @abstractmethod
    def finalize(self, volume: Volume, prepared: PreparedStudy, results: list[Any]) -> list[Finding]:
        """Merge a study's per-item results into Findings in patient coordinates."""
        raise NotImplementedError(f"{type(self).__name__} must implement finalize")
