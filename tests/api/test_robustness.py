"""Start-up errors, health that follows progress, SIGTERM that ends the process, and the admission gates."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inference.api.admission import Admission, AdmissionConfig, MemoryBudget, client_key
from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.api.gen.radserve.v1 import reading_pb2_grpc as pb_grpc
from inference.errors import LimitExceededError, OverloadedError, ShuttingDownError
from inference.serverproc import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
SERVE = [sys.executable, "-m", "inference.cli", "serve", "--device", "cpu", "--metrics-port", "0"]


# -- clear start-up errors -----------------------------------------------------------------------------------------


def serve_error(args: list[str], cwd: Path = ROOT) -> tuple[int, list[str]]:
    done = subprocess.run([*SERVE, *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    return done.returncode, done.stderr.strip().splitlines()


@pytest.mark.server
def test_a_port_in_use_is_one_line_and_exit_2(model_repo):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, lines = serve_error(["--port", str(port), "--models", str(model_repo("chest_xray"))])
    assert code == 2
    assert lines == [
        f"error: cannot listen on 127.0.0.1:{port} (the port): Address already in use; is another server running?"
    ]


@pytest.mark.server
def test_a_missing_model_directory_is_one_line_and_exit_2(tmp_path):
    code, lines = serve_error(["--port", str(free_port()), "--models", str(tmp_path / "nowhere")])
    assert code == 2
    assert lines == [f"error: the model directory '{tmp_path / 'nowhere'}' does not exist or is not a directory"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("port: [50051\n", "is not valid YAML (line 2, column 1)"),
        ("max_in_flight: 0\n", "max_in_flight must be >= 1, got 0"),
        ("no_such_setting: 1\n", "unknown settings ['no_such_setting']"),
    ],
)
@pytest.mark.server
def test_a_bad_config_is_one_line_and_exit_2(tmp_path, text, message):
    config = tmp_path / "server.yaml"
    config.write_text(text)
    code, lines = serve_error(["--port", str(free_port()), "--config", str(config)])
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


# -- health follows progress; SIGTERM ends the process ------------------------------------------------------------


@pytest.mark.server
def test_health_is_not_serving_while_every_io_thread_is_stuck(model_repo):
    from inference.api.server import RadserveServer
    from inference.config import ServerConfig

    config = ServerConfig(
        port=free_port(),
        models=model_repo("chest_xray"),
        device="cpu",
        metrics_port=0,
        decode_workers=0,
        model_poll_interval_s=0,
        stall_timeout_s=1.0,
    )

    async def scenario() -> list[int]:
        server = RadserveServer(config)
        await server.start()
        release = threading.Event()
        seen = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)

                async def status() -> int:
                    return (await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)).status

                seen.append(await status())
                for _ in range(config.io_threads):  # every I/O thread on a job that makes no progress
                    server._io_executor.submit(release.wait, 60)
                for _ in range(100):
                    await asyncio.sleep(0.1)
                    if (current := await status()) != seen[-1]:
                        seen.append(current)
                        break
                release.set()
                for _ in range(50):
                    await asyncio.sleep(0.1)
                    if (current := await status()) != seen[-1]:
                        seen.append(current)
                        break
        finally:
            release.set()
            await server.stop()
        return seen

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert asyncio.run(scenario()) == [serving, not_serving, serving]


@pytest.mark.server
def test_sigterm_ends_the_server_within_its_grace_period_whatever_its_reads_do(tmp_path, model_repo):
    with ServerProcess(
        models=model_repo("chest_xray"), log_path=tmp_path / "server.log", extra_args=["--grace-s", "2"]
    ) as proc:
        channel = grpc.insecure_channel(proc.target)
        release = threading.Event()

        def idle():
            yield pb.ReadRequest(header=pb.ReadHeader(payload=pb.RAW, modality="DX"))
            release.wait(60)

        calls = [pb_grpc.ReadingServiceStub(channel).Read.future(idle()) for _ in range(8)]
        time.sleep(0.5)
        start = time.monotonic()
        proc.process.send_signal(signal.SIGTERM)
        code = proc.process.wait(30)
        elapsed = time.monotonic() - start
        release.set()
        channel.close()
    assert elapsed < 2 + 5 + 3, f"{elapsed:.1f} s"
    assert code == 0
    assert all(call.done() for call in calls)


def test_threads_stuck_in_a_library_call_do_not_keep_the_process_alive():
    script = (
        "import threading, time, sys\n"
        "from inference.api.server import exit_leaving_stuck_threads\n"
        "threading.Thread(target=time.sleep, args=(600,), name='stuck-decode').start()\n"
        "sys.exit(exit_leaving_stuck_threads(0))\n"
    )
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0 and time.monotonic() - start < 30


# -- the admission gates --------------------------------------------------------------------------------------


def test_client_key_is_the_tenant_or_the_peers_address():
    assert client_key("archive", "ipv4:10.0.0.1:5000") == "tenant archive"
    assert client_key(None, "ipv4:127.0.0.1:50312") == "peer 127.0.0.1"
    assert client_key(None, "ipv6:[::1]:50312") == "peer ::1"
    assert client_key(None, "unix:/tmp/s") == "peer unix"


def test_the_per_client_cap_and_the_upload_gate():
    admission = Admission(AdmissionConfig(max_in_flight=1, max_uploads=2, max_reads_per_client=2))
    with admission.read("peer a"), admission.read("peer a"):
        with pytest.raises(OverloadedError, match="peer a has 2 reads in progress, the per-client limit"):
            admission.read("peer a").__enter__()
        with (
            admission.read("peer b"),
            admission.upload(),
            admission.upload(),
            pytest.raises(OverloadedError, match="receiving 2 uploads, its limit"),
        ):
            admission.upload().__enter__()
    assert not admission.by_client and admission.uploading == 0
    admission.draining = True
    with pytest.raises(ShuttingDownError):
        admission.read("peer a").__enter__()


def test_memory_admission_waits_in_order_refuses_what_never_fits_and_times_out():
    async def scenario():
        admission = Admission(AdmissionConfig(max_in_flight=4, memory_budget_bytes=1000, max_admission_wait_s=1))
        with pytest.raises(LimitExceededError, match="more than this server's whole memory budget"):
            async with admission.compute(1001, None):
                pass
        order = []

        async def read(name: str, size: int, hold_s: float):
            async with admission.compute(size, None):
                order.append(name)
                await asyncio.sleep(hold_s)

        first = asyncio.ensure_future(read("first", 800, 0.3))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(read("second", 600, 0.0))  # waits for the first
        await asyncio.gather(first, second)
        assert order == ["first", "second"] and admission.memory.reserved_bytes == 0
        blocker = asyncio.ensure_future(read("blocker", 900, 2.0))
        await asyncio.sleep(0.05)
        with pytest.raises(OverloadedError, match=r"waited 0.5 s for memory"):
            async with admission.compute(500, time.monotonic() + 0.5):
                pass
        await blocker
        assert admission.memory.reserved_bytes == 0 and admission.computing == 0

    asyncio.run(scenario())


def test_reads_computing_while_they_upload_get_at_most_half_the_slots_and_memory_and_never_wait():
    async def scenario():
        admission = Admission(AdmissionConfig(max_in_flight=4, memory_budget_bytes=1000, max_admission_wait_s=1))
        with (
            admission.compute_while_uploading(100) as a,
            admission.compute_while_uploading(100) as b,
            admission.compute_while_uploading(100) as c,  # a third would hold more than half the slots
        ):
            assert (a, b, c) == (True, True, False)
            assert admission.computing == 2 and admission.memory.reserved_bytes == 200
            with admission.upload():  # a finished upload still finds slots
                async with admission.compute(100, None):
                    assert admission.computing == 3
        assert admission.computing == 0 and admission.memory.reserved_bytes == 0
        with admission.compute_while_uploading(501) as over_half:
            assert not over_half and admission.memory.reserved_bytes == 0
        blocker = asyncio.ensure_future(_hold(admission, 900, 0.3))
        await asyncio.sleep(0.05)
        waiter = asyncio.ensure_future(_hold(admission, 200, 0.0))  # waits for the blocker's memory
        await asyncio.sleep(0.05)
        with admission.compute_while_uploading(50) as overtaking:  # would fit, but a read is waiting
            assert not overtaking
        await asyncio.gather(blocker, waiter)
        one_slot = Admission(AdmissionConfig(max_in_flight=1, memory_budget_bytes=1000))
        with one_slot.compute_while_uploading(1) as granted:  # half of one slot is none
            assert not granted

    asyncio.run(scenario())


async def _hold(admission: Admission, size: int, hold_s: float) -> None:
    async with admission.compute(size, None):
        await asyncio.sleep(hold_s)


def test_a_budget_of_one_byte_is_the_smallest():
    with pytest.raises(ValueError, match="memory budget must be >= 1 byte"):
        MemoryBudget(0)
