"""The test tiers hold: the guard of tests/conftest.py recognises what starts a server, and fails a test that starts
one without the `server` marker, so `make test-unit` (``-m "not server and not slow"``) never starts one."""

from __future__ import annotations

import asyncio
import sys

import pytest
from server_guard import starts_a_server

PY = sys.executable


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([PY, "-m", "inference.cli", "serve", "--port", "0"], True),
        ([PY, "-m", "inference.cli", "triton", "serve", "--grpc-port", "8001"], True),
        ([PY, "-m", "inference.cli", "soak", "--spawn"], True),
        ([PY, "-m", "benchmarks.run", "--profile", "quick"], True),
        (["/usr/sbin/Orthanc", "orthanc.json"], True),
        ([PY, "-m", "inference.cli", "read", "study/", "--server", "127.0.0.1:1"], False),
        ([PY, "-m", "inference.cli", "soak", "--server-pid", "1"], False),
        (["dciodvfy", "seg.dcm"], False),
    ],
)
def test_the_guard_knows_a_server_process_by_its_arguments(args, expected):
    assert starts_a_server(args) is expected


def test_an_unmarked_test_that_starts_the_server_in_process_fails():
    from inference.api.server import RadserveServer
    from inference.config import ServerConfig

    async def start() -> None:  # built inside the loop, as grpc.aio asks
        await RadserveServer(ServerConfig(port=0, metrics_port=0)).start()

    with pytest.raises(pytest.fail.Exception, match="without the `server` marker"):
        asyncio.run(start())


def test_an_unmarked_test_that_spawns_a_server_fails(tmp_path):
    import subprocess

    with pytest.raises(pytest.fail.Exception, match="starts a server process"):
        subprocess.Popen([PY, "-m", "inference.cli", "serve", "--models", str(tmp_path)])
