"""Scanning a model repository: models/<name>/<version>/model.yaml.

A version that fails to parse is reported (with the reason) and skipped; it never stops the others.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from inference.modelrepo.schema import ModelConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScanResult:
    configs: list[ModelConfig]
    failures: dict[str, str]  # "name:version" -> reason


def version_key(version: str) -> tuple:
    """Natural order: "2" < "10", "1.2" < "1.10"; a read without a version takes the largest."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"[.\-_]", version))


def scan_repository(root: Path) -> ScanResult:
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"model repository {str(root)!r} is not a directory")
    configs: list[ModelConfig] = []
    failures: dict[str, str] = {}
    for yaml_path in sorted(root.glob("*/*/model.yaml")):
        key = f"{yaml_path.parent.parent.name}:{yaml_path.parent.name}"
        try:
            config = ModelConfig.from_yaml(yaml_path)
            if config.name != yaml_path.parent.parent.name:
                raise ValueError(f"model.yaml names {config.name!r} but lives in {yaml_path.parent.parent.name!r}/")
            if not config.weights_path.is_file():
                raise ValueError(f"weights file {config.network.weights!r} is missing")
        except (OSError, ValueError, TypeError) as exc:
            logger.error("model %s not loaded: %s", key, exc)
            failures[key] = str(exc)
            continue
        configs.append(config)
    return ScanResult(configs, failures)
