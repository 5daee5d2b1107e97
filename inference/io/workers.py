"""Decoding in worker processes that can be killed: a decode that overruns its time, or whose read is cancelled,
takes its worker down with it, and a new worker takes its place.

A thread cannot be interrupted inside a C codec (openjpeg, libjpeg, CharLS, zlib) or a loop a crafted file sends
round forever (issue #12's deflated file wedged a ``radserve-io`` thread at 100 % of a core, for good). A process
can be killed. :class:`DecodeWorkers` keeps ``n_workers`` processes, each driven by one thread of its own, and runs
each job in one of them:

* the job (which reader, its arguments, the limits) and the payload bytes go down a pipe; the worker decodes with
  the same readers and limits as a thread would, and sends back the Volume's geometry, source references and
  warnings, then its voxels as raw bytes straight into an array allocated here (no pickling of voxels);
* a job that has not answered within its time (``timeout_s``, or less when the read's deadline is nearer) gets
  :class:`DecodeTimeoutError` (RESOURCE_EXHAUSTED naming ``decode_timeout_s``); one whose read is cancelled stops
  waiting at once; either way the worker is killed (SIGKILL) and replaced before the thread takes the next job;
* a worker that dies (a codec crashing on a crafted file) fails its job with InvalidInputError and is replaced;
* readers' own errors (:class:`~inference.errors.RadserveError`) come back as the same class and message.

Workers are started with ``spawn`` (the server has gRPC and torch threads, which ``fork`` would copy half-way), import
only numpy, pydicom and nibabel, and ignore SIGINT (the server stops them). Their memory is the decoded study's:
at most ``InputLimits.max_voxels`` float32 plus the payload and what the inflate budget allows.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inference.errors import DeadlineExceededError, InvalidInputError, LimitExceededError, RadserveError, escape_text
from inference.io.base import VolumeReader
from inference.io.volume import Volume

logger = logging.getLogger(__name__)

_POLL_S = 0.05
_KILL_WAIT_S = 5.0


@dataclass(frozen=True)
class DecodeJob:
    """What a worker runs: ``reader``, a :class:`VolumeReader` (what the server sends), or a ``module:function``
    taking the payloads as its first argument, with its keyword arguments. Payloads travel separately, as raw bytes."""

    reader: VolumeReader | str
    kwargs: dict[str, Any] = field(default_factory=dict)
    single_payload: bool = False  # the reader takes one payload (NIfTI), not a list of them (DICOM files)
    request_id: str = "-"  # for the worker's log lines


class DecodeTimeoutError(LimitExceededError):
    """A decode ran past ``decode_timeout_s`` (or its read's deadline); its worker was killed."""


class WorkerCrashedError(InvalidInputError):
    """The worker died while decoding (a codec crashing on the payload)."""


class _WorkerLogFormatter(logging.Formatter):
    """The server's text log line (``inference.api.metrics.TEXT_FORMAT``), or its JSON line, for a worker's records: one
    line each, every message escaped, the job's request id."""

    def __init__(self, log_format: str) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s")
        self.json = log_format == "json"

    def format(self, record: logging.LogRecord) -> str:
        record.request_id = _request_id
        if self.json:
            ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
            body = {"ts": ts, "level": record.levelname, "logger": record.name, "request_id": _request_id}
            return json.dumps({**body, "msg": record.getMessage()})
        record.message = escape_text(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        return self.formatMessage(record)


_request_id = "-"


def _worker_main(conn: Any, log_level: str = "INFO", log_format: str = "text") -> None:
    """A worker process: jobs in, Volumes (or errors) out, until the pipe closes. Its log lines go to the stderr it
    shares with the server, formatted as the server's."""
    global _request_id
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_WorkerLogFormatter(log_format))
    logging.basicConfig(level=log_level.upper(), handlers=[handler], force=True)
    while True:
        try:
            job, n_payloads = conn.recv()
            payloads = [conn.recv_bytes() for _ in range(n_payloads)]
        except (EOFError, OSError):
            return
        _request_id = job.request_id
        try:
            volume = _run_reader(job, payloads)
            payloads = None
            voxels = np.ascontiguousarray(volume.voxels, dtype=np.float32)
            meta = (voxels.shape, volume.affine, volume.modality, volume.source, volume.warnings)
            conn.send(("ok", meta))
            conn.send_bytes(memoryview(voxels).cast("B"))
        except RadserveError as exc:
            conn.send(("error", (type(exc).__module__, type(exc).__qualname__, exc.message)))
        except MemoryError:
            conn.send(("error", ("inference.errors", "LimitExceededError", "decoding ran out of memory")))
        except Exception as exc:  # a reader bug: the parent logs the stack and answers INTERNAL
            conn.send(("bug", (type(exc).__qualname__, _stack_without_messages(exc))))
        finally:
            payloads = volume = voxels = None  # free the study before waiting for the next job


def _run_reader(job: DecodeJob, payloads: list[bytes]) -> Volume:
    if isinstance(job.reader, VolumeReader):
        return job.reader.read(payloads[0] if job.reader.single_payload else payloads)
    module, _, name = job.reader.partition(":")
    reader = getattr(importlib.import_module(module), name)
    return reader(payloads[0] if job.single_payload else payloads, **job.kwargs)


def _stack_without_messages(exc: BaseException) -> str:
    """The stack of an unexpected reader error, its message withheld (library messages may quote patient data)."""
    lines = traceback.format_tb(exc.__traceback__)
    return "".join(lines) + f"{type(exc).__module__}.{type(exc).__qualname__}: <message withheld>"


def _error_class(module: str, qualname: str) -> type[RadserveError]:
    try:
        cls = getattr(importlib.import_module(module), qualname)
    except (ImportError, AttributeError):
        return InvalidInputError
    return cls if isinstance(cls, type) and issubclass(cls, RadserveError) else InvalidInputError


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, context: Any, log_level: str, log_format: str) -> None:
        self.conn, child = context.Pipe(duplex=True)
        self.process = context.Process(
            target=_worker_main, args=(child, log_level, log_format), name="radserve-decode", daemon=True
        )
        self.process.start()
        child.close()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(_KILL_WAIT_S)
        self.conn.close()


