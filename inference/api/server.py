"""Server lifecycle: build, load and warm up models, serve, drain on SIGTERM.

Health (standard grpc.health.v1) is NOT_SERVING until every model is loaded and warmed up. On SIGTERM
or SIGINT: health turns NOT_SERVING, new reads get UNAVAILABLE, reads in flight get ``grace_s`` to
finish, then the process exits 0. With a remote backend (Triton), a watcher asks every ``triton.health_poll_s``
whether each backend is ready: health is NOT_SERVING while one is not, and SERVING again once it is, without
a restart (reads meanwhile fail with UNAVAILABLE within their deadline).

Models change while serving (``inference.serving.watcher``, LoadModel, UnloadModel): after start-up, health
is SERVING exactly while at least one model version is READY.

Work that cannot hang (README "Security, limits and observability"): streamed DICOM and NIfTI payloads are decoded
in worker processes that are killed and replaced when a decode overruns (``inference.io.workers``); health turns
NOT_SERVING while every I/O thread or every decode worker has been on one job for ``stall_timeout_s`` and SERVING
again once one is free; on SIGTERM the process exits within ``grace_s`` (plus :data:`EXIT_MARGIN_S`) whatever a
thread is stuck in.

Security (``inference.api.security``): TLS or mutual TLS when configured, plaintext only on a loopback host
or with ``insecure``; bearer-token authentication of the ReadingService when a tokens file is given.
Observability (``inference.api.metrics``): Prometheus metrics on ``metrics_port``; one audit record per read.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from inference.api.admission import AdmissionConfig, default_memory_budget_bytes
from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.api.gen.radserve.v1 import reading_pb2_grpc as pb_grpc
from inference.api.ingest import IngestPolicy
from inference.api.interceptors import ErrorInterceptor
from inference.api.metrics import ServerMetrics
from inference.api.security import AuthInterceptor, Security, is_loopback, load_security
from inference.api.servicer import ReadingServicer
from inference.api.upload import ReceivePolicy
from inference.config import ServerConfig
from inference.io.workers import DecodeWorkers
from inference.platform import select_device
from inference.serving.registry import ModelRegistry
from inference.serving.watcher import RepositoryWatcher

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ReadingService"].full_name
HEALTH_SERVICES = ("", SERVICE_NAME)
# SERVING from start-up to exit, whatever the models or backends do: what a liveness probe asks, so that a
# Triton outage (NOT_SERVING on "") takes a pod out of load balancing without getting it restarted.
LIVENESS_SERVICE = "liveness"
EXIT_MARGIN_S = 5.0  # after grace_s, SIGTERM's hard exit: the time to stop the engine and flush the log
WATCH_PROGRESS_S = 1.0


class StartupError(Exception):
    """The server cannot start: a port in use, a missing model directory. The CLI prints it as one line, exit 2."""


class WatchedExecutor(ThreadPoolExecutor):
    """A ThreadPoolExecutor that knows how long each busy thread has been on its job (health: stalled threads)."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "") -> None:
        super().__init__(max_workers, thread_name_prefix=thread_name_prefix)
        self.busy_since: dict[int, float] = {}

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        def timed():  # type: ignore[no-untyped-def]
            thread = threading.get_ident()
            self.busy_since[thread] = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                self.busy_since.pop(thread, None)

        return super().submit(timed)

    def stalled_for_s(self) -> float:
        """How long every thread has been on its current job (0 while one is free)."""
        busy = list(self.busy_since.values())
        if len(busy) < self._max_workers:
            return 0.0
        return time.monotonic() - max(busy)


