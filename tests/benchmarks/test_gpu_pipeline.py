"""The GPU pipeline (skipped without CUDA): preprocessing really runs on the device (the CT's and brain_lesion_mr's,
whose bias correction runs lstsq, float64 histc and kthvalue there) and matches the CPU, concurrent preprocessing
on per-thread streams gives the same images as sequential, bf16/fp16 autocast finds what fp32 finds on each model's
phantoms (detection and segmentation), the real server on CUDA (bf16, concurrent reads of every modality: the
batcher's thread and the I/O threads' streams) finds what fp32 finds, and a torch.compile'd network computes what
the eager one does.

Every comparison asserts that it compared something: a test that compares no finding, voxel or graph fails.
benchmarks/gpu_run.sh runs these (and test_gpu_server.py, test_gpu_oom.py) on a GPU machine.
"""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.modelrepo.schema import ModelConfig
from inference.phantoms import make_brain_mr, make_chest_ct, write_dicom_series
from inference.tasks import task_class
from inference.tasks.direct import forward_items, load_network, run_direct
from inference.tasks.preprocess import preprocess

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.cuda

MATCH_MM = 2.0
SCORE_MARGIN = 0.05  # findings this close to the threshold may come and go with the precision
# The fp32 reference of a detection model is taken this far under its score threshold, so that every finding of
# the other precision has its counterpart there, also for chest_xray whose threshold (0.95) leaves no room above.
REFERENCE_BELOW = 0.3


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


def _findings(config: ModelConfig, volumes, autocast: str, score_threshold: float | None = None):
    config = dataclasses.replace(config, autocast=autocast)
    options = {} if score_threshold is None else {"score_threshold": score_threshold}
    task = task_class(config)(config, torch.device("cuda"), **options)
    network = load_network(task)
    return [run_direct(task, network, v, batch_size=config.batching.max_batch_size) for v in volumes]


def compare_findings(reference, other, *, reference_floor: float, other_floor: float) -> int:
    """Findings of ``reference`` scoring at least ``reference_floor``, and of ``other`` at least ``other_floor``, each
    have a counterpart in the other list (per study) within MATCH_MM whose score differs by at most SCORE_MARGIN.
    Returns how many findings were compared (callers assert it is not 0). Findings are anything with ``score`` and
    ``center_mm`` (radserve's Finding, or the proto's)."""
    compared = 0
    for ref, got in zip(reference, other, strict=True):
        for a, b, floor in ((ref, got, reference_floor), (got, ref, other_floor)):
            for finding in a:
                if finding.score < floor:
                    continue
                distances = [np.linalg.norm(np.subtract(g.center_mm, finding.center_mm)) for g in b]
                assert distances and min(distances) <= MATCH_MM, f"{finding} has no counterpart within {MATCH_MM} mm"
                match = b[int(np.argmin(distances))]
                assert abs(match.score - finding.score) <= SCORE_MARGIN, (finding, match)
                compared += 1
    return compared


def compare_detections(config: ModelConfig, volumes, autocast: str) -> int:
    """fp32 (under the threshold by REFERENCE_BELOW) against ``autocast`` (at the threshold) on ``volumes``."""
    threshold = config.postprocessing.score_threshold
    reference = _findings(config, volumes, "none", score_threshold=max(0.05, threshold - REFERENCE_BELOW))
    assert any(reference), "the fp32 model found nothing on the phantoms"
    other = _findings(config, volumes, autocast)
    return compare_findings(reference, other, reference_floor=threshold + SCORE_MARGIN, other_floor=threshold)


@pytest.mark.parametrize("autocast", ["bf16", "fp16"])
def test_autocast_finds_what_fp32_finds_on_ct_phantoms(autocast):
    config = _config("lung_nodule_ct")
    volumes = [_ct(100 + seed).volume for seed in range(4)]
    assert compare_detections(config, volumes, autocast) >= 2


@pytest.mark.parametrize("autocast", ["bf16", "fp16"])
def test_autocast_finds_what_fp32_finds_on_xray_phantoms(autocast):
    from inference.phantoms.chest_xray import make_chest_xray

    config = _config("chest_xray")
    volumes = []
    for seed in range(8):
        phantom = make_chest_xray(np.random.default_rng(200 + seed), size_px=(1024, 1024), pixel_spacing_mm=0.35)
        volumes.append(phantom.volume)
    # Every bf16/fp16 finding (>= 0.95) is compared with the fp32 reference taken at 0.65.
    assert compare_detections(config, volumes, autocast) >= 2


