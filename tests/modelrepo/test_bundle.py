"""MONAI bundles (model-zoo layout) as models: mapping, the trust boundary, and a real server loading one.

The configs are the published ones of the MONAI model zoo's spleen_ct_segmentation and lung_nodule_ct_detection,
copied byte for byte into tests/modelrepo/zoo/ (Project-MONAI/model-zoo, Apache-2.0; commits and versions in
zoo/README.md); the weights are random, of the right shapes (nothing is downloaded). The published lung detector
(RetinaNet over ResNet50 + a 256-channel FPN, 20.9 M parameters) is mapped, built and given weights here and by
a real server, but not run: a forward over its 512 x 512 x 192 patch is minutes on a CPU. A reduced variant of
the same published config (a thin backbone and FPN, small patches) is built and run instead.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.cli import main as cli_main
from inference.client import ReadingClient
from inference.modelrepo.bundle import load_bundle
from inference.modelrepo.schema import BUNDLE_NETWORK_TARGET, ModelConfig, PostprocessConfig
from inference.phantoms import make_chest_ct
from inference.serverproc import ServerProcess
from inference.serving.runners import build_runner
from inference.tasks import task_class
from inference.tasks.detection import DetectionTask
from inference.tasks.segmentation import SegmentationTask

ROOT = Path(__file__).resolve().parents[2]
LUNG = ROOT / "models" / "lung_nodule_ct" / "1"
CPU = torch.device("cpu")

# The published configs (see zoo/README.md): the newest versions held whole, and the lung bundle's 0.1.1.
ZOO = Path(__file__).resolve().with_name("zoo")
SPLEEN_ZOO = ZOO / "spleen_ct_segmentation"  # metadata 0.5.9
LUNG_ZOO = ZOO / "lung_nodule_ct_detection"  # metadata 0.6.8, inference.json of 0.5.7-0.5.9
LUNG_ZOO_0_1_1 = ZOO / "lung_nodule_ct_detection-0.1.1"

# Expressions a bundle may carry that radserve must never run (it only builds network_def).
TRAPS = {
    "initialize": ["$open(@bundle_root + '/PWNED_initialize', 'w').write('x')"],
    "run": ["$open(@bundle_root + '/PWNED_run', 'w').write('x')"],
    "evaluating": ["$open(@bundle_root + '/PWNED_evaluating', 'w').write('x')"],
}


def published(bundle: Path, name: str = "inference") -> dict:
    return json.loads((bundle / "configs" / f"{name}.json").read_text())


def copy_bundle(
    source: Path, directory: Path, state_dict: dict | None = None, *, inference: dict | None = None
) -> Path:
    """``source``'s published configs/, copied byte for byte, with ``state_dict`` as models/model.pt.

    ``inference`` replaces inference.json, for the variants of a published config that say how they differ.
    """
    shutil.copytree(source / "configs", directory / "configs")
    (directory / "models").mkdir()
    if inference is not None:
        (directory / "configs" / "inference.json").write_text(json.dumps(inference, indent=4))
    if state_dict is not None:
        torch.save(state_dict, directory / "models" / "model.pt")
    return directory


def with_traps(config: dict) -> dict:
    """A published config whose initialize/run/evaluating lists (replaced or added) write PWNED_* files."""
    return {**copy.deepcopy(config), **TRAPS}


def spleen_unet_state_dict(seed: int = 0) -> dict:
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    args = {k: v for k, v in published(SPLEEN_ZOO)["network_def"].items() if k != "_target_"}
    return UNet(**args).state_dict()


def write_spleen_bundle(directory: Path) -> Path:
    return copy_bundle(SPLEEN_ZOO, directory, spleen_unet_state_dict())


def reduced_lung_inference() -> dict:
    """The published config with a thin ResNet and a 16-channel FPN instead of ResNet50 and 256 channels, and
    32 x 32 x 16 patches; anchors, detector settings and preprocessing as published."""
    config = published(LUNG_ZOO)
    config["infer_patch_size"] = [32, 32, 16]
    config["backbone"] = (
        "$monai.networks.nets.resnet.ResNet(block='basic', layers=[1, 1, 1, 1], block_inplanes=[8, 16, 32, 64], "
        "spatial_dims=3, n_input_channels=1, conv1_t_stride=[2, 2, 1], conv1_t_size=[7, 7, 7], feed_forward=False)"
    )
    config["feature_extractor"] = (
        "$monai.networks.blocks.backbone_fpn_utils.BackboneWithFPN(@backbone, {'layer1': '0', 'layer2': '1'}, "
        "[8, 16], 16, spatial_dims=3, extra_blocks=monai.networks.blocks.feature_pyramid_network.LastLevelMaxPool(3))"
    )
    return config


def reduced_lung_state_dict() -> dict:
    from monai.bundle import ConfigParser

    torch.manual_seed(0)
    return ConfigParser(reduced_lung_inference()).get_parsed_content("network_def").state_dict()


def assert_no_trap_ran(directory: Path) -> None:
    assert not list(directory.glob("PWNED*")), "an initialize/run/evaluating expression of the bundle was run"


def test_spleen_bundle_maps_to_a_segmentation_model(tmp_path):
    bundle = write_spleen_bundle(tmp_path / "spleen_ct_segmentation")
    config = load_bundle(bundle)
    assert (config.name, config.version, config.task) == ("spleen_ct_segmentation", "0.5.9", "segmentation")
    assert config.modalities == ("CT",) and config.labels == ("spleen",)
    pre = config.preprocessing
    assert pre.spacing_mm == (1.5, 1.5, 2.0) and (pre.a_min, pre.a_max, pre.b_min, pre.b_max) == (-57, 164, 0, 1)
    assert pre.clip and pre.normalize == "window"
    assert config.inferer.roi_size == (96, 96, 96) and config.inferer.overlap == 0.5
    # The published SlidingWindowInferer names no mode: MONAI's default, the plain mean of overlapping windows.
    assert config.inferer.mode == "constant"
    assert SegmentationTask(config, CPU).importance_map.unique().tolist() == [1.0]
    assert config.batching.max_batch_size == 4
    assert config.network.target == BUNDLE_NETWORK_TARGET and config.weights_path == bundle / "models" / "model.pt"
    assert config.network.args == {"spatial_dims": 3, "in_channels": 1, "out_channels": 2}
    assert issubclass(task_class(config), SegmentationTask)
    runner = build_runner(config, CPU)  # the UNet from network_def, with the bundle's weights
    assert type(runner.backend._network).__name__ == "UNet"
    assert torch.equal(
        runner.backend._network.state_dict()["model.0.conv.unit0.conv.weight"],
        spleen_unet_state_dict()["model.0.conv.unit0.conv.weight"],
    )


@pytest.mark.parametrize(
    ("source", "version"), [(LUNG_ZOO, "0.6.8"), (LUNG_ZOO_0_1_1, "0.1.1")], ids=["newest", "0.1.1"]
)
def test_published_lung_nodule_detection_config_maps(tmp_path, source, version):
    # 0.1.1's metadata has no "name": the directory's name is the model's.
    bundle = copy_bundle(source, tmp_path / "lung_nodule_ct_detection", {})
    with warnings.catch_warnings():
        # The published metadata's deprecated "optional_packages_version" is renamed without MONAI's warning.
        warnings.filterwarnings("error", "Detected deprecated name", UserWarning)
        config = load_bundle(bundle)
    assert (config.name, config.version, config.task) == ("lung_nodule_ct_detection", version, "detection")
    # Its output is a dict of boxes with no channel_def: the one class gets radserve's name for it.
    assert config.modalities == ("CT",) and config.labels == ("lesion",)
    # Its Spacingd is disabled for pre-resampled LUNA16 data; radserve resamples to that spacing itself.
    pre = config.preprocessing
    assert pre.spacing_mm == (0.703125, 0.703125, 1.25)
    assert (pre.a_min, pre.a_max, pre.b_min, pre.b_max, pre.clip, pre.normalize) == (-1024, 300, 0, 1, True, "window")
    assert config.inferer.roi_size == (512, 512, 192) and config.inferer.overlap == 0.25
    assert config.detector.feature_map_scales == (1, 2, 4)
    assert config.detector.base_anchor_shapes == ((6, 8, 4), (8, 6, 5), (10, 10, 6))
    assert config.detector.size_divisible == (16, 16, 8)
    assert config.postprocessing.nms_iou == 0.22 and config.batching.max_batch_size == 1
    # score_thresh=0.02 and detections_per_img=300 are FROC-evaluation settings: radserve keeps its own.
    defaults = PostprocessConfig()
    assert config.postprocessing.score_threshold == defaults.score_threshold
    assert config.postprocessing.max_detections == defaults.max_detections
    assert config.network.args == {"spatial_dims": 3, "num_classes": 1, "num_anchors": 3, "in_channels": 1}
    assert issubclass(task_class(config), DetectionTask)


def test_published_lung_nodule_detection_network_builds_and_takes_weights_of_its_shapes(tmp_path):
    """The published network_def (both versions) builds, without running, and loads a model.pt of its shapes."""
    bundle = copy_bundle(LUNG_ZOO, tmp_path / "lung_nodule_ct_detection", {})
    torch.manual_seed(0)
    network = load_bundle(bundle).network_factory()
    assert type(network).__name__ == "RetinaNet"
    assert 20_000_000 < sum(p.numel() for p in network.parameters()) < 22_000_000
    conv1 = network.feature_extractor.body.conv1  # ResNet50's stem, as the published backbone expression says
    assert (conv1.kernel_size, conv1.stride) == ((7, 7, 7), (2, 2, 1))
    assert network.feature_extractor.out_channels == 256
    assert (network.num_anchors, network.num_classes) == (3, 1)
    state = network.state_dict()
    torch.save(state, bundle / "models" / "model.pt")
    runner = build_runner(load_bundle(bundle), CPU)  # the registry's path: network_def, then model.pt
    loaded = runner.backend._network.state_dict()
    assert loaded.keys() == state.keys()
    assert torch.equal(loaded["feature_extractor.body.conv1.weight"], state["feature_extractor.body.conv1.weight"])
    old = copy_bundle(LUNG_ZOO_0_1_1, tmp_path / "lung_nodule_ct_detection-0.1.1", {})
    load_bundle(old).network_factory().load_state_dict(state)  # 0.1.1 builds the same network


def test_reduced_lung_detection_bundle_builds_and_runs_through_the_detection_task(tmp_path):
    state = reduced_lung_state_dict()
    bundle = copy_bundle(LUNG_ZOO, tmp_path / "lung_small", state, inference=reduced_lung_inference())
    config = load_bundle(bundle)
    assert config.inferer.roi_size == (32, 32, 16)
    runner = build_runner(config, CPU)
    assert type(runner.backend._network).__name__ == "RetinaNet"
    assert sum(p.numel() for p in runner.backend._network.parameters()) < 500_000
    assert runner.warmup() > 0  # one forward on a (1, 32, 32, 16) patch, decoded by the DetectionTask


def test_bundle_expressions_outside_network_def_never_run(tmp_path):
    """initialize/run/evaluating (the published lists replaced by traps) stay unrun through mapping and building.

    So does the lung config's published test_datalist, which reads a file missing here: resolved, it would fail.
    """
    spleen = published(SPLEEN_ZOO)
    assert spleen["initialize"] and spleen["run"] and "evaluating" in published(LUNG_ZOO_0_1_1)
    bundle = copy_bundle(SPLEEN_ZOO, tmp_path / "spleen", spleen_unet_state_dict(), inference=with_traps(spleen))
    build_runner(load_bundle(bundle), CPU)
    assert_no_trap_ran(bundle)
    lung = copy_bundle(
        LUNG_ZOO, tmp_path / "lung", reduced_lung_state_dict(), inference=with_traps(reduced_lung_inference())
    )
    build_runner(load_bundle(lung), CPU)
    assert_no_trap_ran(lung)


def test_bundle_errors_name_what_is_wrong(tmp_path):
    inference = published(SPLEEN_ZOO)
    inference["preprocessing"]["transforms"].insert(3, {"_target_": "CropForegroundd", "keys": "@image_key"})
    bundle = copy_bundle(SPLEEN_ZOO, tmp_path / "a", spleen_unet_state_dict(), inference=inference)
    with pytest.raises(ValueError, match=r"\['CropForegroundd'\] are not supported"):
        load_bundle(bundle)
    with pytest.raises(ValueError, match=r"models/model\.pt .* are missing"):
        load_bundle(copy_bundle(SPLEEN_ZOO, tmp_path / "b"))
    wrong = copy_bundle(SPLEEN_ZOO, tmp_path / "c", {"model.0.conv.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="state_dict"):
        build_runner(load_bundle(wrong), CPU)


def test_model_yaml_cannot_reach_the_bundle_network_or_monai_bundle_code():
    base = {"name": "m", "task": "segmentation", "modalities": ["CT"], "labels": ["x"]}
    with pytest.raises(ValueError, match="set by the MONAI bundle loader only"):
        ModelConfig.from_dict({**base, "network": {"target": BUNDLE_NETWORK_TARGET}}, version="1")
    with pytest.raises(ValueError, match="not allowed"):
        ModelConfig.from_dict({**base, "network": {"target": "monai.bundle.run"}}, version="1")
    with pytest.raises(ValueError, match="unknown keys"):
        ModelConfig.from_dict(
            {**base, "network": {"target": "monai.networks.nets.UNet"}, "network_factory": 1}, version="1"
        )


# -- against a real server -------------------------------------------------------------------------------


def write_lung_copy(repo: Path) -> None:
    """models/lung_nodule_ct/1 with 32^3 patches; its weights when committed, else random ones."""
    data = yaml.safe_load((LUNG / "model.yaml").read_text())
    data["inferer"]["roi_size"] = [32, 32, 32]
    directory = repo / "lung_nodule_ct" / "1"
    directory.mkdir(parents=True)
    (directory / "model.yaml").write_text(yaml.safe_dump(data))
    if (LUNG / "model.pt").is_file():
        shutil.copy(LUNG / "model.pt", directory / "model.pt")
    else:
        config = ModelConfig.from_dict(data, version="1")
        torch.save(DetectionTask(config, CPU).build_network().state_dict(), directory / "model.pt")


OPERATOR_TOKEN = "bundle-tests-operator"  # loading models is an operator's act


@pytest.fixture(scope="module")
def bundle_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    write_lung_copy(repo)
    bundles = tmp_path_factory.mktemp("bundles")  # a second model root, where the tests put their bundles
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    tokens = log_path.parent / "tokens.yaml"
    tokens.write_text(f"ops:\n  token: {OPERATOR_TOKEN}\n  role: operator\n")
    proc = ServerProcess(models=repo, log_path=log_path, extra_args=["--model-poll-interval-s", "0"])
    proc.env["RADSERVE_WARMUP"] = "0"
    proc.env["RADSERVE_METRICS_PORT"] = "0"
    proc.env["RADSERVE_AUTH_TOKENS"] = str(tokens)
    proc.env["RADSERVE_MODEL_ROOTS"] = os.pathsep.join([str(repo), str(bundles)])
    proc.bundles = bundles
    proc.start()
    yield proc
    proc.stop()


def test_spleen_bundle_loads_with_radserve_models_load_and_reads_a_ct(bundle_server, capsys):
    bundle = write_spleen_bundle(bundle_server.bundles / "spleen_ct_segmentation")
    target = ["--server", bundle_server.target, "--token", OPERATOR_TOKEN]
    assert cli_main(["models", "load", str(bundle), *target]) == 0
    assert "spleen_ct_segmentation" in capsys.readouterr().out
    phantom = make_chest_ct(np.random.default_rng(3), shape=(96, 96, 40), pixel_spacing_mm=1.5, slice_spacing_mm=2.5)
    volume = phantom.volume
    raw = pb.RawArray(dtype="float32", shape=volume.shape, affine=volume.affine.ravel().tolist())
    client = ReadingClient(bundle_server.target, token=OPERATOR_TOKEN)
    try:
        listing = {m.name: m for m in client.list_models().models}
        spleen = listing["spleen_ct_segmentation"]
        assert spleen.task == "segmentation" and list(spleen.labels) == ["spleen"]
        assert [(v.version, v.state, v.state_code) for v in spleen.versions] == [
            ("0.5.9", "READY", pb.VERSION_STATE_READY)
        ]
        response = client.read(
            [volume.voxels.astype(np.float32).tobytes()],
            payload_kind=pb.RAW,
            raw=raw,
            model="spleen_ct_segmentation",
            timeout_s=300,
        )
        assert (response.model, response.model_version) == ("spleen_ct_segmentation", "0.5.9")
        assert all(f.label == "spleen" for f in response.findings)
        # A read naming no model still goes to the CT default, lung_nodule_ct.
        assert client.list_models().default_models["CT"] == "lung_nodule_ct:1"
    finally:
        client.close()
    assert cli_main(["models", "unload", "spleen_ct_segmentation", *target]) == 0
    assert cli_main(["models", "unload", "spleen_ct_segmentation", *target]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_lung_nodule_bundle_loads_with_radserve_models_load_and_reads_a_ct(bundle_server, capsys):
    """The published config with weights of its shapes loads (not run: a CPU forward is minutes); the reduced
    variant of the same config loads under the same name and version and reads a chest CT."""
    target = ["--server", bundle_server.target, "--token", OPERATOR_TOKEN]
    client = ReadingClient(bundle_server.target, token=OPERATOR_TOKEN)
    try:
        bundle = copy_bundle(LUNG_ZOO, bundle_server.bundles / "lung_nodule_ct_detection", {})
        torch.save(load_bundle(bundle).network_factory().state_dict(), bundle / "models" / "model.pt")
        assert cli_main(["models", "load", str(bundle), *target]) == 0
        lung = {m.name: m for m in client.list_models().models}["lung_nodule_ct_detection"]
        assert lung.task == "detection" and list(lung.labels) == ["lesion"]
        assert [(v.version, v.state) for v in lung.versions] == [("0.6.8", "READY")]
        assert cli_main(["models", "unload", "lung_nodule_ct_detection", *target]) == 0

        small = copy_bundle(
            LUNG_ZOO,
            bundle_server.bundles / "lung_small",
            reduced_lung_state_dict(),
            inference=reduced_lung_inference(),
        )
        assert cli_main(["models", "load", str(small), *target]) == 0
        phantom = make_chest_ct(
            np.random.default_rng(5), shape=(48, 48, 16), pixel_spacing_mm=1.5, slice_spacing_mm=2.5
        )
        volume = phantom.volume
        raw = pb.RawArray(dtype="float32", shape=volume.shape, affine=volume.affine.ravel().tolist())
        response = client.read(
            [volume.voxels.astype(np.float32).tobytes()],
            payload_kind=pb.RAW,
            raw=raw,
            model="lung_nodule_ct_detection",
            timeout_s=300,
        )
        assert (response.model, response.model_version) == ("lung_nodule_ct_detection", "0.6.8")
        assert all(f.label == "lesion" for f in response.findings)  # random weights: any number of them
    finally:
        client.close()
        cli_main(["models", "unload", "lung_nodule_ct_detection", *target])
    capsys.readouterr()


@pytest.mark.filterwarnings("ignore:Converting a tensor to a Python boolean")  # tracing the tiny UNet
def test_torchscript_bundle_loads_its_program_and_weights_from_model_ts(tmp_path):
    from monai.networks.nets import UNet

    inference = published(SPLEEN_ZOO)
    inference["network_def"].update(channels=[4, 8], strides=[2], num_res_units=0)
    inference["inferer"]["roi_size"] = [16, 16, 16]
    bundle = copy_bundle(SPLEEN_ZOO, tmp_path / "spleen_ts", inference=inference)
    torch.manual_seed(0)
    network = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=[4, 8], strides=[2]).eval()
    torch.jit.trace(network, torch.zeros(1, 1, 16, 16, 16)).save(str(bundle / "models" / "model.ts"))
    config = load_bundle(bundle)
    assert config.network.weights == "models/model.ts"
    runner = build_runner(config, CPU)
    assert isinstance(runner.backend._network, torch.jit.ScriptModule)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        assert torch.allclose(runner.backend.forward(x), network(x), atol=1e-5)
    assert runner.warmup() > 0
