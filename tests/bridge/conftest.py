"""The bridge's end-to-end set-up: a real Orthanc with DICOMweb, the bridge as a child process, journal look-ups."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from inference.bridge.orthanc import OrthancProcess, free_port, orthanc_available

try:  # the bridge's own dependencies (radserve[client]); the GPU machine, which collects the cuda tests, lacks them
    import dicomweb_client  # noqa: F401
except ImportError:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancProcess]:
    """An empty Orthanc with its DICOMweb plugin, on a free loopback port, with its own storage. One per test: each
    bridge test starts from an empty journal, which would read again what an earlier test's bridge read (Orthanc
    starts in about a second)."""
    if not orthanc_available():
        if os.environ.get("CI"):
            pytest.fail("Orthanc with its DICOMweb plugin is not installed; .ci/run installs orthanc orthanc-dicomweb")
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt: orthanc orthanc-dicomweb)")
    with OrthancProcess(tmp_path_factory.mktemp("orthanc")) as archive:
        yield archive


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def journal_rows(state_dir: Path) -> dict[str, dict[str, Any]]:
    """Each study's row, by UID, read from the journal without locking it (a read-only connection)."""
    path = state_dir / "journal.sqlite3"
    if not path.exists():
        return {}
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
        db.row_factory = sqlite3.Row
        try:
            return {r["study_uid"]: dict(r) for r in db.execute("SELECT * FROM studies")}
        except sqlite3.OperationalError:  # the schema is being created
            return {}


class BridgeProcess:
    """`radserve bridge` in a child process, its output in ``log_path`` (appended across restarts)."""

    def __init__(self, archive: OrthancProcess, server_target: str, state_dir: Path, *extra: str) -> None:
        self.state_dir = state_dir
        self.log_path = state_dir.parent / f"{state_dir.name}.log"
        self.metrics_port = free_port()
        self.args = [
            sys.executable, "-m", "inference.cli", "bridge",
            "--dicomweb", archive.dicomweb_url, "--server", server_target, "--state", str(state_dir),
            "--poll-s", "1", "--stable-s", "1.5", "--retry-backoff-s", "1", "--retry-max-backoff-s", "4",
            "--metrics-port", str(self.metrics_port),
            *extra,
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, python: str | None = None) -> BridgeProcess:
        args = list(self.args)
        if python is not None:
            args[0] = python
        # A thin install's interpreter runs from outside the checkout, so that it imports its own copy of radserve.
        cwd = self.state_dir.parent if python is not None else None
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} if python is not None else None
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        return self

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def terminate(self, timeout_s: float = 60.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def rows(self) -> dict[str, dict[str, Any]]:
        return journal_rows(self.state_dir)
