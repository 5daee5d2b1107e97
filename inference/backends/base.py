"""The Backend interface: runs a model's network on one batch."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch


class Backend(ABC):
    """Executes the forward pass of one model version. Called from one worker thread at a time."""

    name = "abstract"

    @property
    @abstractmethod
    def device(self) -> torch.device:
        raise NotImplementedError(f"{type(self).__name__} must define device")

    @abstractmethod
    def forward(self, batch: torch.Tensor) -> Any:
        """Run the network on ``batch`` (B, C, *spatial) and return its raw outputs."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (GPU memory, connections)."""
