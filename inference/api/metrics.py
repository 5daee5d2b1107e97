"""Observability: Prometheus metrics of one server instance, and the log format (text or JSON lines).

Metrics (each server has its own CollectorRegistry, served on ``metrics_port`` by prometheus_client):

* ``radserve_reads_total{model,version,status}``: finished reads by final gRPC status (``model`` is
  ``unknown`` when the read failed before a model was chosen; a client-sent name is never a label).
* ``radserve_stage_seconds{stage}``: stage latencies of successful reads (the response's ``timing_ms``).
* ``radserve_reads_in_flight``, ``radserve_queue_depth{model,version}`` (work items waiting),
  ``radserve_batch_size{model,version}`` (histogram of forward-pass batch sizes) and
  ``radserve_gpu_memory_allocated_bytes{device}`` (CUDA only): read from the engine at scrape time.
* ``radserve_pinned_host_memory_bytes`` (CUDA only): host memory of the pinned staging buffers of GPU
  preprocessing, cached between reads (``inference.backends.torch.pinned_host_memory_bytes``).
* Shadow versions (inference.serving.shadow), per shadow ``{model,version}``: ``radserve_shadow_fraction``,
  ``radserve_shadow_reads_total{outcome}`` (compared, skipped, failed), ``radserve_shadow_findings_total{side}``
  (live, shadow, matched), ``radserve_shadow_agreement{share}`` (``live_found``: live findings the shadow also
  found; ``shadow_found``: shadow findings live also has) and ``radserve_shadow_center_shift_mm`` (mean, matched).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from inference.api.interceptors import AUDITED_METHODS, CallRecord, request_id_var
from inference.backends.torch import pinned_host_memory_bytes
from inference.errors import escape_text

logger = logging.getLogger(__name__)

STAGE_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _EngineCollector(Collector):
    """Gauges and the batch-size histogram, read from the live runners when Prometheus scrapes."""

    def __init__(
        self,
        runners: Callable[[], Iterable[Any]],
        in_flight: Callable[[], int],
        shadows: Callable[[], Iterable[Any]] | None = None,
    ) -> None:
        self._runners = runners
        self._in_flight = in_flight
        self._shadows = shadows

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily("radserve_reads_in_flight", "Reads admitted and not finished")
        in_flight.add_metric([], self._in_flight())
        yield in_flight
        depth = GaugeMetricFamily(
            "radserve_queue_depth", "Work items waiting for a forward pass", labels=["model", "version"]
        )
        batches = HistogramMetricFamily(
            "radserve_batch_size", "Work items per forward pass", labels=["model", "version"]
        )
        memory = GaugeMetricFamily(
            "radserve_gpu_memory_allocated_bytes", "GPU memory held by tensors", labels=["device"]
        )
        devices: dict[str, int] = {}
        for runner in list(self._runners()):
            labels = [runner.config.name, runner.config.version]
            depth.add_metric(labels, runner.batcher.queue_depth)
            sizes = dict(runner.batcher.stats.batch_sizes)
            buckets = [(str(bound), sum(n for size, n in sizes.items() if size <= bound)) for bound in BATCH_BUCKETS]
            buckets.append(("+Inf", sum(sizes.values())))
            batches.add_metric(labels, buckets, sum_value=sum(size * n for size, n in sizes.items()))
            allocated = runner.backend.memory_allocated_bytes()
            if allocated is not None:
                devices[str(runner.device)] = allocated
        for device, allocated in sorted(devices.items()):
            memory.add_metric([device], allocated)
        yield depth
        yield batches
        yield from self._shadow_metrics()
        if devices:
            yield memory
            pinned_bytes = pinned_host_memory_bytes()
            if pinned_bytes is not None:
                pinned = GaugeMetricFamily(
                    "radserve_pinned_host_memory_bytes",
                    "Host memory of pinned staging buffers for GPU preprocessing, cached blocks included",
                )
                pinned.add_metric([], pinned_bytes)
                yield pinned

    def _shadow_metrics(self) -> Iterator[Metric]:
        """The agreement of each shadow version (``ShadowTarget``: name, version, fraction, agreement)."""
        labels = ["model", "version"]
        fraction = GaugeMetricFamily("radserve_shadow_fraction", "Share of live reads also read by it", labels=labels)
        reads = CounterMetricFamily("radserve_shadow_reads", "Shadow reads by outcome", labels=[*labels, "outcome"])
        findings = CounterMetricFamily(
            "radserve_shadow_findings", "Findings of the compared reads", labels=[*labels, "side"]
        )
        agreement = GaugeMetricFamily(
            "radserve_shadow_agreement", "Share of one side's findings the other also has", labels=[*labels, "share"]
        )
        shift = GaugeMetricFamily(
            "radserve_shadow_center_shift_mm", "Mean center distance of matched findings", labels=labels
        )
        for target in list(self._shadows()) if self._shadows is not None else []:
            key, a = [target.name, target.version], target.agreement
            fraction.add_metric(key, target.fraction)
            for outcome, n in (
                ("compared", a.reads_compared),
                ("skipped", a.reads_skipped),
                ("failed", a.reads_failed),
            ):
                reads.add_metric([*key, outcome], n)
            for side, n in (("live", a.live_findings), ("shadow", a.shadow_findings), ("matched", a.matched)):
                findings.add_metric([*key, side], n)
            agreement.add_metric([*key, "live_found"], a.live_found_share)
            agreement.add_metric([*key, "shadow_found"], a.shadow_found_share)
            shift.add_metric(key, a.mean_center_shift_mm)
        yield from (fraction, reads, findings, agreement, shift)


class ServerMetrics:
    """The metrics of one server: ``observe_call`` is the ErrorInterceptor's ``on_done`` hook."""

    def __init__(
        self,
        runners: Callable[[], Iterable[Any]],
        in_flight: Callable[[], int],
        *,
        shadows: Callable[[], Iterable[Any]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.reads = Counter(
            "radserve_reads",
            "Finished reads by final gRPC status",
            ["model", "version", "status"],
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "radserve_stage_seconds",
            "Latency of the stages of successful reads",
            ["stage"],
            buckets=STAGE_BUCKETS_S,
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(runners, in_flight, shadows))
        self._http: Any = None
        self._thread: Any = None
        self.port: int | None = None

    def observe_call(self, record: CallRecord) -> None:
        if record.method not in AUDITED_METHODS:
            return
        self.reads.labels(record.model or "unknown", record.model_version or "unknown", record.code).inc()
        for stage, ms in record.timing_ms.items():
            self.stage_seconds.labels(stage).observe(ms / 1e3)

    def start_http(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port``; returns the bound port. Raises OSError when it cannot bind."""
        host = host.strip("[]")  # an IPv6 literal as gRPC takes it, [::1], is ::1 here
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self._http.server_address[1])
        logger.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


# -- logs -------------------------------------------------------------------------------------------------


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (the current call's, or ``-``) to every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT`` lines whose message is one line of printable ASCII (:func:`inference.errors.escape_text`):
    a newline, carriage return or other control character in a logged value, wherever it came from, is written as an
    escape, so no value can forge a log line. A traceback (the ``exc_info`` of a record, or the redacted one the
    error interceptor passes as ``extra={"traceback": ...}``) follows on its own lines, indented, as the only
    multi-line part of a record."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape_text(record.getMessage())
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        extra = getattr(record, "traceback", None)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        for block in (extra, record.exc_text):
            if block:
                line += "\n" + "\n".join("    " + escape_text(part) for part in str(block).splitlines())
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, request_id, msg (+ ``audit`` fields, + exc); control characters
    and non-ASCII in values are escaped by JSON itself."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "msg": record.getMessage(),
        }
        audit = getattr(record, "audit", None)
        if isinstance(audit, dict):
            body["audit"] = audit
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        elif getattr(record, "traceback", None):
            body["exc"] = str(record.traceback)
        return json.dumps(body, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def configure_logging(level: str = "INFO", log_format: str = "text") -> None:
    """Root logging to stderr, as text lines or JSON lines, each with the request id."""
    if log_format not in ("text", "json"):
        raise ValueError(f"log_format must be 'text' or 'json', got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
