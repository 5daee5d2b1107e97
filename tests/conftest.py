"""Shared test set-up: the `cuda` marker skips without a GPU; one real server per module that asks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """The real server, with the bundled models on the CPU, on a free loopback port."""
    from inference.serverproc import ServerProcess

    log_path = tmp_path_factory.mktemp("server") / "server.log"
    proc = ServerProcess(models=ROOT / "models", device="cpu", log_path=log_path, extra_args=["--log-level", "DEBUG"])
    proc.start()
    yield proc
    proc.stop()
