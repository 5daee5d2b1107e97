"""MONAI bundles (model-zoo layout) as models: mapping, the trust boundary, and a real server loading one.

The bundles are written here, in the layout and with the architectures of the zoo's spleen_ct_segmentation and
lung_nodule_ct_detection (random weights of the right shapes: nothing is downloaded). The published lung
detector (RetinaNet over ResNet50 + a 256-channel FPN) is mapped but not built: on a CPU it is too slow for a
test; a reduced variant of the same config structure is built and run instead.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.cli import main as cli_main
from inference.client import ReadingClient
from inference.modelrepo.bundle import load_bundle
from inference.modelrepo.registry import build_runner, task_class
from inference.modelrepo.schema import BUNDLE_NETWORK_TARGET, ModelConfig
from inference.phantoms import make_chest_ct
from inference.serverproc import ServerProcess
from inference.tasks.detection import DetectionTask
from inference.tasks.segmentation import SegmentationTask

ROOT = Path(__file__).resolve().parents[2]
LUNG = ROOT / "models" / "lung_nodule_ct" / "1"
CPU = torch.device("cpu")

# Expressions a bundle may carry that radserve must never run (it only builds network_def).
TRAPS = {
    "initialize": ["$open(@bundle_root + '/PWNED_initialize', 'w').write('x')"],
    "run": ["$open(@bundle_root + '/PWNED_run', 'w').write('x')"],
    "evaluating": ["$open(@bundle_root + '/PWNED_evaluating', 'w').write('x')"],
}

SPLEEN_METADATA = {
    "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
    "version": "0.5.3",
    "monai_version": "1.3.0",
    "name": "Spleen CT segmentation",
    "task": "Decathlon spleen segmentation",
    "description": "A pre-trained model for volumetric (3D) segmentation of the spleen from CT image",
    "network_data_format": {
        "inputs": {
            "image": {
                "type": "image",
                "format": "hounsfield",
                "modality": "CT",
                "num_channels": 1,
                "spatial_shape": [96, 96, 96],
                "dtype": "float32",
                "value_range": [0, 1],
                "is_patch_data": True,
                "channel_def": {"0": "image"},
            }
        },
        "outputs": {
            "pred": {
                "type": "image",
                "format": "segmentation",
                "num_channels": 2,
                "spatial_shape": [96, 96, 96],
                "dtype": "float32",
                "value_range": [0, 1],
                "is_patch_data": True,
                "channel_def": {"0": "background", "1": "spleen"},
            }
        },
    },
}

SPLEEN_INFERENCE = {
    "imports": ["$import glob", "$import os"],
    "bundle_root": ".",
    "output_dir": "$@bundle_root + '/eval'",
    "dataset_dir": "/workspace/data/Task09_Spleen",
    "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
    "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "network_def": {
        "_target_": "UNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 2,
        "channels": [16, 32, 64, 128, 256],
        "strides": [2, 2, 2, 2],
        "num_res_units": 2,
        "norm": "batch",
    },
    "network": "$@network_def.to(@device)",
    "preprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"},
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "image",
                "a_min": -57,
                "a_max": 164,
                "b_min": 0,
                "b_max": 1,
                "clip": True,
            },
            {"_target_": "EnsureTyped", "keys": "image"},
        ],
    },
    "dataset": {
        "_target_": "Dataset",
        "data": "$[{'image': i} for i in @datalist]",
        "transform": "@preprocessing",
    },
    "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "num_workers": 4},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [96, 96, 96], "sw_batch_size": 4, "overlap": 0.5},
    "postprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        ],
    },
    "evaluator": {
        "_target_": "SupervisedEvaluator",
        "device": "@device",
        "val_data_loader": "@dataloader",
        "network": "@network",
        "inferer": "@inferer",
        "postprocessing": "@postprocessing",
    },
    **TRAPS,
}

LUNG_METADATA = {
    "version": "0.6.5",
    "name": "Lung nodule CT detection",
    "description": "A pre-trained model for volumetric (3D) detection of the lung lesion from CT image",
    "network_data_format": {
        "inputs": {
            "image": {
                "type": "image",
                "format": "magnitude",
                "modality": "CT",
                "num_channels": 1,
                "spatial_shape": [192, 192, 80],
                "is_patch_data": True,
                "channel_def": {"0": "image"},
            }
        },
        "outputs": {
            "box": {"type": "object", "format": "bounding box", "num_channels": 6},
            "label": {"type": "object", "format": "label", "num_channels": 1, "channel_def": {"0": "nodule"}},
        },
    },
}

# The published configs/inference.json structure of lung_nodule_ct_detection (ResNet50 backbone).
LUNG_INFERENCE = {
    "whether_raw_luna16": False,
    "whether_resampled_luna16": "$(not @whether_raw_luna16)",
    "imports": ["$import numpy"],
    "bundle_root": ".",
    "image_key": "image",
    "ckpt_dir": "$@bundle_root + '/models'",
    "dataset_dir": "/datasets/LUNA16_Images_resample",
    "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "amp": True,
    "spatial_dims": 3,
    "num_classes": 1,
    "size_divisible": [16, 16, 8],
    "infer_patch_size": [512, 512, 192],
    "anchor_generator": {
        "_target_": "monai.apps.detection.utils.anchor_utils.AnchorGeneratorWithAnchorShape",
        "feature_map_scales": [1, 2, 4],
        "base_anchor_shapes": [[6, 8, 4], [8, 6, 5], [10, 10, 6]],
    },
    "backbone": "$monai.networks.nets.resnet.resnet50(spatial_dims=3,n_input_channels=1,conv1_t_stride=[2,2,1],"
    "conv1_t_size=[7,7,7])",
    "feature_extractor": "$monai.apps.detection.networks.retinanet_network.resnet_fpn_feature_extractor(@backbone,3,"
    "False,[1,2],None)",
    "network_def": {
        "_target_": "RetinaNet",
        "spatial_dims": "@spatial_dims",
        "num_classes": "@num_classes",
        "num_anchors": 3,
        "feature_extractor": "@feature_extractor",
        "size_divisible": "@size_divisible",
    },
    "network": "$@network_def.to(@device)",
    "detector": {
        "_target_": "RetinaNetDetector",
        "network": "@network",
        "anchor_generator": "@anchor_generator",
        "debug": False,
        "spatial_dims": "@spatial_dims",
        "num_classes": "@num_classes",
        "size_divisible": "@size_divisible",
    },
    "detector_ops": [
        "$@detector.set_target_keys(box_key='box', label_key='label')",
        "$@detector.set_box_selector_parameters(score_thresh=0.02,topk_candidates_per_level=1000,nms_thresh=0.22,"
        "detections_per_img=300)",
        "$@detector.set_sliding_window_inferer(roi_size=@infer_patch_size,overlap=0.25,sw_batch_size=1,"
        "mode='constant',device='cpu')",
    ],
    "preprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "@image_key", "_disabled_": "@whether_raw_luna16"},
            {
                "_target_": "LoadImaged",
                "keys": "@image_key",
                "reader": "itkreader",
                "affine_lps_to_ras": True,
                "_disabled_": "@whether_resampled_luna16",
            },
            {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
            {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
            {
                "_target_": "Spacingd",
                "keys": ["image"],
                "pixdim": [0.703125, 0.703125, 1.25],
                "padding_mode": "border",
                "_disabled_": "@whether_resampled_luna16",
            },
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "@image_key",
                "a_min": -1024.0,
                "a_max": 300.0,
                "b_min": 0.0,
                "b_max": 1.0,
                "clip": True,
            },
            {"_target_": "EnsureTyped", "keys": "@image_key"},
        ],
    },
    "inferer": {
        "_target_": "scripts.detection_inferer.RetinaNetInferer",
        "detector": "@detector",
        "force_sliding_window": False,
    },
    **TRAPS,
}


def write_bundle(directory: Path, metadata: dict, inference: dict, state_dict: dict | None = None) -> Path:
    (directory / "configs").mkdir(parents=True)
    (directory / "models").mkdir()
    (directory / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    (directory / "configs" / "inference.json").write_text(json.dumps(inference, indent=2))
    if state_dict is not None:
        torch.save(state_dict, directory / "models" / "model.pt")
    return directory


def spleen_unet_state_dict(seed: int = 0) -> dict:
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    args = {k: v for k, v in SPLEEN_INFERENCE["network_def"].items() if k != "_target_"}
    return UNet(**args).state_dict()


def write_spleen_bundle(directory: Path) -> Path:
    return write_bundle(directory, SPLEEN_METADATA, SPLEEN_INFERENCE, spleen_unet_state_dict())


def reduced_lung_inference() -> dict:
    """The published structure, with a thin ResNet and a 16-channel FPN instead of ResNet50 and 256 channels."""
    config = copy.deepcopy(LUNG_INFERENCE)
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


def assert_no_trap_ran(directory: Path) -> None:
    assert not list(directory.glob("PWNED*")), "an initialize/run/evaluating expression of the bundle was run"


def test_spleen_bundle_maps_to_a_segmentation_model(tmp_path):
    bundle = write_spleen_bundle(tmp_path / "spleen_ct_segmentation")
    config = load_bundle(bundle)
    assert (config.name, config.version, config.task) == ("spleen_ct_segmentation", "0.5.3", "segmentation")
    assert config.modalities == ("CT",) and config.labels == ("spleen",)
    pre = config.preprocessing
    assert pre.spacing_mm == (1.5, 1.5, 2.0) and (pre.a_min, pre.a_max, pre.b_min, pre.b_max) == (-57, 164, 0, 1)
    assert pre.clip and pre.normalize == "window"
    assert config.inferer.roi_size == (96, 96, 96) and config.inferer.overlap == 0.5
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
    assert_no_trap_ran(bundle)


def test_published_lung_nodule_detection_config_maps_without_building_the_network(tmp_path):
    bundle = write_bundle(tmp_path / "lung_nodule_ct_detection", LUNG_METADATA, LUNG_INFERENCE, {})
    config = load_bundle(bundle)
    assert (config.name, config.version, config.task) == ("lung_nodule_ct_detection", "0.6.5", "detection")
    assert config.modalities == ("CT",) and config.labels == ("nodule",)
    # Its Spacingd is disabled for pre-resampled LUNA16 data; radserve resamples to that spacing itself.
    assert config.preprocessing.spacing_mm == (0.703125, 0.703125, 1.25)
    assert (config.preprocessing.a_min, config.preprocessing.a_max) == (-1024.0, 300.0)
    assert config.inferer.roi_size == (512, 512, 192) and config.inferer.overlap == 0.25
    assert config.detector.feature_map_scales == (1, 2, 4)
    assert config.detector.base_anchor_shapes == ((6, 8, 4), (8, 6, 5), (10, 10, 6))
    assert config.detector.size_divisible == (16, 16, 8)
    assert config.postprocessing.nms_iou == 0.22 and config.batching.max_batch_size == 1
    assert config.network.args["num_classes"] == 1 and config.network.args["in_channels"] == 1
    assert issubclass(task_class(config), DetectionTask)
    assert_no_trap_ran(bundle)


def test_reduced_lung_detection_bundle_builds_and_runs_through_the_detection_task(tmp_path):
    from monai.bundle import ConfigParser

    parser = ConfigParser(reduced_lung_inference())
    torch.manual_seed(0)
    state = parser.get_parsed_content("network_def").state_dict()
    bundle = write_bundle(tmp_path / "lung_small", LUNG_METADATA, reduced_lung_inference(), state)
    config = load_bundle(bundle)
    runner = build_runner(config, CPU)
    assert type(runner.backend._network).__name__ == "RetinaNet"
    assert sum(p.numel() for p in runner.backend._network.parameters()) < 500_000
    assert runner.warmup() > 0  # one forward on a (1, 32, 32, 16) patch, decoded by the DetectionTask
    assert_no_trap_ran(bundle)


def test_bundle_errors_name_what_is_wrong(tmp_path):
    inference = copy.deepcopy(SPLEEN_INFERENCE)
    inference["preprocessing"]["transforms"].insert(3, {"_target_": "CropForegroundd", "keys": "image"})
    bundle = write_bundle(tmp_path / "a", SPLEEN_METADATA, inference, spleen_unet_state_dict())
    with pytest.raises(ValueError, match=r"\['CropForegroundd'\] are not supported"):
        load_bundle(bundle)
    with pytest.raises(ValueError, match=r"models/model\.pt .* are missing"):
        load_bundle(write_bundle(tmp_path / "b", SPLEEN_METADATA, SPLEEN_INFERENCE))
    wrong = write_bundle(tmp_path / "c", SPLEEN_METADATA, SPLEEN_INFERENCE, {"model.0.conv.weight": torch.zeros(1)})
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


@pytest.fixture(scope="module")
def bundle_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    write_lung_copy(repo)
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    proc = ServerProcess(models=repo, log_path=log_path, extra_args=["--model-poll-interval-s", "0"])
    proc.env["RADSERVE_WARMUP"] = "0"
    proc.env["RADSERVE_METRICS_PORT"] = "0"
    proc.start()
    yield proc
    proc.stop()


def test_spleen_bundle_loads_with_radserve_models_load_and_reads_a_ct(bundle_server, tmp_path, capsys):
    bundle = write_spleen_bundle(tmp_path / "spleen_ct_segmentation")
    assert cli_main(["models", "load", str(bundle), "--server", bundle_server.target]) == 0
    assert "spleen_ct_segmentation" in capsys.readouterr().out
    phantom = make_chest_ct(np.random.default_rng(3), shape=(96, 96, 40), pixel_spacing_mm=1.5, slice_spacing_mm=2.5)
    volume = phantom.volume
    raw = pb.RawArray(dtype="float32", shape=volume.shape, affine=volume.affine.ravel().tolist())
    client = ReadingClient(bundle_server.target)
    try:
        listing = {m.name: m for m in client.list_models().models}
        spleen = listing["spleen_ct_segmentation"]
        assert spleen.task == "segmentation" and list(spleen.labels) == ["spleen"]
        assert [(v.version, v.state, v.state_code) for v in spleen.versions] == [
            ("0.5.3", "READY", pb.VERSION_STATE_READY)
        ]
        response = client.read(
            [volume.voxels.astype(np.float32).tobytes()],
            payload_kind=pb.RAW,
            raw=raw,
            model="spleen_ct_segmentation",
            timeout_s=300,
        )
        assert (response.model, response.model_version) == ("spleen_ct_segmentation", "0.5.3")
        assert all(f.label == "spleen" for f in response.findings)
        # A read naming no model still goes to the CT default, lung_nodule_ct.
        assert client.list_models().default_models["CT"] == "lung_nodule_ct:1"
    finally:
        client.close()
    assert cli_main(["models", "unload", "spleen_ct_segmentation", "--server", bundle_server.target]) == 0
    assert cli_main(["models", "unload", "spleen_ct_segmentation", "--server", bundle_server.target]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert_no_trap_ran(bundle)


@pytest.mark.filterwarnings("ignore:Converting a tensor to a Python boolean")  # tracing the tiny UNet
def test_torchscript_bundle_loads_its_program_and_weights_from_model_ts(tmp_path):
    from monai.networks.nets import UNet

    inference = copy.deepcopy(SPLEEN_INFERENCE)
    inference["network_def"].update(channels=[4, 8], strides=[2], num_res_units=0)
    inference["inferer"]["roi_size"] = [16, 16, 16]
    bundle = write_bundle(tmp_path / "spleen_ts", SPLEEN_METADATA, inference)
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
