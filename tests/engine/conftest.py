"""Shared by the engine tests that run the real lung nodule network on the CPU without trained weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference.modelrepo.schema import ModelConfig
from inference.tasks.detection import DetectionTask

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wide_lung_network() -> tuple[ModelConfig, DetectionTask, torch.nn.Module]:
    """The lung nodule model's config, task and network, seeded, its classification layer re-drawn wide: freshly
    initialised, every score sits at the prior (0.01), so a patch would have no detections to compare."""
    config = ModelConfig.from_yaml(ROOT / "models" / "lung_nodule_ct" / "1" / "model.yaml")
    task = DetectionTask(config, torch.device("cpu"))
    torch.manual_seed(0)
    network = task.build_network()
    with torch.no_grad():
        torch.nn.init.normal_(network.classification_head.cls_logits.weight, std=0.5)
        network.classification_head.cls_logits.bias.zero_()
    return config, task, network
