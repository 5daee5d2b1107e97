"""The bridge's Prometheus metrics, its audit lines and its log format.

Metrics (one CollectorRegistry per bridge; served on ``metrics_port``, 9465 by default):

* ``radserve_bridge_studies_discovered_total``, ``_read_total``, ``_stored_total``, ``_skipped_total``;
* ``radserve_bridge_studies_failed_total{status}`` (the gRPC or HTTP status that ended the study);
* ``radserve_bridge_retries_total{status}`` (retriable failures, each followed by a back-off);
* ``radserve_bridge_outputs_stored_total{kind,how}`` (``how``: ``stow`` or ``already_present``);
* ``radserve_bridge_stable_to_stored_seconds{priority}``: from the study found stable to its results stored;
* ``radserve_bridge_stage_seconds{stage}``: where a study's time goes: ``choose`` (series listing, metadata, choice),
  ``retrieve`` (WADO-RS), ``read`` (ReadStreamed; ``server`` is the server's own total within it), ``keep`` (outputs
  written to the state directory), ``store`` (QIDO-RS looks and STOW-RS);
* ``radserve_bridge_studies{state}``: studies in the journal by state, read at scrape time.

Audit: one line per finished study (and per retry) on the ``radserve.bridge.audit`` logger: the event, the study's
hash, priority, attempts, status, models and outputs, and timings. No UID in clear, no patient data.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

audit_logger = logging.getLogger("radserve.bridge.audit")
LAG_BUCKETS_S = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 7200)
STAGE_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _JournalCollector(Collector):
    def __init__(self, state_counts: Callable[[], dict[str, int]]) -> None:
        self._state_counts = state_counts

    def collect(self) -> Iterator[Metric]:
        try:
            counts = self._state_counts()
        except sqlite3.Error:  # the journal is closed (after the drain): no gauge rather than a failed scrape
            return
        family = GaugeMetricFamily("radserve_bridge_studies", "Studies in the journal by state", labels=["state"])
        for state, count in sorted(counts.items()):
            family.add_metric([state], count)
        yield family


class BridgeMetrics:
    def __init__(self, state_counts: Callable[[], dict[str, int]] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.discovered = Counter("radserve_bridge_studies_discovered", "Studies found in the archive", registry=r)
        self.read = Counter("radserve_bridge_studies_read", "Studies read by radserve", registry=r)
        self.stored = Counter("radserve_bridge_studies_stored", "Studies whose results are stored", registry=r)
        self.skipped = Counter("radserve_bridge_studies_skipped", "Studies with nothing a model reads", registry=r)
        self.failed = Counter(
            "radserve_bridge_studies_failed", "Studies that failed, by status", ["status"], registry=r
        )
        self.retries = Counter("radserve_bridge_retries", "Retriable failures, by status", ["status"], registry=r)
        self.outputs = Counter(
            "radserve_bridge_outputs_stored",
            "DICOM outputs in the archive, by kind and how",
            ["kind", "how"],
            registry=r,
        )
        self.lag = Histogram(
            "radserve_bridge_stable_to_stored_seconds",
            "From a study found stable to its results stored",
            ["priority"],
            buckets=LAG_BUCKETS_S,
            registry=r,
        )
        self.stages = Histogram(
            "radserve_bridge_stage_seconds",
            "Seconds per study by stage: choose, retrieve, read (server: the server's own part of it), keep, store",
            ["stage"],
            buckets=STAGE_BUCKETS_S,
            registry=r,
        )
        if state_counts is not None:
            r.register(_JournalCollector(state_counts))

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)


def audit(event: str, study_hash: str, **fields: Any) -> None:
    """One audit line: ``event=... study=<hash> key=value ...`` (values are the bridge's own, never the archive's
    text: statuses, counts, model names, seconds)."""
    parts = [f"event={event}", f"study={study_hash}"]
    parts += [
        f"{key}={json.dumps(value) if isinstance(value, str) and ' ' in value else value}"
        for key, value in fields.items()
        if value is not None
    ]
    audit_logger.info(" ".join(parts))


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return json.dumps(body)


def configure_logging(level: str = "INFO", log_format: str = "text") -> None:
    """Root logging to stderr. The HTTP libraries are held at WARNING: dicomweb-client logs each request's study UID
    at INFO and urllib3 each URL at DEBUG."""
    if log_format not in ("text", "json"):
        raise ValueError(f"log_format must be 'text' or 'json', got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for name in ("dicomweb_client", "urllib3", "requests"):
        logging.getLogger(name).setLevel(logging.WARNING)
