"""A task's network: built from model.yaml's ``network`` section (or a MONAI bundle's ``network_def``), weights loaded.

``model.yaml`` is data, not code: ``network.target`` must name a callable under one of
:data:`~inference.modelrepo.schema.ALLOWED_TARGET_PREFIXES`. A bundle's network comes from
``ModelConfig.network_factory`` (MONAI's ConfigParser; see :mod:`inference.modelrepo.bundle`). Weights are read by
:mod:`inference.backends.weights`, except a bundle's TorchScript program (``model.ts``), which carries its own.
"""

from __future__ import annotations

import importlib

import torch

from inference.backends.weights import load_state_dict
from inference.modelrepo.schema import ALLOWED_TARGET_PREFIXES, ModelConfig, NetworkConfig

__all__ = ["build_network", "instantiate_network", "load_network"]


def instantiate_network(network: NetworkConfig) -> torch.nn.Module:
    """Build ``network.target(**network.args)``; the target must live in an allowed package."""
    if not network.target.startswith(ALLOWED_TARGET_PREFIXES):
        raise ValueError(f"network.target {network.target!r} must start with one of {ALLOWED_TARGET_PREFIXES}")
    module_name, _, attr = network.target.rpartition(".")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory(**network.args)


def build_network(config: ModelConfig) -> torch.nn.Module:
    """The bare network of a model version (no weights loaded, except a TorchScript bundle's own)."""
    if config.network_factory is not None:
        return config.network_factory()
    return instantiate_network(config.network)


def load_network(config: ModelConfig, network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``network`` (from :func:`build_network`) with the version's weights, in eval mode on ``device``."""
    if not (config.network_factory is not None and config.weights_path.suffix == ".ts"):
        load_state_dict(network, config.weights_path)  # a TorchScript program loaded its weights with itself
    return network.to(device).eval()
