"""Local PyTorch backend: the network on CUDA when available, else the CPU."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from inference.backends.base import Backend
from inference.platform import autocast_dtype

logger = logging.getLogger(__name__)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, network: torch.nn.Module, device: torch.device, *, autocast: str = "none") -> None:
        self._device = device
        self._network = network.to(device).eval()
        self._autocast_dtype = autocast_dtype(device, autocast)

    @classmethod
    def from_weights(
        cls, network: torch.nn.Module, weights: Path, device: torch.device, *, autocast: str = "none"
    ) -> TorchBackend:
        """Load a state dict (``weights_only``: a weights file cannot run code) into ``network``."""
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        network.load_state_dict(state)
        return cls(network, device, autocast=autocast)

    @property
    def device(self) -> torch.device:
        return self._device

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> Any:
        batch = batch.to(self._device, non_blocking=True)
        if self._autocast_dtype is None:
            return self._network(batch)
        with torch.autocast(device_type=self._device.type, dtype=self._autocast_dtype):
            return self._network(batch)

    def close(self) -> None:
        self._network.to("cpu")
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
