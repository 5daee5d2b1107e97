"""Server configuration: one typed object filled from defaults < YAML file < environment < CLI flags.

Environment variables are ``RADSERVE_<FIELD>`` in upper case (``RADSERVE_PORT=50052``); nested limits
are ``RADSERVE_LIMITS_<FIELD>``. Every bound is checked at construction and a violation raises
ValueError quoting the value.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from inference.io.limits import InputLimits
from inference.platform import DEVICES

MiB = 1024 * 1024
ENV_PREFIX = "RADSERVE_"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    models: Path = Path("models")
    device: str = "auto"
    backend: str = "torch"
    # Largest single gRPC message either way; a 4 MiB chunk plus framing always fits.
    max_message_bytes: int = 64 * MiB
    # SIGTERM: reads in flight get this long to finish before the server stops.
    grace_s: float = 30.0
    # Worker threads for decoding and preprocessing (the forward pass has one thread per model).
    io_threads: int = 2
    warmup: bool = True
    log_level: str = "INFO"
    limits: InputLimits = field(default_factory=InputLimits)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port!r}")
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be one of {DEVICES} or 'cuda:N', got {self.device!r}")
        if self.backend not in ("torch",):
            raise ValueError(f"backend must be 'torch', got {self.backend!r}")
        if self.max_message_bytes < 5 * MiB:
            raise ValueError(f"max_message_bytes must be >= {5 * MiB} (a 4 MiB chunk), got {self.max_message_bytes!r}")
        if self.grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s!r}")
        if self.io_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {self.io_threads!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _coerce(cls: type, name: str, raw: Any) -> Any:
    """Convert a YAML/env/CLI value to the type of field ``name`` of dataclass ``cls``."""
    default = next(f for f in dataclasses.fields(cls) if f.name == name)
    kind = type(getattr(cls(), name)) if default.default is dataclasses.MISSING else type(default.default)
    if isinstance(raw, kind):
        return raw
    if kind is bool:
        text = str(raw).strip().lower()
        if text not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(f"{name} must be a boolean, got {raw!r}")
        return text in ("1", "true", "yes", "on")
    try:
        return Path(raw) if issubclass(kind, Path) else kind(raw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be {kind.__name__}, got {raw!r}") from exc


def _merge(cls: type, values: Mapping[str, Any], source: str) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown settings {unknown}; known are {sorted(known)}")
    return {k: _coerce(cls, k, v) for k, v in values.items() if k != "limits"}


def load_config(
    cli: Mapping[str, Any] | None = None,
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServerConfig:
    """Build the ServerConfig: defaults < ``config_file`` (YAML) < environment < ``cli`` (None values skipped)."""
    environ = os.environ if environ is None else environ
    top: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if config_file is not None:
        data = yaml.safe_load(Path(config_file).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{config_file}: the configuration must be a mapping")
        limits.update(_merge(InputLimits, data.get("limits") or {}, f"{config_file}: limits"))
        top.update(_merge(ServerConfig, data, str(config_file)))
    limit_fields = {f.name for f in dataclasses.fields(InputLimits)}
    top_fields = {f.name for f in dataclasses.fields(ServerConfig)} - {"limits"}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name.startswith("limits_") and name[len("limits_") :] in limit_fields:
            limits[name[len("limits_") :]] = _coerce(InputLimits, name[len("limits_") :], value)
        elif name in top_fields:
            top[name] = _coerce(ServerConfig, name, value)
    for key, value in (cli or {}).items():
        if value is not None:
            top[key] = _coerce(ServerConfig, key, value)
    return ServerConfig(limits=InputLimits(**limits), **top)
