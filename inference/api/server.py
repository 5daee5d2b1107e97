"""Server lifecycle: build, load and warm up models, serve, drain on SIGTERM.

Health (standard grpc.health.v1) is NOT_SERVING until every model is loaded and warmed up. On SIGTERM
or SIGINT: health turns NOT_SERVING, new reads get UNAVAILABLE, reads in flight get ``grace_s`` to
finish, then the process exits 0. With a remote backend (Triton), a watcher asks every ``triton.health_poll_s``
whether each backend is ready: health is NOT_SERVING while one is not, and SERVING again once it is, without
a restart (reads meanwhile fail with UNAVAILABLE within their deadline).

Models change while serving (``inference.modelrepo.watcher``, LoadModel, UnloadModel): after start-up, health
is SERVING exactly while at least one model version is READY.

Security (``inference.api.security``): TLS or mutual TLS when configured, plaintext only on a loopback host
or with ``insecure``; bearer-token authentication of the ReadingService when a tokens file is given.
Observability (``inference.metrics``): Prometheus metrics on ``metrics_port``; one audit record per read.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.api.gen.radserve.v1 import reading_pb2_grpc as pb_grpc
from inference.api.ingest import IngestPolicy
from inference.api.interceptors import ErrorInterceptor
from inference.api.security import AuthInterceptor, Security, is_loopback, load_security
from inference.api.servicer import ReadingServicer
from inference.config import ServerConfig
from inference.metrics import ServerMetrics
from inference.modelrepo.registry import ModelRegistry
from inference.modelrepo.watcher import RepositoryWatcher
from inference.platform import select_device

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ReadingService"].full_name
HEALTH_SERVICES = ("", SERVICE_NAME)
# SERVING from start-up to exit, whatever the models or backends do: what a liveness probe asks, so that a
# Triton outage (NOT_SERVING on "") takes a pod out of load balancing without getting it restarted.
LIVENESS_SERVICE = "liveness"


class RadserveServer:
    def __init__(self, config: ServerConfig, security: Security | None = None) -> None:
        """``security`` defaults to ``load_security(config)`` (raises ValueError for a bad TLS or tokens setup)."""
        self.config = config
        self.security = load_security(config) if security is None else security
        self.device = select_device(config.device)
        self._io_executor = ThreadPoolExecutor(config.io_threads, thread_name_prefix="radserve-io")
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
            ingest=IngestPolicy.from_config(config),
            allow_model_management=config.allow_model_management,
            max_message_bytes=config.max_message_bytes,
            output_chunk_bytes=config.output_chunk_bytes,
        )
        self.metrics = ServerMetrics(lambda: self.registry.runners, lambda: self.servicer.in_flight)
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
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
        serving = bool(self.registry.runners) and self._backends_ready
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

    async def start(self) -> int:
        """Bind and start answering (health NOT_SERVING), then load and warm up the models, then SERVING."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        if self.security.credentials is not None:
            self.port = self._server.add_secure_port(self.config.address, self.security.credentials)
            transport = "mutual TLS" if self.security.mutual_tls else "TLS"
        else:
            self.port = self._server.add_insecure_port(self.config.address)
            transport = "plaintext"
            logger.warning(
                "serving plaintext gRPC (no TLS) on %s%s; configure --tls-cert/--tls-key outside development",
                self.config.host,
                "" if is_loopback(self.config.host) else " because --insecure was given",
            )
        if self.port == 0:
            raise OSError(f"could not bind {self.config.address}")
        if self.security.tokens is None:
            logger.warning("no --auth-tokens file: reads are not authenticated")
        if self.config.metrics_port:
            try:
                self.metrics.start_http(self.config.host, self.config.metrics_port)
            except OSError as exc:
                raise OSError(
                    f"could not bind the metrics port {self.config.host}:{self.config.metrics_port}: {exc.strerror}"
                ) from exc
        if self.config.health_port:
            self._health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            if self._health_server.add_insecure_port(f"{self.config.host}:{self.config.health_port}") == 0:
                raise OSError(f"could not bind the health port {self.config.host}:{self.config.health_port}")
            await self._health_server.start()
            logger.info("grpc.health.v1 only, plaintext, on %s:%d", self.config.host, self.config.health_port)
        await self._server.start()
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
        if self._backend_watch is not None:
            self._backend_watch.cancel()
        if self.watcher is not None:
            await self.watcher.stop()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        logger.info("draining: %d read(s) in flight, grace %.0f s", self.servicer.in_flight, self.config.grace_s)
        await self._server.stop(self.config.grace_s)
        if self._health_server is not None:
            await self._health_server.stop(0)
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
    if not start.done():
        start.cancel()
    await server.stop()
    return 0
