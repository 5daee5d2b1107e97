"""The bridge's settings: one typed object filled from defaults < YAML file (``--config``) < CLI flags.

Every bound is checked at construction and a violation raises ValueError quoting the value. Secrets (the radserve
token, the archive's token) are never part of ``repr`` and never logged.

YAML (every key optional)::

    poll_s: 10
    stable_s: 30
    concurrency: 2
    priority:                        # the first rule that matches sets the study's priority (else ROUTINE)
      - attribute: StudyDescription  # a DICOM keyword, matched on the study's QIDO-RS attributes
        match: "stroke|code stroke"  # a regular expression, searched case-insensitively
        priority: STAT
    series:
      exclude_descriptions: "scout|topogram|localizer|dose report"
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydicom.datadict import tag_for_keyword

PRIORITIES = ("ROUTINE", "STAT")
# Never read, whatever the models: reports, segmentations, key objects, presentation states, raw, RT and documents.
NON_IMAGE_MODALITIES = (
    "SR",
    "SEG",
    "KO",
    "PR",
    "REG",
    "RAW",
    "RTSTRUCT",
    "RTPLAN",
    "RTDOSE",
    "RTRECORD",
    "DOC",
    "OT",
)
# ImageType values that disqualify an image: anything not acquired (derived, secondary) and localizers.
EXCLUDED_IMAGE_TYPES = ("DERIVED", "SECONDARY", "LOCALIZER")


def dicom_tag(keyword: str) -> str:
    """The 8-hex-digit tag of a DICOM keyword, as DICOM JSON names it (``StudyDescription`` -> ``00081030``)."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"{keyword!r} is not a DICOM keyword")
    return f"{tag:08X}"


@dataclass(frozen=True)
class PriorityRule:
    """A study whose ``attribute`` (a DICOM keyword) matches ``match`` (a regular expression, searched
    case-insensitively in each value) is read with ``priority``."""

    attribute: str
    match: str
    priority: str = "STAT"

    def __post_init__(self) -> None:
        dicom_tag(self.attribute)
        try:
            re.compile(self.match)
        except re.error as exc:
            raise ValueError(
                f"priority rule on {self.attribute}: bad regular expression {self.match!r}: {exc}"
            ) from None
        if self.priority not in PRIORITIES:
            raise ValueError(
                f"priority rule on {self.attribute}: priority must be one of {PRIORITIES}, got {self.priority!r}"
            )

    @property
    def tag(self) -> str:
        return dicom_tag(self.attribute)

    def matches(self, values: list[str]) -> bool:
        pattern = re.compile(self.match, re.IGNORECASE)
        return any(pattern.search(value) for value in values)


@dataclass(frozen=True)
class SeriesRules:
    """Which series are never read (selection.py applies them; README "Connect an archive")."""

    exclude_modalities: tuple[str, ...] = NON_IMAGE_MODALITIES
    exclude_image_types: tuple[str, ...] = EXCLUDED_IMAGE_TYPES
    # A regular expression searched (case-insensitively) in SeriesDescription: scouts that lack the LOCALIZER type.
    exclude_descriptions: str = r"\b(scout|topogram|localizer|surview|dose (report|info))\b"
    # A CT or MR series with fewer images of one geometry than this is not a volume (single shots; localizers are
    # also left out by their ImageType and description). Low, so that a short but real series is still read.
    min_slices: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude_modalities", tuple(m.upper() for m in self.exclude_modalities))
        object.__setattr__(self, "exclude_image_types", tuple(t.upper() for t in self.exclude_image_types))
        try:
            re.compile(self.exclude_descriptions)
        except re.error as exc:
            raise ValueError(
                f"series.exclude_descriptions: bad regular expression {self.exclude_descriptions!r}: {exc}"
            ) from None
        if not 1 <= self.min_slices <= 10_000:
            raise ValueError(f"series.min_slices must be in [1, 10000], got {self.min_slices!r}")


def _host_port(value: str, what: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"{what} must be HOST:PORT, got {value!r}")