class RadserveServer:
    def __init__(self, config: ServerConfig, security: Security | None = None) -> None:
        """``security`` defaults to ``load_security(config)`` (raises ValueError for a bad TLS or tokens setup)."""
        self.config = config
        self.security = load_security(config) if security is None else security
        self.device = select_device(config.device)
        self._io_executor = WatchedExecutor(config.io_threads, thread_name_prefix="radserve-io")
        self.decode_workers = (
            DecodeWorkers(
                config.decode_workers,
                config.decode_timeout_s,
                log_level=config.log_level,
                log_format=config.log_format,
            )
            if config.decode_workers
            else None
        )
        self._stalled = False  # every I/O thread or decode worker on one job for stall_timeout_s
        self._progress_watch: asyncio.Task | None = None
        self.registry = ModelRegistry(
            self.device,
            self._io_executor,
            default_models=config.default_models,
            warmup=config.warmup,
            backend=config.backend,
            triton=config.triton,
        )
        self._backends_ready = True  # what the backend watcher saw last (torch backends are always ready)
        self._backend_watch: asyncio.Task | None = None
        self._health_server: grpc.aio.Server | None = None  # the plaintext health-only port (probes)
        self.registry.runner_setup = self._setup_runner
        # Model versions come and go while serving (README "Models"): polling, LoadModel, UnloadModel.
        self.watcher = (
            RepositoryWatcher(self.registry, config.models, config.model_poll_interval_s)
            if config.model_poll_interval_s > 0
            else None
        )
        self._models_settled = False  # the start-up load is done: health follows the registry from then on
        self.registry.add_listener(self._on_models_changed)
        self.health = health.aio.HealthServicer()
        self.servicer = ReadingServicer(
            self.registry,
            config.limits,
            self._io_executor,
            max_in_flight=config.max_in_flight,
            progressive_reads=config.progressive_reads,
            ingest=IngestPolicy.from_config(config),
            allow_model_management=config.allow_model_management,
            max_message_bytes=config.max_message_bytes,
            output_chunk_bytes=config.output_chunk_bytes,
            admission=AdmissionConfig(
                max_in_flight=config.max_in_flight,
                max_uploads=config.max_uploads,
                max_reads_per_client=config.max_reads_per_client,
                memory_budget_bytes=int(config.memory_budget_gb * 1024**3) or default_memory_budget_bytes(),
                max_admission_wait_s=config.max_admission_wait_s,
            ),
            receive_policy=ReceivePolicy(
                config.upload_first_chunk_timeout_s, config.upload_min_bytes_per_s, config.upload_rate_grace_s
            ),
            decode_workers=self.decode_workers,
            model_roots=config.model_roots,
            promotion_policy=config.promotion_policy(),
            shadow_max_pending=config.shadow_max_pending,
        )
        self.metrics = ServerMetrics(
            lambda: self.registry.runners, lambda: self.servicer.in_flight, shadows=self.servicer.shadow.targets
        )
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a port another server holds is an error, not a second listener on it
        ]
        # The ErrorInterceptor comes first: it maps what the auth interceptor raises and audits every read.
        interceptors: list[grpc.aio.ServerInterceptor] = [ErrorInterceptor(on_done=self.metrics.observe_call)]
        if self.security.tokens is not None:
            interceptors.append(AuthInterceptor(self.security.tokens))
        self._server = grpc.aio.server(interceptors=interceptors, options=options)
        pb_grpc.add_ReadingServiceServicer_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server,
        )
        self.port: int | None = None
        self._health_tasks: set[asyncio.Task] = set()

    async def _set_health(self, status: int) -> None:
        for service in HEALTH_SERVICES:
            await self.health.set(service, status)

    def _setup_runner(self, runner: object) -> None:
        runner.oom_cpu_fallback = self.config.oom_cpu_fallback
        runner.compile = getattr(runner, "compile", False) or self.config.compile  # torch.compile at warm-up

    def _on_models_changed(self) -> None:
        """After start-up, health is SERVING exactly while some model version is READY (and not draining)."""
        if not self._models_settled or self.servicer.draining:
            return
        serving = bool(self.registry.runners) and self._backends_ready and not self._stalled
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        task = asyncio.get_running_loop().create_task(self._set_health(status))
        self._health_tasks.add(task)
        task.add_done_callback(self._health_tasks.discard)

    async def _watch_backends(self) -> None:
        """Health follows the backends: NOT_SERVING while one is down (Triton), SERVING once all are back."""
        while not self.servicer.draining:
            await asyncio.sleep(self.config.triton.health_poll_s)
            try:
                ready = await asyncio.to_thread(self.registry.backends_ready)
            except Exception:  # the watcher must outlive any one failed check
                logger.exception("backend readiness check failed")
                ready = False
            if ready != self._backends_ready and not self.servicer.draining:
                self._backends_ready = ready
                logger.warning(
                    "model backends %s; health %s",
                    "are ready again" if ready else "unavailable",
                    "SERVING" if ready and self.registry.runners else "NOT_SERVING",
                )
                self._on_models_changed()

    async def _watch_progress(self) -> None:
        """Health follows progress: NOT_SERVING while every I/O thread or every decode worker has been on one job
        for ``stall_timeout_s``, SERVING again once one is free."""
        limit = self.config.stall_timeout_s
        while not self.servicer.draining:
            await asyncio.sleep(WATCH_PROGRESS_S)
            waited = self._io_executor.stalled_for_s()
            if self.decode_workers is not None:
                waited = max(waited, self.decode_workers.stalled_for_s())
            stalled = waited > limit
            if stalled != self._stalled and not self.servicer.draining:
                self._stalled = stalled
                if stalled:
                    logger.error(
                        "every I/O thread or decode worker has been busy with one job for %.0f s (stall_timeout_s "
                        "%.0f): health NOT_SERVING until one is free",
                        waited,
                        limit,
                    )
                else:
                    logger.warning("work is progressing again; health follows the models")
                self._on_models_changed()

    async def start(self) -> int:
        """Bind and start answering (health NOT_SERVING), then load and warm up the models, then SERVING."""
        if not self.config.models.is_dir():
            raise StartupError(f"the model directory {str(self.config.models)!r} does not exist or is not a directory")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        try:
            if self.security.credentials is not None:
                self.port = self._server.add_secure_port(self.config.address, self.security.credentials)
                transport = "mutual TLS" if self.security.mutual_tls else "TLS"
            else:
                self.port = self._server.add_insecure_port(self.config.address)
                transport = "plaintext"
        except RuntimeError:  # grpcio raises "Failed to bind to address ..." for a port in use
            self.port = 0
            logger.warning(
                "serving plaintext gRPC (no TLS) on %s%s; configure --tls-cert/--tls-key outside development",
                self.config.host,
                "" if is_loopback(self.config.host) else " because --insecure was given",
            )
        if self.port == 0:
            raise StartupError(
                f"could not listen on {self.config.address}: the port is in use or the address is not ours"
            )
        if self.security.tokens is None:
            logger.warning("no --auth-tokens file: reads are not authenticated")
        if self.config.metrics_port:
            try:
                self.metrics.start_http(self.config.host, self.config.metrics_port)
            except OSError as exc:
                raise StartupError(
                    f"could not bind the metrics port {self.config.host}:{self.config.metrics_port}: {exc.strerror}"
                ) from exc
        if self.config.health_port:
            self._health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            try:
                bound = self._health_server.add_insecure_port(f"{self.config.host}:{self.config.health_port}")
            except RuntimeError:
                bound = 0
            if bound == 0:
                raise StartupError(f"could not bind the health port {self.config.host}:{self.config.health_port}")
            await self._health_server.start()
            logger.info("grpc.health.v1 only, plaintext, on %s:%d", self.config.host, self.config.health_port)
        if self.decode_workers is not None:
            await asyncio.to_thread(self.decode_workers.start)
        await self._server.start()
        self._progress_watch = asyncio.get_running_loop().create_task(self._watch_progress())
        logger.info(
            "listening on %s:%d with %s, %d tenant(s) (health NOT_SERVING until models are warm)",
            self.config.host,
            self.port,
            transport,
            0 if self.security.tokens is None else len(self.security.tokens.tenants),
        )
        await self.registry.load_repository(self.config.models, warmup=self.config.warmup)
        if self.watcher is not None:
            self.watcher.start()
        if self.servicer.draining:
            return self.port
        self._models_settled = True
        self._backends_ready = await asyncio.to_thread(self.registry.backends_ready)
        self._backend_watch = asyncio.get_running_loop().create_task(self._watch_backends())
        if not self.registry.runners:
            logger.error(
                "no model could be loaded from %s; health stays NOT_SERVING until one loads", self.config.models
            )
            return self.port
        if not self._backends_ready:
            logger.error(
                "a model backend is unavailable (Triton at %s?); health NOT_SERVING until it is ready",
                self.config.triton.url,
            )
            return self.port
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        logger.info("serving %d model version(s) on %s", len(self.registry.runners), self.device)
        return self.port

    async def stop(self) -> None:
        """Drain: refuse new reads, let reads in flight finish within the grace period, then stop."""
        self.servicer.draining = True
        for task in (self._backend_watch, self._progress_watch):
            if task is not None:
                task.cancel()
        if self.watcher is not None:
            await self.watcher.stop()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        logger.info("draining: %d read(s) in flight, grace %.0f s", self.servicer.in_flight, self.config.grace_s)
        await self._server.stop(self.config.grace_s)
        if self._health_server is not None:
            await self._health_server.stop(0)
        if self.decode_workers is not None:
            self.decode_workers.close()
        await self.servicer.shadow.close()
        await self.registry.close(drain=False)
        self._io_executor.shutdown(wait=False, cancel_futures=True)
        self.metrics.stop()
        logger.info("stopped")

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


