"""Server lifecycle: build, load and warm up models, serve, drain on SIGTERM.

Health (standard grpc.health.v1) is NOT_SERVING until every model is loaded and warmed up. On SIGTERM
or SIGINT: health turns NOT_SERVING, new reads get UNAVAILABLE, reads in flight get ``grace_s`` to
finish, then the process exits 0.
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
from inference.api.interceptors import ErrorInterceptor
from inference.api.servicer import ReadingServicer
from inference.config import ServerConfig
from inference.modelrepo.registry import ModelRegistry
from inference.platform import select_device

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ReadingService"].full_name
HEALTH_SERVICES = ("", SERVICE_NAME)


class RadserveServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.device = select_device(config.device)
        self._io_executor = ThreadPoolExecutor(config.io_threads, thread_name_prefix="radserve-io")
        self.registry = ModelRegistry(self.device, self._io_executor)
        self.health = health.aio.HealthServicer()
        self.servicer = ReadingServicer(self.registry, config.limits, self._io_executor)
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ]
        self._server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=options)
        pb_grpc.add_ReadingServiceServicer_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server,
        )
        self.port: int | None = None

    async def _set_health(self, status: int) -> None:
        for service in HEALTH_SERVICES:
            await self.health.set(service, status)

    async def start(self) -> int:
        """Bind and start answering (health NOT_SERVING), then load and warm up the models, then SERVING."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self._server.add_insecure_port(self.config.address)
        if self.port == 0:
            raise OSError(f"could not bind {self.config.address}")
        await self._server.start()
        logger.info("listening on %s:%d (health NOT_SERVING until models are warm)", self.config.host, self.port)
        await self.registry.load_repository(self.config.models, warmup=self.config.warmup)
        if not self.registry.runners:
            logger.error("no model could be loaded from %s; health stays NOT_SERVING", self.config.models)
            return self.port
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        logger.info("serving %d model version(s) on %s", len(self.registry.runners), self.device)
        return self.port

    async def stop(self) -> None:
        """Drain: refuse new reads, let reads in flight finish within the grace period, then stop."""
        self.servicer.draining = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        logger.info("draining: %d read(s) in flight, grace %.0f s", self.servicer.in_flight, self.config.grace_s)
        await self._server.stop(self.config.grace_s)
        await self.registry.close(drain=False)
        self._io_executor.shutdown(wait=False, cancel_futures=True)
        logger.info("stopped")

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


async def serve(config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    server = RadserveServer(config)
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
