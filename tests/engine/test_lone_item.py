"""A batch of one 3-D item on the CPU is forwarded as a pair of copies (PyTorch's native conv3d kernel at N=1 is
3-4 times slower than oneDNN's at N=2; docs/decisions.md), and gets the answer it gets alone.

The real lung nodule network, seeded, with its classification layer re-drawn wide so that a patch has detections
to compare (conftest.py). The backend is the real TorchBackend, wrapped only to record batch sizes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from inference.backends.base import Backend
from inference.backends.torch import TorchBackend
from inference.engine.runner import ModelRunner
from inference.platform import pairs_lone_item
from inference.tasks.direct import forward_items

CPU = torch.device("cpu")


class Recording(Backend):
    """The real backend, noting the batch sizes it is given."""

    def __init__(self, inner: TorchBackend) -> None:
        self.inner = inner
        self.batch_sizes: list[int] = []

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def pairs_lone_item(self, item: torch.Tensor) -> bool:
        return self.inner.pairs_lone_item(item)

    def forward(self, batch: torch.Tensor) -> Any:
        self.batch_sizes.append(int(batch.shape[0]))
        return self.inner.forward(batch)


@pytest.fixture(scope="module")
def parts(wide_lung_network):
    config, task, network = wide_lung_network
    item = torch.rand((1, 96, 96, 96), generator=torch.Generator().manual_seed(1))
    return config, task, network, TorchBackend(network, CPU), item


def test_the_cpu_pairs_lone_3d_items_only():
    volume_item, image_item = torch.zeros((1, 8, 8, 8)), torch.zeros((1, 8, 8))
    assert pairs_lone_item(CPU, volume_item)
    assert not pairs_lone_item(CPU, image_item)  # 2-D convolutions take oneDNN at N=1
    assert not pairs_lone_item(torch.device("cuda"), volume_item)  # cuDNN has no such heuristic
    assert not Backend.pairs_lone_item(object(), volume_item)  # a backend that says nothing (Triton) is not paired


def test_a_lone_item_is_forwarded_as_a_pair_with_the_answer_it_gets_alone(parts):
    config, task, network, backend, item = parts
    with torch.inference_mode():
        alone = task.split_outputs(network(item[None]), 1)[0]  # N=1: the native kernel
    assert len(alone) > 0, "the re-drawn classifier should give detections to compare"
    recording = Recording(backend)
    (paired,) = ModelRunner(config, task, recording)._forward([item])
    assert recording.batch_sizes == [2]
    np.testing.assert_array_equal(paired.labels, alone.labels)
    np.testing.assert_allclose(paired.scores, alone.scores, atol=1e-4)
    np.testing.assert_allclose(paired.boxes, alone.boxes, atol=1e-3)

    # A batch of several items is not padded, and the direct path (training evaluation, baselines) pairs as well.
    ModelRunner(config, task, recording)._forward([item, item, item])
    assert recording.batch_sizes == [2, 3]
    (direct,) = forward_items(task, network, [item], batch_size=4)
    np.testing.assert_array_equal(direct.scores, paired.scores)
    np.testing.assert_array_equal(direct.boxes, paired.boxes)