def _mr(seed: int, shape=(160, 160, 96), bias_amplitude: float | None = None):
    return make_brain_mr(
        np.random.default_rng(seed),
        shape=shape,
        pixel_spacing_mm=1.4,
        slice_spacing_mm=1.6,
        n_lesions=2,
        lesion_diameters_mm=(14.0, 20.0),
        bias_amplitude=bias_amplitude,
    )


def _segment(config: ModelConfig, volume, autocast: str):
    """(findings, the label's mask in the input grid) of one study through the segmentation task's stages."""
    config = dataclasses.replace(config, autocast=autocast)
    task = task_class(config)(config, torch.device("cuda"))
    network = load_network(task)
    prepared = task.prepare(volume)
    results = forward_items(task, network, prepared.items, config.batching.max_batch_size)
    output = task.finalize(volume, prepared, results)  # the findings and each one's mask (TaskResult)
    mask = np.zeros(volume.shape, dtype=bool)
    for finding_mask in output.masks or []:
        mask[finding_mask.slices] |= finding_mask.mask
    return output.findings, mask


@pytest.mark.parametrize("autocast", ["bf16", "fp16"])
def test_autocast_segments_what_fp32_segments_on_mr_phantoms(autocast):
    config = _config("brain_lesion_mr")
    post = config.postprocessing
    floor = max(post.score_threshold, post.min_score or 0.0) + SCORE_MARGIN  # components near the floors may flip
    compared, voxels = 0, 0
    for seed in (300, 301):
        volume = _mr(seed).volume
        want_findings, want = _segment(config, volume, "none")
        got_findings, got = _segment(config, volume, autocast)
        assert want.shape == got.shape == volume.shape
        if want.any() or got.any():
            dice = 2 * np.logical_and(want, got).sum() / (want.sum() + got.sum())
            assert dice >= 0.9, f"seed {seed}: Dice {dice:.3f} between the fp32 and {autocast} masks"
        voxels += int(want.sum())
        compared += compare_findings([want_findings], [got_findings], reference_floor=floor, other_floor=floor)
    assert voxels > 0, "the fp32 model segmented nothing on the phantoms"
    assert compared >= 1


def test_mr_preprocessing_with_bias_correction_on_the_gpu_matches_the_cpu():
    """lstsq, float64 histc and kthvalue on CUDA: the corrected, z-scored image matches the CPU's, and the
    correction changed the image by far more than the tolerance (so the comparison covers it)."""
    config = _config("brain_lesion_mr")
    assert config.preprocessing.bias_correction_degree, "brain_lesion_mr no longer corrects the bias field"
    volume = _mr(310, bias_amplitude=0.25).volume
    on_cpu = preprocess(volume, config.preprocessing, "cpu")
    on_gpu = preprocess(volume, config.preprocessing, torch.device("cuda"))
    assert on_gpu.image.device.type == "cuda"
    np.testing.assert_allclose(on_gpu.affine, on_cpu.affine, atol=1e-9)
    tolerance = 2e-2  # z units; the fused resampling differs by ~1e-5 between devices
    difference = (on_gpu.image.cpu() - on_cpu.image).abs().max().item()
    assert difference <= tolerance, f"CUDA and CPU preprocessing differ by {difference:.4f} z"
    uncorrected = preprocess(volume, dataclasses.replace(config.preprocessing, bias_correction_degree=0), "cpu")
    effect = (uncorrected.image - on_cpu.image).abs().max().item()
    assert effect > 10 * tolerance, f"the bias correction changed the image by only {effect:.4f} z"


def test_compiled_network_computes_what_the_eager_one_does():
    from benchmarks.compile_check import compiled_graphs
    from inference.backends.torch import TorchBackend
    from inference.tasks.postprocess.detection import split_head_outputs

    config = _config("lung_nodule_ct")
    task = task_class(config)(config, torch.device("cuda"))
    device = torch.device("cuda")
    weights = config.weights_path
    eager = TorchBackend.from_weights(task.build_network(), weights, device, autocast="none")
    compiled = TorchBackend.from_weights(task.build_network(), weights, device, autocast="none", compile=True)
    graphs = compiled_graphs()
    batch = torch.rand((config.batching.max_batch_size, *task.item_shape), device=device)
    outputs = 0
    for size in (1, 2, batch.shape[0]):  # the sizes ModelRunner.warmup compiles for
        want_cls, want_box = split_head_outputs(eager.forward(batch[:size]))
        got_cls, got_box = split_head_outputs(compiled.forward(batch[:size]))
        for want, got in zip(want_cls + want_box, got_cls + got_box, strict=True):
            torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)
            outputs += 1
    assert outputs >= 6  # class and box maps of every level, at each size
    assert compiled_graphs() > graphs, "dynamo compiled no graph: the compiled backend ran eagerly"


