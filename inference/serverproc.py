"""Run `radserve serve` in a child process: for tests, benchmarks and the soak run.

The child gets a free port on the loopback interface; ``start`` returns once gRPC health says SERVING.
Metrics are off unless ``metrics_port`` is given (several test servers run side by side); for a TLS server
pass ``channel_credentials`` (``inference.client.channel_credentials``) so that the health check can connect.
The memory a server process holds, its decode workers included (:func:`rss_mb`, :class:`RssMonitor`), is read
from Linux's /proc, for the soak run's leak check.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port(host: str = "127.0.0.1") -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def health_status(
    target: str, service: str = "", timeout_s: float = 2.0, credentials: grpc.ChannelCredentials | None = None
) -> int | None:
    """The health status of ``service`` at ``target``, or None when the server does not answer."""
    channel = grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(target, credentials)
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError:
            return None
    return response.status


class ServerProcess:
    def __init__(
        self,
        *,
        models: Path = Path("models"),
        device: str = "cpu",
        log_path: Path | None = None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        metrics_port: int = 0,
        channel_credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.host = host
        self.port = free_port(host)
        self.metrics_port = metrics_port
        self.channel_credentials = channel_credentials
        self.log_path = log_path
        self.args = [sys.executable, "-m", "inference.cli", "serve", "--host", host, "--port", str(self.port)]
        self.args += ["--models", str(models), "--device", device, "--metrics-port", str(metrics_port)]
        self.args += [*(extra_args or [])]
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self._log = None

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def spawn(self) -> ServerProcess:
        """Start the child and return at once (health answers NOT_SERVING while models load)."""
        self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        return self

    def start(self, timeout_s: float = 180.0) -> ServerProcess:
        """Spawn and wait until health says SERVING."""
        return self.spawn().wait_serving(timeout_s)

    def wait_serving(self, timeout_s: float = 180.0) -> ServerProcess:
        """Wait until health says SERVING (after :meth:`spawn`); stop the child and raise if it does not."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with code {self.process.returncode} during start-up")
            if (
                health_status(self.target, credentials=self.channel_credentials)
                == health_pb2.HealthCheckResponse.SERVING
            ):
                return self
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not SERVING within {timeout_s} s")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then wait; returns the exit code (SIGKILL after ``timeout_s``)."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- its memory (Linux /proc) -----------------------------------------------------------------------------


def process_start_ticks(pid: int) -> int | None:
    """The start time (clock ticks since boot) of ``pid``; None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name


def _own_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(c) for c in task.read_text().split()]
        except OSError:
            continue
    return found


def rss_mb(pid: int) -> float | None:
    """VmRSS of ``pid`` and of its descendants (the decode workers), in MB; None when ``pid`` is gone."""
    own = _own_rss_mb(pid)
    if own is None:
        return None
    return own + sum(rss_mb(child) or 0.0 for child in _children(pid))


class RssMonitor(threading.Thread):
    """The peak :func:`rss_mb` of a process, sampled every ``interval_s`` until :meth:`stop`."""

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        super().__init__(daemon=True, name="rss-monitor")
        self.pid = pid
        self.interval_s = interval_s
        self.peak = 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            value = rss_mb(self.pid)
            if value is not None:
                self.peak = max(self.peak, value)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
