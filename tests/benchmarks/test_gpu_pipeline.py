"""The GPU pipeline (skipped without CUDA): preprocessing really runs on the device, concurrent preprocessing on
per-thread streams gives the same images as sequential, bf16/fp16 autocast finds what fp32 finds on the phantom
sets, and a torch.compile'd network computes what the eager one does.

benchmarks/gpu_run.sh runs these first on a GPU machine.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.engine.direct import load_network, run_direct
from inference.engine.preprocess import preprocess
from inference.modelrepo.registry import task_class
from inference.modelrepo.schema import ModelConfig
from inference.phantoms import make_chest_ct

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.cuda

MATCH_MM = 2.0
SCORE_MARGIN = 0.05  # findings this close to the threshold may come and go with the precision


def _config(name: str) -> ModelConfig:
    path = ROOT / "models" / name / "1" / "model.yaml"
    if not path.is_file():
        pytest.skip(f"no {path}")
    config = ModelConfig.from_yaml(path)
    if not config.weights_path.is_file():
        pytest.skip(f"model {name} has no weights ({config.weights_path.name}); train it first")
    return config


def _ct(seed: int, shape=(192, 192, 80)):
    return make_chest_ct(np.random.default_rng(seed), shape=shape, slice_spacing_mm=2.0, n_nodules=2)


def test_preprocessing_runs_on_the_gpu_and_matches_the_cpu():
    from torch.profiler import ProfilerActivity, profile

    config = _config("lung_nodule_ct")
    volume = _ct(1).volume
    on_cpu = preprocess(volume, config.preprocessing, "cpu")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        on_gpu = preprocess(volume, config.preprocessing, torch.device("cuda"))
        torch.cuda.synchronize()
    assert on_gpu.image.device.type == "cuda"
    np.testing.assert_allclose(on_gpu.affine, on_cpu.affine, atol=1e-9)
    assert torch.allclose(on_gpu.image.cpu(), on_cpu.image, atol=1e-3)
    cuda_kernels = [e.key for e in prof.key_averages() if e.device_type.name == "CUDA"]
    assert any("grid" in k for k in cuda_kernels), f"the resampling ran on no CUDA kernel: {cuda_kernels[:20]}"


def test_concurrent_preprocessing_on_thread_streams_matches_sequential():
    config = _config("lung_nodule_ct")
    volumes = [_ct(seed, shape=(160, 160, 64)).volume for seed in range(4)]
    device = torch.device("cuda")
    expected = [preprocess(v, config.preprocessing, device).image.cpu() for v in volumes]
    network = torch.nn.Conv3d(1, 8, 3, padding=1).to(device)
    results: list[torch.Tensor | None] = [None] * len(volumes)
    stop = threading.Event()

    def busy_default_stream() -> None:  # forward passes on the default stream meanwhile, as the batcher runs them
        x = torch.randn(4, 1, 96, 96, 96, device=device)
        while not stop.is_set():
            with torch.inference_mode():
                network(x)

    def work(i: int) -> None:
        results[i] = preprocess(volumes[i], config.preprocessing, device).image.clone().cpu()

    busy = threading.Thread(target=busy_default_stream)
    busy.start()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(volumes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    busy.join()
    for got, want in zip(results, expected, strict=True):
        assert got is not None and torch.equal(got, want)


def _findings(config: ModelConfig, volumes, autocast: str):
    config = dataclasses.replace(config, autocast=autocast)
    task = task_class(config)(config, torch.device("cuda"))
    network = load_network(task)
    return [run_direct(task, network, v, batch_size=config.batching.max_batch_size) for v in volumes]


def _assert_same_findings(reference, other, threshold: float) -> None:
    """Every finding clear of the threshold (by SCORE_MARGIN) in one precision has a counterpart in the other within
    MATCH_MM, whose score differs by at most SCORE_MARGIN."""
    for ref, got in zip(reference, other, strict=True):
        for a, b in ((ref, got), (got, ref)):
            for finding in a:
                if finding.score < threshold + SCORE_MARGIN:
                    continue
                distances = [np.linalg.norm(np.subtract(g.center_mm, finding.center_mm)) for g in b]
                assert distances and min(distances) <= MATCH_MM, f"{finding} has no counterpart within {MATCH_MM} mm"
                match = b[int(np.argmin(distances))]
                assert abs(match.score - finding.score) <= SCORE_MARGIN, (finding, match)


@pytest.mark.parametrize("autocast", ["bf16", "fp16"])
def test_autocast_finds_what_fp32_finds_on_ct_phantoms(autocast):
    config = _config("lung_nodule_ct")
    volumes = [_ct(100 + seed).volume for seed in range(4)]
    reference = _findings(config, volumes, "none")
    assert any(reference), "the fp32 model found nothing on the phantoms"
    _assert_same_findings(reference, _findings(config, volumes, autocast), config.postprocessing.score_threshold)


@pytest.mark.parametrize("autocast", ["bf16", "fp16"])
def test_autocast_finds_what_fp32_finds_on_xray_phantoms(autocast):
    from inference.phantoms.chest_xray import make_chest_xray

    config = _config("chest_xray")
    volumes = []
    for seed in range(8):
        phantom = make_chest_xray(np.random.default_rng(200 + seed), size_px=(1024, 1024), pixel_spacing_mm=0.35)
        volumes.append(phantom.volume)
    reference = _findings(config, volumes, "none")
    _assert_same_findings(reference, _findings(config, volumes, autocast), config.postprocessing.score_threshold)


def test_compiled_network_computes_what_the_eager_one_does():
    from inference.backends.torch import TorchBackend
    from inference.postprocess.detection import split_head_outputs

    config = _config("lung_nodule_ct")
    task = task_class(config)(config, torch.device("cuda"))
    device = torch.device("cuda")
    weights = config.weights_path
    eager = TorchBackend.from_weights(task.build_network(), weights, device, autocast="none")
    compiled = TorchBackend.from_weights(task.build_network(), weights, device, autocast="none", compile=True)
    assert compiled.compiled
    batch = torch.rand((config.batching.max_batch_size, *task.item_shape), device=device)
    for size in (1, 2, batch.shape[0]):  # the sizes ModelRunner.warmup compiles for
        want_cls, want_box = split_head_outputs(eager.forward(batch[:size]))
        got_cls, got_box = split_head_outputs(compiled.forward(batch[:size]))
        for want, got in zip(want_cls + want_box, got_cls + got_box, strict=True):
            torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)
