"""The one way radserve reads a weights file into a network (the runner factory, the backends, the direct runs).

A weights file is a PyTorch state dict saved with ``torch.save``, read with ``weights_only=True`` (a weights file
cannot run code) onto the CPU. A training checkpoint that wraps the state dict is unwrapped: a dict whose values
are not all tensors and that holds a dict under ``state_dict``, ``model`` or ``network`` (in that order; MONAI
bundles and Lightning checkpoints use these) gives that dict. A plain state dict (all tensors) is used as it is.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["WRAPPER_KEYS", "load_state_dict", "read_state_dict"]

WRAPPER_KEYS = ("state_dict", "model", "network")


def read_state_dict(weights: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``weights`` (unwrapped from a checkpoint as the module docstring says)."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        for key in WRAPPER_KEYS:
            if isinstance(state.get(key), dict):
                return state[key]
    return state


def load_state_dict(network: torch.nn.Module, weights: Path) -> torch.nn.Module:
    """``network`` with the weights of ``weights`` loaded (strictly: every key must match). Returns ``network``."""
    network.load_state_dict(read_state_dict(weights))
    return network
