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
from inference.modelrepo.schema import MODALITIES
from inference.platform import DEVICES

MiB = 1024 * 1024
ENV_PREFIX = "RADSERVE_"
# Which model reads a study that names none (ServerConfig.default_models).
DEFAULT_MODELS = {"CT": "lung_nodule_ct", "MR": "brain_lesion_mr", "CR": "chest_xray", "DX": "chest_xray"}


TRITON_SHARED_MEMORY = ("auto", "on", "off")


def cli_flag(help: str, **options: Any) -> dict[str, Any]:
    """Field metadata: ``radserve serve`` has a flag for this setting, with ``help``. The flag is ``--field-name``
    (``options["flag"]`` overrides it), typed as the field's default; a bool is ``--name/--no-name`` unless
    ``action="store_true"``. Other ``options``: ``choices``, ``metavar``, ``action="append"`` (values joined by
    commas, as the environment gives them)."""
    return {"cli": {"help": help, **options}}


@dataclass(frozen=True)
class CliSetting:
    """A setting with a ``radserve serve`` flag: its key in :func:`load_config`'s ``cli`` mapping, type and flag."""

    key: str  # "port"; "triton_url" for TritonConfig.url
    kind: type
    flag: str
    options: dict[str, Any]


def cli_settings() -> list[CliSetting]:
    """The settings ``radserve serve`` has flags for, from the dataclasses' field metadata (:func:`cli_flag`)."""
    settings = []
    for cls, prefix in ((ServerConfig, ""), (TritonConfig, "triton_")):
        defaults = cls()
        for f in dataclasses.fields(cls):
            if "cli" not in f.metadata:
                continue
            options = dict(f.metadata["cli"])
            key = prefix + f.name
            flag = options.pop("flag", "--" + key.replace("_", "-"))
            settings.append(CliSetting(key, type(getattr(defaults, f.name)), flag, options))
    return settings