# -- the server path ---------------------------------------------------------------------------------------------


def _served_studies(folder: Path) -> dict[str, list[tuple[list[Path], object]]]:
    """Per model: (the DICOM files the client sends, the volume the fp32 reference reads)."""
    from inference.phantoms.chest_xray import make_chest_xray
    from inference.phantoms.writers import write_xray_dicom

    studies: dict[str, list[tuple[list[Path], object]]] = {
        "lung_nodule_ct": [],
        "brain_lesion_mr": [],
        "chest_xray": [],
    }
    for seed in range(2):
        ct = make_chest_ct(np.random.default_rng(400 + seed), shape=(192, 192, 80), slice_spacing_mm=2.0, n_nodules=2)
        studies["lung_nodule_ct"].append((write_dicom_series(ct, folder / f"ct{seed}"), ct.volume))
        mr = make_brain_mr(
            np.random.default_rng(410 + seed),
            shape=(160, 160, 96),
            pixel_spacing_mm=1.4,
            slice_spacing_mm=1.6,
            n_lesions=2,
            lesion_diameters_mm=(14.0, 20.0),
        )
        studies["brain_lesion_mr"].append((write_dicom_series(mr, folder / f"mr{seed}"), mr.volume))
    for seed in range(6):
        dx = make_chest_xray(
            np.random.default_rng(420 + seed), size_px=(1024, 1024), pixel_spacing_mm=0.35, bits_stored=16
        )
        path = write_xray_dicom(dx, folder / f"dx{seed}" / "image.dcm")
        studies["chest_xray"].append(([path], dx.volume))
    return studies


def test_the_server_on_cuda_finds_what_fp32_finds_for_every_model(tmp_path):
    from inference.client import ReadingClient
    from inference.serverproc import ServerProcess

    studies = _served_studies(tmp_path / "studies")
    configs = {name: _config(name) for name in studies}
    # The references, read here before the server takes the GPU: fp32, a detection model's under its threshold.
    references = {}
    for name, config in configs.items():
        volumes = [volume for _, volume in studies[name]]
        if config.task == "detection":
            low = max(0.05, config.postprocessing.score_threshold - REFERENCE_BELOW)
            references[name] = _findings(config, volumes, "none", score_threshold=low)
        else:
            references[name] = _findings(config, volumes, "none")
        assert any(references[name]), f"the fp32 {name} found nothing on its phantoms"
    torch.cuda.empty_cache()

    jobs = [(name, i, files) for name, group in studies.items() for i, (files, _) in enumerate(group)]
    answers: dict[tuple[str, int], list] = {}
    with ServerProcess(models=ROOT / "models", device="cuda", log_path=tmp_path / "server.log") as server:
        client = ReadingClient(server.target)
        try:
            with ThreadPoolExecutor(max_workers=8) as pool:  # every study in flight at once
                futures = {(name, i): pool.submit(client.read, files, timeout_s=300) for name, i, files in jobs}
                for key, future in futures.items():
                    response = future.result()
                    assert response.model == key[0] and response.device.startswith("cuda"), response.device
                    answers[key] = list(response.findings)
        finally:
            client.close()

    for name, config in configs.items():
        served = [answers[(name, i)] for i in range(len(studies[name]))]
        post = config.postprocessing
        if config.task == "detection":  # every served finding has its fp32 counterpart; strong fp32 ones are served
            floors = {"reference_floor": post.score_threshold + SCORE_MARGIN, "other_floor": post.score_threshold}
        else:  # same thresholds both sides: compare clear of the voxel threshold and the component floor
            floor = max(post.score_threshold, post.min_score or 0.0) + SCORE_MARGIN
            floors = {"reference_floor": floor, "other_floor": floor}
        compared = compare_findings(references[name], served, **floors)
        assert compared >= 1, f"{name}: no finding compared between the server (bf16) and fp32"
