"""Scanning a model repository: models/<name>/<version>/model.yaml, and MONAI bundles.

A version that fails to parse is reported (with the reason) and skipped; it never stops the others.

What a repository (``--models DIR``) may hold, and how each version is named (:func:`discover`):

* ``<name>/<version>/model.yaml`` (+ weights): model.yaml's ``name`` must equal ``<name>``;
* ``<name>/<version>/configs/metadata.json`` ...: a MONAI bundle dropped in as a version of ``<name>``;
* ``<dir>/configs/metadata.json`` ...: a MONAI bundle as the zoo ships it; its name and version come from its
  metadata (:func:`inference.modelrepo.bundle.bundle_identity`).

``radserve models load DIR`` takes a version directory, a model directory (all its versions) or a bundle
directory (:func:`sources_at`); a relative DIR is taken relative to the repository.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from inference.modelrepo import bundle
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
    """Parse every version of the repository (model.yaml and bundles); builds no network."""
    configs: list[ModelConfig] = []
    failures: dict[str, str] = {}
    for source in discover(root):
        try:
            configs.append(source.load_config())
        except (OSError, ValueError, TypeError, KeyError) as exc:
            logger.error("model %s not loaded: %s", source.key, exc)
            failures[source.key] = str(exc)
    return ScanResult(configs, failures)


# -- version sources: what the registry loads and the watcher polls ------------------------------------------

YAML = "yaml"
BUNDLE = "bundle"


@dataclass(frozen=True)
class VersionSource:
    """One loadable model version on disk: a model.yaml version directory or a MONAI bundle directory."""

    name: str
    version: str
    path: Path  # the version directory, or the bundle directory
    kind: str  # YAML | BUNDLE
    # model.yaml must name the model like the directory above it (the repository layout).
    expect_name: bool = False

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"

    def files(self) -> list[Path]:
        """The files that define this version; a change to any of them (or one appearing) means a reload."""
        if self.kind == BUNDLE:
            return list(bundle.iter_bundle_files(self.path))
        return [self.path / "model.yaml", self.path / _yaml_weights(self.path)]

    def signature(self) -> tuple:
        """Cheap change detection: (file, size, mtime_ns) per file, None for a missing one."""
        out = []
        for path in self.files():
            try:
                stat = path.stat()
            except OSError:
                out.append((path.name, None, None))
                continue
            out.append((str(path.relative_to(self.path)), stat.st_size, stat.st_mtime_ns))
        return tuple(out)

    def digest(self) -> tuple[str, str]:
        """(sha256 over all files, sha256 of the weights file or ""): tells a real change from a touch."""
        total = hashlib.sha256()
        weights_sha = ""
        weights = self.weights_path()
        for path in self.files():
            total.update(str(path.relative_to(self.path)).encode() + b"\0")
            if not path.is_file():
                total.update(b"missing\0")
                continue
            h = _sha256(path)
            total.update(h.encode())
            if weights is not None and path == weights:
                weights_sha = h
        return total.hexdigest(), weights_sha

    def weights_path(self) -> Path | None:
        if self.kind == BUNDLE:
            return bundle.weights_file(self.path)
        return self.path / _yaml_weights(self.path)

    def load_config(self) -> ModelConfig:
        """Parse and validate (ValueError/OSError say what is wrong); for a bundle, map it (nothing is built)."""
        if self.kind == BUNDLE:
            return bundle.load_bundle(self.path, name=self.name, version=self.version)
        config = ModelConfig.from_yaml(self.path / "model.yaml")
        if self.expect_name and config.name != self.name:
            raise ValueError(f"model.yaml names {config.name!r} but lives in {self.name!r}/")
        if not config.weights_path.is_file():
            raise ValueError(f"weights file {config.network.weights!r} is missing")
        return config


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load((path / "model.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _yaml_weights(path: Path) -> str:
    network = _read_yaml(path).get("network")
    weights = network.get("weights") if isinstance(network, dict) else None
    return str(weights) if isinstance(weights, str) and weights else "model.pt"


def _visible_dirs(path: Path) -> Iterable[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def _version_source(model_dir: Path, version_dir: Path) -> VersionSource | None:
    if (version_dir / "model.yaml").is_file():
        return VersionSource(model_dir.name, version_dir.name, version_dir, YAML, expect_name=True)
    if bundle.is_bundle(version_dir):
        return VersionSource(model_dir.name, version_dir.name, version_dir, BUNDLE)
    return None


def _bundle_source(path: Path) -> VersionSource:
    name, version = bundle.bundle_identity(path)
    return VersionSource(name, version, path, BUNDLE)


def discover(root: Path) -> list[VersionSource]:
    """Every version in the repository (see the module docstring), in name order; nothing is parsed but names."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise ValueError(f"model repository {str(root)!r} is not a directory")
    found: dict[str, VersionSource] = {}
    for model_dir in _visible_dirs(root):
        candidates = (
            [_bundle_source(model_dir)]
            if bundle.is_bundle(model_dir)
            else [_version_source(model_dir, v) for v in _visible_dirs(model_dir)]
        )
        for source in candidates:
            if source is None:
                continue
            if source.key in found:
                logger.warning(
                    "%s and %s both hold model %s; using the first", found[source.key].path, source.path, source.key
                )
                continue
            found[source.key] = source
    return list(found.values())


def sources_at(path: Path, repository: Path | None = None) -> list[VersionSource]:
    """The versions a ``radserve models load DIR`` means: DIR is a version directory (model.yaml), a MONAI
    bundle, or a model directory (each version below it). A relative DIR is relative to ``repository``.

    Raises FileNotFoundError when DIR does not exist, ValueError when it holds no model.
    """
    path = Path(path)
    if not path.is_absolute() and repository is not None:
        path = Path(repository) / path
    path = path.resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist on the server")
    in_repository = repository is not None and path.parent.parent == Path(repository).resolve()
    if (path / "model.yaml").is_file():
        name = _read_yaml(path).get("name")
        name = name if isinstance(name, str) and name else path.parent.name
        return [VersionSource(name, path.name, path, YAML, expect_name=in_repository)]
    if bundle.is_bundle(path):
        if in_repository:
            return [VersionSource(path.parent.name, path.name, path, BUNDLE)]
        return [_bundle_source(path)]
    sources = [s for s in (_version_source(path, v) for v in _visible_dirs(path)) if s is not None]
    if not sources:
        raise ValueError(
            f"{str(path)!r} holds no model.yaml, MONAI bundle (configs/metadata.json) or version directories"
        )
    return sources