@dataclass(frozen=True)
class BridgeConfig:
    dicomweb_url: str  # the archive's DICOMweb root, e.g. http://orthanc:8042/dicom-web
    server: str  # radserve, HOST:PORT
    state_dir: Path  # the journal and the outputs waiting to be stored (a persistent volume)
    # Polling: every poll_s the bridge lists the archive's studies (QIDO-RS). lookback_days > 0 lists only studies
    # whose StudyDate is in the last lookback_days days (and today), for large archives; 0 lists every study.
    poll_s: float = 10.0
    lookback_days: int = 0
    page_size: int = 500  # QIDO-RS `limit` of one page of studies
    page_overlap: int = 20  # consecutive pages overlap by this many studies, so none slips between them
    stable_s: float = 30.0  # a study is read once its instance count has not changed for this long
    concurrency: int = 2  # studies in progress at once (each one read at a time on the server)
    read_timeout_s: float = 900.0  # deadline of one ReadStreamed call
    http_timeout_s: float = 60.0  # one DICOMweb request
    # Retriable failures (radserve UNAVAILABLE, archive 5xx, connection errors) wait retry_backoff_s, doubled after
    # each attempt up to retry_max_backoff_s; the study fails after max_attempts attempts.
    retry_backoff_s: float = 5.0
    retry_max_backoff_s: float = 300.0
    max_attempts: int = 20
    grace_s: float = 30.0  # SIGTERM: studies in progress get this long to finish
    metrics_port: int = 9465  # Prometheus; 0: off
    metrics_host: str = "127.0.0.1"
    priority: tuple[PriorityRule, ...] = ()
    series: SeriesRules = field(default_factory=SeriesRules)
    # radserve's TLS and token (inference.client.ReadingClient)
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    token: str | None = field(default=None, repr=False)
    # The archive's own auth (at most one): a bearer token; a file holding one, read again when it changes (for
    # short-lived OAuth tokens refreshed by another process); USER:PASSWORD for HTTP basic auth. And a CA bundle for
    # its HTTPS certificate.
    dicomweb_token: str | None = field(default=None, repr=False)
    dicomweb_token_file: Path | None = None
    dicomweb_basic_auth: str | None = field(default=None, repr=False)
    dicomweb_ca: Path | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.dicomweb_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"dicomweb_url must be an http:// or https:// URL, got {self.dicomweb_url!r}")
        _host_port(self.server, "server")
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        bounds = {
            "poll_s": (0.1, 3600.0),
            "stable_s": (0.0, 86400.0),
            "read_timeout_s": (1.0, 86400.0),
            "http_timeout_s": (1.0, 3600.0),
            "retry_backoff_s": (0.0, 3600.0),
            "retry_max_backoff_s": (0.0, 86400.0),
            "grace_s": (0.0, 3600.0),
        }
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")
        int_bounds = {
            "lookback_days": (0, 36500),
            "page_size": (1, 100_000),
            "concurrency": (1, 64),
            "max_attempts": (1, 1000),
            "metrics_port": (0, 65535),
        }
        for name, (low, high) in int_bounds.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        if not 0 <= self.page_overlap < self.page_size:
            raise ValueError(
                f"page_overlap must be in [0, page_size), got {self.page_overlap!r} (page_size {self.page_size})"
            )
        if self.retry_max_backoff_s < self.retry_backoff_s:
            raise ValueError(
                f"retry_max_backoff_s ({self.retry_max_backoff_s!r}) must be >= retry_backoff_s "
                f"({self.retry_backoff_s!r})"
            )
        archive_auth = [self.dicomweb_token, self.dicomweb_token_file, self.dicomweb_basic_auth]
        if sum(value is not None for value in archive_auth) > 1:
            raise ValueError("give at most one of dicomweb_token, dicomweb_token_file and dicomweb_basic_auth")
        if self.dicomweb_basic_auth is not None and ":" not in self.dicomweb_basic_auth:
            raise ValueError("dicomweb_basic_auth must be USER:PASSWORD")
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs both cert and key")

    @property
    def journal_path(self) -> Path:
        return self.state_dir / "journal.sqlite3"

    @property
    def outputs_dir(self) -> Path:
        return self.state_dir / "outputs"


def _priority_rules(raw: Any) -> tuple[PriorityRule, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ValueError(f"priority must be a list of rules, got {type(raw).__name__}")
    rules = []
    for index, item in enumerate(raw):
        if not isinstance(item, Mapping) or set(item) - {"attribute", "match", "priority"}:
            raise ValueError(f"priority rule {index} must be a mapping of attribute, match and priority, got {item!r}")
        try:
            rules.append(PriorityRule(**item))
        except TypeError as exc:
            raise ValueError(f"priority rule {index}: {exc}") from None
    return tuple(rules)


def _series_rules(raw: Any) -> SeriesRules:
    if raw is None:
        return SeriesRules()
    if not isinstance(raw, Mapping):
        raise ValueError(f"series must be a mapping, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(SeriesRules)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown series setting(s) {unknown}; known: {sorted(known)}")
    values = dict(raw)
    for name in ("exclude_modalities", "exclude_image_types"):
        if name in values:
            values[name] = tuple(values[name])
    return SeriesRules(**values)


def load_bridge_config(cli: Mapping[str, Any], config_file: Path | None = None) -> BridgeConfig:
    """Defaults < YAML file < CLI flags (a flag left None keeps the value below it)."""
    values: dict[str, Any] = {}
    if config_file is not None:
        loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        if not isinstance(loaded, Mapping):
            raise ValueError(f"{config_file}: the bridge configuration must be a YAML mapping")
        values.update(loaded)
    values.update({key: value for key, value in cli.items() if value is not None})
    known = {f.name for f in dataclasses.fields(BridgeConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown bridge setting(s) {unknown}")
    values["priority"] = _priority_rules(values.get("priority"))
    values["series"] = _series_rules(values.get("series"))
    for name, flag in (("dicomweb_url", "--dicomweb"), ("server", "--server"), ("state_dir", "--state")):
        if not values.get(name):
            raise ValueError(f"{flag} is required (or {name} in the YAML file)")
    for name in ("ca", "cert", "key", "dicomweb_ca", "dicomweb_token_file", "state_dir"):
        if values.get(name) is not None:
            values[name] = Path(values[name])
    return BridgeConfig(**values)