class DecodeWorkers:
    """``n_workers`` decode processes; :meth:`run` decodes one payload in one of them. See the module docstring."""

    def __init__(self, n_workers: int, timeout_s: float, *, log_level: str = "INFO", log_format: str = "text") -> None:
        if n_workers < 1:
            raise ValueError(f"n_workers must be >= 1, got {n_workers!r}")
        if not timeout_s > 0:
            raise ValueError(f"decode timeout_s must be > 0, got {timeout_s!r}")
        self.n_workers = n_workers
        self.timeout_s = timeout_s
        self.log_level, self.log_format = log_level, log_format
        self._context = multiprocessing.get_context("spawn")
        self._executor = ThreadPoolExecutor(n_workers, thread_name_prefix="radserve-decode")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._closed = False
        self.busy_since: dict[int, float] = {}  # thread id -> monotonic start of its current job (health)
        self.jobs_done = 0
        self.workers_replaced = 0

    def start(self) -> None:
        """Start every worker now (each takes about a second to import its readers), not on the first read."""
        futures = [self._executor.submit(self._worker) for _ in range(self.n_workers)]
        for future in futures:
            future.result()

    def _worker(self) -> _Worker:
        worker = getattr(self._local, "worker", None)
        if worker is None or not worker.process.is_alive():
            if worker is not None:
                self._retire(worker)
            worker = _Worker(self._context, self.log_level, self.log_format)
            with self._lock:
                self._workers.append(worker)
            self._local.worker = worker
        return worker

    def _retire(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)
        self._local.worker = None

    def pids(self) -> list[int]:
        with self._lock:
            return [w.process.pid for w in self._workers if w.process.pid is not None]

    async def run(
        self, job: DecodeJob, payloads: Sequence[bytes | bytearray | memoryview], deadline_s: float | None = None
    ) -> Volume:
        """Decode ``payloads`` with ``job`` in a worker; raises what the reader raised, DecodeTimeoutError or
        WorkerCrashedError. Cancelling the awaiting task kills the worker."""
        if self._closed:
            raise RuntimeError("the decode workers are closed")
        cancelled = threading.Event()
        timeout_s = self.timeout_s
        limited_by_deadline = False
        if deadline_s is not None and deadline_s - time.monotonic() < timeout_s:
            timeout_s, limited_by_deadline = max(deadline_s - time.monotonic(), 0.0), True
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(
            self._executor, self._run, job, payloads, timeout_s, limited_by_deadline, cancelled
        )
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            cancelled.set()  # the thread kills the worker and returns
            raise

    def _run(
        self,
        job: DecodeJob,
        payloads: Sequence[bytes | bytearray | memoryview],
        timeout_s: float,
        limited_by_deadline: bool,
        cancelled: threading.Event,
    ) -> Volume:
        thread = threading.get_ident()
        start = time.monotonic()
        self.busy_since[thread] = start
        worker = self._worker()
        try:
            try:
                worker.conn.send((job, len(payloads)))
                for payload in payloads:
                    worker.conn.send_bytes(payload)
                deadline = start + timeout_s
                while not worker.conn.poll(_POLL_S):
                    if cancelled.is_set():
                        self._replace(worker, "its read was cancelled")
                        raise asyncio.CancelledError
                    if time.monotonic() > deadline:
                        self._replace(worker, f"it ran past {timeout_s:.1f} s")
                        if limited_by_deadline:
                            raise DeadlineExceededError("the read's deadline passed while its payload was decoded")
                        raise DecodeTimeoutError(
                            f"decoding the payload took more than {timeout_s:g} s, the decode_timeout_s limit; the "
                            "decode was stopped"
                        )
                status, body = worker.conn.recv()
                if status == "ok":
                    shape, affine, modality, source, warnings = body
                    voxels = np.empty(shape, dtype=np.float32)
                    if voxels.nbytes:
                        worker.conn.recv_bytes_into(memoryview(voxels).cast("B"))
                    else:
                        worker.conn.recv_bytes()
                    return Volume(voxels=voxels, affine=affine, modality=modality, source=source, warnings=warnings)
            except (EOFError, BrokenPipeError, ConnectionResetError):
                code = worker.process.exitcode
                self._replace(worker, f"it died (exit code {code})")
                raise WorkerCrashedError(
                    "the payload could not be decoded: the decoder crashed on it (its worker process died)"
                ) from None
            if status == "error":
                module, qualname, message = body
                raise _error_class(module, qualname)(message)
            name, text = body
            logger.error("decode worker: a reader failed with an unexpected %s\n%s", escape_text(name), text)
            raise RuntimeError(f"a reader failed in its worker with an unexpected {name}")
        finally:
            self.busy_since.pop(thread, None)
            self.jobs_done += 1

    def _replace(self, worker: _Worker, why: str) -> None:
        logger.warning("decode worker (pid %s) killed and replaced: %s", worker.process.pid, why)
        self._retire(worker)
        self.workers_replaced += 1

    def stalled_for_s(self) -> float:
        """How long every worker has been busy with the job it is on (0 when one is idle)."""
        busy = list(self.busy_since.values())
        if len(busy) < self.n_workers:
            return 0.0
        return time.monotonic() - max(busy)

    def close(self) -> None:
        """Kill every worker (a decode under way fails) and stop the threads without waiting for them."""
        self._closed = True
        with self._lock:
            workers = list(self._workers)
        for worker in workers:
            try:
                if worker.process.is_alive():
                    os.kill(worker.process.pid, signal.SIGKILL)
            except (OSError, TypeError):
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)
        for worker in workers:
            worker.process.join(_KILL_WAIT_S)


__all__ = ["DecodeJob", "DecodeTimeoutError", "DecodeWorkers", "WorkerCrashedError"]
