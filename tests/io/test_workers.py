"""Decode worker processes: a decode that hangs or crashes takes its worker down, not the server (real processes)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest

from inference.errors import InvalidInputError
from inference.io.workers import DecodeJob, DecodeTimeoutError, DecodeWorkers, WorkerCrashedError


def hang(payload: bytes) -> None:
    """A reader stuck for good, as a codec looping on a crafted file would be (a C loop ignores threads' signals)."""
    while True:
        time.sleep(60)


def crash(payload: bytes) -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def refuse(payload: bytes) -> None:
    raise InvalidInputError(f"payload of {len(payload)} bytes refused")


RAW_JOB = DecodeJob(
    "inference.io.raw:read_raw",
    {"dtype": "int16", "shape": (4, 3, 2), "spacing_mm": (1.0, 1.0, 2.0), "modality": "CT"},
    single_payload=True,
)
RAW = np.arange(24, dtype="<i2").reshape(4, 3, 2)


@pytest.fixture
def workers():
    pool = DecodeWorkers(1, timeout_s=3.0)
    pool.start()
    yield pool
    pool.close()


def test_a_decode_comes_back_with_its_voxels_and_geometry(workers):
    volume = asyncio.run(workers.run(RAW_JOB, [RAW.tobytes()]))
    np.testing.assert_array_equal(volume.voxels, RAW.astype(np.float32))
    np.testing.assert_array_equal(volume.affine, np.diag([1.0, 1.0, 2.0, 1.0]))
    assert volume.modality == "CT"


def test_a_readers_error_comes_back_as_its_class_and_message(workers):
    with pytest.raises(InvalidInputError, match="payload of 5 bytes refused"):
        asyncio.run(workers.run(DecodeJob(f"{__name__}:refuse", single_payload=True), [b"12345"]))


def test_a_hanging_decode_is_killed_at_its_timeout_and_the_worker_replaced(workers):
    pid = workers.pids()[0]
    start = time.monotonic()
    with pytest.raises(DecodeTimeoutError, match="took more than 3 s, the decode_timeout_s limit"):
        asyncio.run(workers.run(DecodeJob(f"{__name__}:hang", single_payload=True), [b"x"]))
    assert time.monotonic() - start < 10
    assert workers.workers_replaced == 1
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the hung worker is gone
    volume = asyncio.run(workers.run(RAW_JOB, [RAW.tobytes()]))  # and a new one reads the next payload
    assert volume.shape == (4, 3, 2) and workers.pids() != [pid]


def test_a_cancelled_read_kills_its_decode(workers):
    async def cancel_soon():
        task = asyncio.ensure_future(workers.run(DecodeJob(f"{__name__}:hang", single_payload=True), [b"x"]))
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    pid = workers.pids()[0]
    asyncio.run(cancel_soon())
    deadline = time.monotonic() + 5
    while workers.workers_replaced == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert workers.workers_replaced == 1 and pid not in workers.pids()


def test_a_decoder_crashing_fails_its_read_alone(workers):
    with pytest.raises(WorkerCrashedError, match="the decoder crashed on it"):
        asyncio.run(workers.run(DecodeJob(f"{__name__}:crash", single_payload=True), [b"x"]))
    assert asyncio.run(workers.run(RAW_JOB, [RAW.tobytes()])).shape == (4, 3, 2)


def test_the_deadline_of_the_read_bounds_its_decode(workers):
    from inference.errors import DeadlineExceededError

    with pytest.raises(DeadlineExceededError, match="deadline passed while its payload was decoded"):
        asyncio.run(workers.run(DecodeJob(f"{__name__}:hang", single_payload=True), [b"x"], time.monotonic() + 0.5))
