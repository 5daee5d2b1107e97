"""The model-specific stages around the batched forward pass.

A :class:`Task` turns a Volume into same-shape work items (``prepare``), turns one batched network
output into per-item results (``split_outputs``, run in the batcher's worker right after the forward
pass), and turns a study's item results into Findings and, for a task that segments, their masks
(``finalize``, a :class:`TaskResult`). The engine owns everything in between: queueing, batching across
requests, the backend call. Detection and segmentation are Tasks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from inference.io.volume import Volume
from inference.modelrepo.schema import ModelConfig
from inference.outputs.finding import Finding, FindingMask
from inference.tasks.network import build_network, load_network


@dataclass
class PreparedStudy:
    items: list[torch.Tensor]  # each (C, *item_shape), on the model's device
    context: Any  # task-specific: geometry, patch plan...
    timing_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskResult:
    """What ``Task.finalize`` returns: the findings and, for a task that segments, the voxels of each.

    One object, so that no stage between the task and the DICOM SEG can keep the findings and drop the masks.
    ``masks[n]`` holds the voxels of ``findings[n]`` on the input volume's grid; ``masks`` is None for a task that
    has no masks (detection: the SEG renders its boxes, ``inference.outputs.regions``).
    """

    findings: list[Finding]
    masks: list[FindingMask] | None = None

    def __post_init__(self) -> None:
        if self.masks is not None and len(self.masks) != len(self.findings):
            raise ValueError(f"{len(self.masks)} masks for {len(self.findings)} findings: one mask per finding")


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

    def build_network(self) -> torch.nn.Module:
        """The bare network the backend runs (no weights loaded): model.yaml's ``network``, or the bundle's."""
        return build_network(self.config)

    def load_network(self) -> torch.nn.Module:
        """:meth:`build_network` with the version's weights, in eval mode on the task's device: the one path by
        which the runner factory, the Triton export and the direct runs get a network."""
        return load_network(self.config, self.build_network(), self.device)

    @abstractmethod
    def prepare(self, volume: Volume) -> PreparedStudy:
        """Preprocess a study and cut it into work items."""
        raise NotImplementedError(f"{type(self).__name__} must implement prepare")

    @abstractmethod
    def split_outputs(self, outputs: Any, batch_size: int) -> list[Any]:
        """Split one batched network output into ``batch_size`` per-item results (small, on the CPU)."""
        raise NotImplementedError(f"{type(self).__name__} must implement split_outputs")

    def slab_context(self, affine: Any, plan: Any) -> Any:
        """The ``PreparedStudy.context`` of a progressive read (:mod:`inference.engine.progressive`), whose patches
        were built slab by slab: ``affine`` maps the preprocessed grid to LPS mm, ``plan`` is its patch plan. Only
        the tasks of models that can be read progressively (``ModelConfig.progressive_refusal``) define it."""
        raise NotImplementedError(f"{type(self).__name__} cannot be read progressively (no slab_context)")

    @abstractmethod
    def finalize(self, volume: Volume, prepared: PreparedStudy, results: list[Any]) -> TaskResult:
        """Merge a study's per-item results into Findings in patient coordinates (and their masks, if any)."""
        raise NotImplementedError(f"{type(self).__name__} must implement finalize")
