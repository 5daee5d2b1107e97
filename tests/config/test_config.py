"""Typed configuration: precedence (defaults < YAML < env < CLI) and bounds with values quoted."""

from __future__ import annotations

from pathlib import Path

import pytest

from inference.config import ServerConfig, load_config
from inference.modelrepo.schema import BatchingConfig, ModelConfig

ROOT = Path(__file__).resolve().parents[2]


def test_precedence_yaml_then_env_then_cli(tmp_path):
    config_file = tmp_path / "radserve.yaml"
    config_file.write_text("port: 6000\nhost: 0.0.0.0\ngrace_s: 5\nlimits:\n  max_files: 10\n")
    env = {"RADSERVE_PORT": "6001", "RADSERVE_LIMITS_MAX_FILES": "20", "HOME": "/x"}
    config = load_config({"port": 6002, "host": None}, config_file=config_file, environ=env)
    assert config.port == 6002  # CLI beats env beats YAML
    assert config.host == "0.0.0.0"  # YAML, since the CLI left it unset
    assert config.grace_s == 5.0
    assert config.limits.max_files == 20  # env beats YAML


@pytest.mark.parametrize(
    ("kwargs", "quoted"),
    [
        ({"port": 70000}, "70000"),
        ({"device": "tpu"}, "'tpu'"),
        ({"max_message_bytes": 1024}, "1024"),
        ({"output_chunk_bytes": 512}, "512"),
        ({"output_chunk_bytes": 8 * 1024 * 1024}, "8388608"),
    ],
)
def test_bounds_are_checked_and_the_value_quoted(kwargs, quoted):
    with pytest.raises(ValueError, match=quoted):
        ServerConfig(**kwargs)


def test_unknown_yaml_setting_is_named(tmp_path):
    config_file = tmp_path / "radserve.yaml"
    config_file.write_text("prot: 1\n")
    with pytest.raises(ValueError, match="prot"):
        load_config({}, config_file=config_file, environ={})


def test_bundled_model_yaml_validates():
    config = ModelConfig.from_yaml(ROOT / "models" / "lung_nodule_ct" / "1" / "model.yaml")
    assert config.name == "lung_nodule_ct" and config.task == "detection" and config.modalities == ("CT",)
    assert config.weights_path.is_file()


def test_model_yaml_errors_name_the_key():
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchingConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="not allowed"):
        ModelConfig.from_dict(
            {
                "name": "m",
                "task": "detection",
                "modalities": ["CT"],
                "labels": ["x"],
                "network": {"target": "os.system"},
            },
            version="1",
        )
    with pytest.raises(ValueError, match="unknown keys"):
        ModelConfig.from_dict({"name": "m", "colour": "red"}, version="1")