async def serve(config: ServerConfig, security: Security | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    server = RadserveServer(config, security)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    start = asyncio.create_task(server.start())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if start.done() and start.exception() is not None:
        await server.stop()
        raise start.exception()
    await stopped
    logger.info("signal received; shutting down")
    hard_exit = threading.Timer(config.grace_s + EXIT_MARGIN_S, _exit_now, args=(config.grace_s,))
    hard_exit.daemon = True
    hard_exit.start()
    if not start.done():
        start.cancel()
    await server.stop()
    return 0


def _exit_now(grace_s: float) -> None:
    """SIGTERM's backstop: the stop did not finish within the grace period (a thread stuck in a library call)."""
    logger.error("not stopped %.0f s after the grace period of %.0f s; exiting now", EXIT_MARGIN_S, grace_s)
    logging.shutdown()
    os._exit(1)


def exit_leaving_stuck_threads(code: int) -> int:
    """After ``serve`` returned: the interpreter would wait at exit for every non-daemon thread, and a thread stuck
    in a library call never ends; leave them behind (the process is done) by exiting at once."""
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    deadline = time.monotonic() + 1.0
    for thread in others:
        thread.join(max(deadline - time.monotonic(), 0.0))
    stuck = [t.name for t in others if t.is_alive()]
    if stuck:
        logger.warning("exiting with %d thread(s) still busy: %s", len(stuck), ", ".join(sorted(stuck)))
        logging.shutdown()
        os._exit(code)
    return code