@dataclass(frozen=True)
class TritonConfig:
    """The Triton backend (``backend: triton``; README "Scale out with Triton"). YAML: a ``triton:`` mapping;
    environment ``RADSERVE_TRITON_<FIELD>``; CLI ``--triton-url``."""

    # Triton's gRPC endpoint, HOST:PORT
    url: str = field(
        default="127.0.0.1:8001", metadata=cli_flag("HOST:PORT of Triton's gRPC endpoint (default 127.0.0.1:8001)")
    )
    # Readiness, config and shared-memory calls; also how long a dead Triton can delay a health check.
    connect_timeout_s: float = 2.0
    # One inference call (a batch of at most max_batch_size items); the read's own deadline also applies.
    request_timeout_s: float = 120.0
    # Extra attempts of a batch when Triton is unreachable or the model not ready, before the reads of the
    # batch fail with UNAVAILABLE; waits retry_backoff_s, doubled after each attempt.
    retries: int = 2
    retry_backoff_s: float = 0.25
    # Inputs through system shared memory: auto = when the URL is a loopback address (same host).
    shared_memory: str = "auto"
    # How often the server checks that Triton and each model are ready (health follows).
    health_poll_s: float = 1.0

    def __post_init__(self) -> None:
        host, sep, port = self.url.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ValueError(f"triton.url must be HOST:PORT, got {self.url!r}")
        for name in ("connect_timeout_s", "request_timeout_s", "health_poll_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"triton.{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.retries <= 10:
            raise ValueError(f"triton.retries must be in [0, 10], got {self.retries!r}")
        if not 0 <= self.retry_backoff_s <= 60:
            raise ValueError(f"triton.retry_backoff_s must be in [0, 60], got {self.retry_backoff_s!r}")
        if self.shared_memory not in TRITON_SHARED_MEMORY:
            raise ValueError(f"triton.shared_memory must be one of {TRITON_SHARED_MEMORY}, got {self.shared_memory!r}")


@dataclass(frozen=True)
class PromotionPolicy:
    """The promotion guard's settings (inference.serving.promotion), from ServerConfig's ``promotion_*``."""

    min_shadow_reads: int = 5
    min_agreement: float = 0.9
    eval_datasets: Mapping[str, Path] = field(default_factory=dict)
    max_sensitivity_drop: float = 0.05
    max_fp_per_study_increase: float = 0.25

    def __post_init__(self) -> None:
        if not 0 <= self.min_shadow_reads <= 1_000_000:
            raise ValueError(f"promotion_min_shadow_reads must be in [0, 1000000], got {self.min_shadow_reads!r}")
        for name in ("min_agreement", "max_sensitivity_drop"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"promotion_{name} must be in [0, 1], got {value!r}")
        if not 0.0 <= self.max_fp_per_study_increase <= 1000.0:
            raise ValueError(
                f"promotion_max_fp_per_study_increase must be in [0, 1000], got {self.max_fp_per_study_increase!r}"
            )


@dataclass(frozen=True)
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata=cli_flag("address to bind (default 127.0.0.1)"))
    port: int = field(default=50051, metadata=cli_flag("port (default 50051; 0 picks a free one)"))
    models: Path = field(default=Path("models"), metadata=cli_flag("model repository (default ./models)"))
    device: str = field(default="auto", metadata=cli_flag("auto|cpu|cuda (default auto)"))
    # torch | triton: where networks run (model.yaml `backend:` overrides per model)
    backend: str = field(
        default="torch",
        metadata=cli_flag(
            "where networks run: in this process (torch, default) or on a Triton Inference Server (triton)",
            choices=["torch", "triton"],
        ),
    )
    triton: TritonConfig = field(default_factory=TritonConfig)
    # Largest single gRPC message either way; a 4 MiB chunk plus framing always fits. A Read whose response
    # (findings + DICOM SR + DICOM SEG) is larger fails with RESOURCE_EXHAUSTED naming ReadStreamed.
    max_message_bytes: int = 64 * MiB
    # ReadStreamed sends each DICOM output (SR, SEG) in chunks of at most this many bytes (4 MiB, like uploads;
    # lower it to test reassembly with small objects).
    output_chunk_bytes: int = 4 * MiB
    # SIGTERM: reads in flight get this long to finish before the server stops.
    grace_s: float = field(default=30.0, metadata=cli_flag("drain time on SIGTERM (default 30)"))
    # Worker threads for decoding and preprocessing (the forward pass has one thread per model).
    io_threads: int = 2
    warmup: bool = True
    log_level: str = field(default="INFO", metadata=cli_flag("DEBUG|INFO|WARNING|ERROR"))
    # text | json (one object per line: ts, level, logger, request_id, msg)
    log_format: str = field(default="text", metadata=cli_flag("log lines (default text)", choices=["text", "json"]))
    limits: InputLimits = field(default_factory=InputLimits)
    # Admission (inference/api/admission.py; README "Limits"): reads being computed (decoded, preprocessed, run);
    # a read beyond them gets UNAVAILABLE, before its payload is received when they are all taken. Reads receiving
    # their payload are counted apart (max_uploads), so slow uploads cannot take compute slots, and each client
    # (its tenant with --auth-tokens, else its IP address) may have max_reads_per_client reads in progress.
    max_in_flight: int = field(default=64, metadata=cli_flag("reads in flight before UNAVAILABLE (64)"))
    max_uploads: int = 256
    max_reads_per_client: int = field(
        default=128,
        metadata=cli_flag("reads one tenant (or, without tokens, one IP address) may have in progress (128)"),
    )
    # Reads are admitted by their estimated peak memory against this budget (GB; 0: half the machine's or the
    # container's memory); one that does not fit waits up to its deadline or max_admission_wait_s (then UNAVAILABLE),
    # one larger than the whole budget gets RESOURCE_EXHAUSTED. Uploaded bytes count as they arrive.
    memory_budget_gb: float = field(
        default=0.0,
        metadata=cli_flag(
            "admit reads by their estimated peak memory within this budget (default: half the machine's memory)"
        ),
    )
    max_admission_wait_s: float = 120.0
    # The receive deadline (inference/api/upload.py ReceivePolicy): the first chunk within
    # upload_first_chunk_timeout_s, then at least upload_min_bytes_per_s on average after upload_rate_grace_s.
    upload_first_chunk_timeout_s: float = field(
        default=30.0,
        metadata=cli_flag(
            "a Read whose first payload chunk has not arrived by then gets DEADLINE_EXCEEDED (default 30)"
        ),
    )
    upload_min_bytes_per_s: float = field(
        default=16 * 1024, metadata=cli_flag("slowest average upload accepted after the first 30 s (default 16384)")
    )
    upload_rate_grace_s: float = 30.0
    # Streamed DICOM and NIfTI payloads are decoded in this many worker processes (0: in the I/O threads), killed
    # and replaced when a decode runs past decode_timeout_s (RESOURCE_EXHAUSTED) or its read is cancelled.
    decode_workers: int = field(
        default=2,
        metadata=cli_flag(
            "processes decoding DICOM and NIfTI uploads, replaced when a decode hangs (2; 0: decode in threads)"
        ),
    )
    decode_timeout_s: float = field(
        default=120.0, metadata=cli_flag("a decode running longer is stopped (default 120)")
    )
    # Health turns NOT_SERVING while every I/O thread (or every decode worker) has been on one job for longer than
    # this, and SERVING again once one is free: a probe takes a wedged server out of rotation.
    stall_timeout_s: float = 180.0
    # A work item that runs out of GPU memory even alone is run on a CPU copy of the network.
    oom_cpu_fallback: bool = field(
        default=True, metadata=cli_flag("run a work item that exhausts GPU memory on the CPU (default on)")
    )
    # Decode, preprocess and infer a study while it arrives (issue #15; docs/decisions.md, "Progressive reading"):
    # DICOM files as each completes, NIfTI and RAW payloads plane by plane. Off: every read decodes after its last
    # byte (the whole-study path, and the benchmarks' baseline for the progressive rows).
    progressive_reads: bool = field(
        default=True, metadata=cli_flag("decode and read studies while they arrive (default on)")
    )
    # Prometheus metrics at http://HOST:metrics_port/metrics; 0 disables them.
    metrics_port: int = field(default=9464, metadata=cli_flag("Prometheus metrics port (9464; 0: off)"))
    # A second, plaintext gRPC port serving only grpc.health.v1 (0: none; health is always on `port` too), for
    # Kubernetes' native gRPC probes, which cannot speak TLS. It carries no reads and no patient data.
    health_port: int = field(default=0, metadata=cli_flag("plaintext port with gRPC health only, for probes (0: none)"))
    # TLS (PEM files); tls_client_ca turns on mutual TLS. Without TLS the server speaks plaintext, which it
    # accepts on a loopback host only, unless ``insecure`` is set (e.g. behind a TLS-terminating proxy).
    tls_cert: str = field(default="", metadata=cli_flag("server certificate (PEM): serve TLS"))
    tls_key: str = field(default="", metadata=cli_flag("server private key (PEM)"))
    tls_client_ca: str = field(default="", metadata=cli_flag("CA of client certificates: mutual TLS"))
    insecure: bool = field(
        default=False,
        metadata=cli_flag(
            "allow plaintext gRPC on a non-loopback host (e.g. behind a TLS-terminating proxy)", action="store_true"
        ),
    )
    # YAML file of per-tenant bearer tokens (``tenant: token``); empty: no token authentication.
    auth_tokens: str = field(default="", metadata=cli_flag("YAML file of tenant: token (bearer auth)"))
    # Zero-copy ingest (docs/decisions.md, "Zero-copy ingest"): folders under which a read's header may name files
    # for the server to read itself (resolved, symlinks included; empty = disabled), and whether it may name a POSIX
    # shared-memory segment. Environment: RADSERVE_INGEST_ROOTS=/a:/b (os.pathsep-separated),
    # RADSERVE_INGEST_SHARED_MEMORY=1.
    ingest_roots: tuple[Path, ...] = ()
    ingest_shared_memory: bool = False
    # torch.compile every model's network (CUDA only; warmed up before health turns SERVING). model.yaml
    # `compile: true` asks for it per model; this turns it on for all.
    compile: bool = field(
        default=False,
        metadata=cli_flag(
            "torch.compile every model's network, warmed up before SERVING (CUDA only; default off, or per model: "
            "compile: true in model.yaml)"
        ),
    )
    # Model management (README "Models"): seconds between polls of the model repository for new, changed or
    # removed versions (0 disables polling; `radserve models load` still works); whether the LoadModel and
    # UnloadModel RPCs are served (off: PERMISSION_DENIED); and which model reads a study whose request names
    # none, by modality (else the first loaded model, by name, that takes the modality). YAML: a mapping;
    # environment and CLI: "CT=lung_nodule_ct,MR=brain_lesion_mr"; entries override the defaults, and an
    # empty name ("MR=") drops a modality's preference.
    model_poll_interval_s: float = field(
        default=10.0,
        metadata=cli_flag(
            "poll the model repository for new, changed and removed versions this often (default 10; 0: off)"
        ),
    )
    # LoadModel and UnloadModel: served to operators only (a tenant with role: operator in the tokens file; none
    # without one), for paths under model_roots (absolute, no `..`; empty: the repository `models` only).
    allow_model_management: bool = True
    model_roots: tuple[Path, ...] = ()
    default_models: dict[str, str] = field(
        default_factory=lambda: dict(DEFAULT_MODELS),
        metadata=cli_flag(
            "model for studies of MODALITY whose read names none (repeatable; defaults: CT=lung_nodule_ct, "
            "MR=brain_lesion_mr, CR=chest_xray, DX=chest_xray)",
            flag="--default-model",
            action="append",
            metavar="MODALITY=NAME",
        ),
    )
    # Shadow versions and the promotion guard (README "Shadow versions and promotion"; inference.serving.promotion):
    # `radserve models promote` refuses a version with fewer than promotion_min_shadow_reads shadow reads compared
    # (0: no shadow needed) or an agreement below promotion_min_agreement, or one that, on the labelled dataset
    # configured for its model (promotion_eval_datasets: model name -> a `radserve eval` dataset on this server;
    # YAML mapping, or "NAME=DIR,NAME=DIR"), loses more sensitivity or gains more false positives per study than the
    # tolerances against the version serving. shadow_max_pending: shadow reads queued at most (more are skipped).
    promotion_min_shadow_reads: int = 5
    promotion_min_agreement: float = 0.9
    promotion_eval_datasets: dict[str, str] = field(default_factory=dict)
    promotion_max_sensitivity_drop: float = 0.05
    promotion_max_fp_per_study_increase: float = 0.25
    shadow_max_pending: int = 2

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port!r}")
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be one of {DEVICES} or 'cuda:N', got {self.device!r}")
        if self.backend not in ("torch", "triton"):
            raise ValueError(f"backend must be 'torch' or 'triton', got {self.backend!r}")
        if self.max_message_bytes < 5 * MiB:
            raise ValueError(f"max_message_bytes must be >= {5 * MiB} (a 4 MiB chunk), got {self.max_message_bytes!r}")
        if not 1024 <= self.output_chunk_bytes <= 4 * MiB:
            raise ValueError(f"output_chunk_bytes must be in [1024, {4 * MiB}], got {self.output_chunk_bytes!r}")
        if self.grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s!r}")
        if self.io_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {self.io_threads!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be 'text' or 'json', got {self.log_format!r}")
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {self.max_in_flight!r}")
        for name in ("max_uploads", "max_reads_per_client"):
            if not 1 <= getattr(self, name) <= 100_000:
                raise ValueError(f"{name} must be in [1, 100000], got {getattr(self, name)!r}")
        if not 0 <= self.memory_budget_gb <= 1e5:
            raise ValueError(
                f"memory_budget_gb must be in [0, 100000] (0: from the machine), got {self.memory_budget_gb!r}"
            )
        for name in (
            "max_admission_wait_s",
            "decode_timeout_s",
            "stall_timeout_s",
            "upload_first_chunk_timeout_s",
            "upload_rate_grace_s",
        ):
            if not 0 < getattr(self, name) <= 86_400:
                raise ValueError(f"{name} must be in (0, 86400], got {getattr(self, name)!r}")
        if not 0 <= self.upload_min_bytes_per_s <= 1e10:
            raise ValueError(f"upload_min_bytes_per_s must be in [0, 1e10], got {self.upload_min_bytes_per_s!r}")
        if not 0 <= self.decode_workers <= 64:
            raise ValueError(
                f"decode_workers must be in [0, 64] (0: decode in the I/O threads), got {self.decode_workers!r}"
            )
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in [0, 65535] (0 disables metrics), got {self.metrics_port!r}")
        if self.metrics_port and self.metrics_port == self.port:
            raise ValueError(f"metrics_port must differ from port, both are {self.port!r}")
        if not 0 <= self.health_port <= 65535:
            raise ValueError(f"health_port must be in [0, 65535] (0: none), got {self.health_port!r}")
        if self.health_port and self.health_port in (self.port, self.metrics_port):
            raise ValueError(
                f"health_port ({self.health_port}) must differ from port ({self.port}) and metrics_port "
                f"({self.metrics_port})"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError(
                f"tls_cert and tls_key go together, got tls_cert={self.tls_cert!r} and tls_key={self.tls_key!r}"
            )
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError(f"tls_client_ca ({self.tls_client_ca!r}) needs tls_cert and tls_key (mutual TLS is TLS)")
        for name in ("ingest_roots", "model_roots"):
            roots = []
            for root in getattr(self, name):
                path = Path(root).expanduser()
                if not path.is_dir():
                    raise ValueError(f"{name} entries must be existing directories, got {str(root)!r}")
                roots.append(path.resolve())
            object.__setattr__(self, name, tuple(roots))
        if not 0 <= self.model_poll_interval_s <= 86_400:
            raise ValueError(
                f"model_poll_interval_s must be in [0, 86400] (0 disables polling), got {self.model_poll_interval_s!r}"
            )
        if not isinstance(self.default_models, Mapping):
            raise ValueError(f"default_models must map a modality to a model name, got {self.default_models!r}")
        for modality, model in self.default_models.items():
            if modality not in MODALITIES or not isinstance(model, str) or not model or ":" in model:
                raise ValueError(
                    f"default_models must map one of {MODALITIES} to a model name, got {modality!r}: {model!r}"
                )

        if not 1 <= self.shadow_max_pending <= 1000:
            raise ValueError(f"shadow_max_pending must be in [1, 1000], got {self.shadow_max_pending!r}")
        self.promotion_policy()  # checks the promotion_* bounds

    def promotion_policy(self) -> PromotionPolicy:
        """The promotion guard's settings."""
        return PromotionPolicy(
            min_shadow_reads=self.promotion_min_shadow_reads,
            min_agreement=self.promotion_min_agreement,
            eval_datasets={name: Path(path) for name, path in self.promotion_eval_datasets.items()},
            max_sensitivity_drop=self.promotion_max_sensitivity_drop,
            max_fp_per_study_increase=self.promotion_max_fp_per_study_increase,
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _coerce(cls: type, name: str, raw: Any) -> Any:
    """Convert a YAML/env/CLI value to the type of field ``name`` of dataclass ``cls``."""
    default = next(f for f in dataclasses.fields(cls) if f.name == name)
    kind = type(getattr(cls(), name)) if default.default is dataclasses.MISSING else type(default.default)
    if isinstance(raw, kind) and kind is not tuple:
        return raw
    if kind is tuple:  # ingest_roots, model_roots: a YAML list, or an os.pathsep-separated string (environment, CLI)
        items = raw.split(os.pathsep) if isinstance(raw, str) else raw
        if not isinstance(items, list | tuple):
            raise ValueError(f"{name} must be a list of paths, got {raw!r}")
        return tuple(Path(str(item)) for item in items if str(item))
    if kind is dict:  # default_models: a YAML mapping, or "KEY=VALUE,KEY=VALUE" (environment, CLI)
        if isinstance(raw, str):
            pairs = [item.split("=", 1) for item in raw.split(",") if item.strip()]
            if any(len(pair) != 2 for pair in pairs):
                raise ValueError(f"{name} must be KEY=VALUE pairs separated by commas, got {raw!r}")
            raw = {k.strip(): v.strip() for k, v in pairs}
        if not isinstance(raw, Mapping):
            raise ValueError(f"{name} must be a mapping, got {raw!r}")
        merged = {**getattr(cls(), name), **{str(k): str(v or "") for k, v in raw.items()}}
        return {k: v for k, v in merged.items() if v}
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
    return {k: _coerce(cls, k, v) for k, v in values.items() if k not in ("limits", "triton")}


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
    triton: dict[str, Any] = {}
    if config_file is not None:
        try:
            data = yaml.safe_load(Path(config_file).read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            raise ValueError(f"{config_file} is not valid YAML{where}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{config_file}: the configuration must be a mapping")
        limits.update(_merge(InputLimits, data.get("limits") or {}, f"{config_file}: limits"))
        triton.update(_merge(TritonConfig, data.get("triton") or {}, f"{config_file}: triton"))
        top.update(_merge(ServerConfig, data, str(config_file)))
    limit_fields = {f.name for f in dataclasses.fields(InputLimits)}
    triton_fields = {f.name for f in dataclasses.fields(TritonConfig)}
    top_fields = {f.name for f in dataclasses.fields(ServerConfig)} - {"limits", "triton"}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name.startswith("limits_") and name[len("limits_") :] in limit_fields:
            limits[name[len("limits_") :]] = _coerce(InputLimits, name[len("limits_") :], value)
        elif name.startswith("triton_") and name[len("triton_") :] in triton_fields:
            triton[name[len("triton_") :]] = _coerce(TritonConfig, name[len("triton_") :], value)
        elif name in top_fields:
            top[name] = _coerce(ServerConfig, name, value)
    for key, value in (cli or {}).items():
        if value is None:
            continue
        if key.startswith("triton_") and key[len("triton_") :] in triton_fields:  # e.g. --triton-url
            triton[key[len("triton_") :]] = _coerce(TritonConfig, key[len("triton_") :], value)
        else:
            top[key] = _coerce(ServerConfig, key, value)
    return ServerConfig(limits=InputLimits(**limits), triton=TritonConfig(**triton), **top)
