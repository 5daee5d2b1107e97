"""The bridge's loop: a poller that finds studies and waits for them to be quiet, and workers that read and store.

One poller (the thread that calls :meth:`Bridge.run`) lists the archive's studies every ``poll_s``; a new study is
``discovered``, a study whose instance count has not changed for ``stable_s`` is ``queued``. ``concurrency`` worker
threads claim queued studies from the journal, STAT first, then in the order they became stable, and for each one:

1. ask radserve which model reads which modality (ListModels, cached for ``poll_s``), list the study's series
   (QIDO-RS), fetch the candidates' metadata (WADO-RS) and choose what each model reads (``selection``);
2. retrieve the chosen instances (WADO-RS) and stream them to radserve (ReadStreamed, asking for SR and SEG, with
   the study's priority);
3. write each output into ``--state`` (fsynced) and record it: the study is ``storing``;
4. for each output, ask the archive (QIDO-RS) whether its SOPInstanceUID is already in the study, store it
   (STOW-RS) only if not, and mark the study ``stored``.

A retriable failure (radserve UNAVAILABLE, DEADLINE_EXCEEDED, an incomplete answer; the archive's 5xx, 408, 429,
timeouts, connection errors) sends the study back to the queue after a back-off that doubles per attempt; any other
fails the study with its status and message, and the others go on. SIGTERM stops the poller and the claims; studies
in progress get ``grace_s`` to finish, and any still running then are picked up again at the next start.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.bridge.archive import (
    SERIES_UID,
    Archive,
    ArchiveError,
    DicomWebArchive,
    StudyListing,
    first_value,
    text_values,
)
from inference.bridge.config import BridgeConfig
from inference.bridge.failures import BridgeError, classify, printable
from inference.bridge.journal import ROUTINE, STAT, TERMINAL, Journal, OutputRow, State, StudyRow, hash_uid
from inference.bridge.metrics import BridgeMetrics, audit
from inference.bridge.outputs import OUTPUT_KINDS, fsync_write, output_uids
from inference.bridge.selection import SeriesChoice, candidates, choose_series, series_exclusion
from inference.client import ReadingClient

logger = logging.getLogger(__name__)


@dataclass
class ReadResult:
    outputs: list[OutputRow]
    findings: int
    models: list[str]
    # seconds by stage: choose (series listing, metadata, choice), retrieve (WADO-RS), read (the ReadStreamed call),
    # server (the server's own total, within read), keep (outputs written to the state directory)
    stages_s: dict[str, float]


def _priority_name(priority: int) -> str:
    return "STAT" if priority == STAT else "ROUTINE"


class Bridge:
    """``run`` blocks until ``stop`` (SIGTERM) and the drain. ``archive_factory`` makes one :class:`Archive` per
    thread (requests sessions are not shared across threads); ``client`` is the radserve client (thread-safe)."""

    def __init__(
        self,
        config: BridgeConfig,
        *,
        archive_factory: Callable[[], Archive] | None = None,
        client: ReadingClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.clock = clock
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = self._lock_state_dir(config.state_dir)
        self.journal = Journal(config.journal_path)
        self.archive_factory = archive_factory or (
            lambda: DicomWebArchive(
                config.dicomweb_url,
                token=config.dicomweb_token,
                token_file=config.dicomweb_token_file,
                basic_auth=config.dicomweb_basic_auth,
                ca=config.dicomweb_ca,
                timeout_s=config.http_timeout_s,
                lookback_days=config.lookback_days,
                page_size=config.page_size,
                page_overlap=config.page_overlap,
            )
        )
        self.client = client or ReadingClient(
            config.server, ca=config.ca, cert=config.cert, key=config.key, token=config.token
        )
        self.metrics = BridgeMetrics(self.journal.state_counts)
        self._stop = threading.Event()
        self._wake = threading.Condition()
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()
        self._local = threading.local()
        self._routing: tuple[float, dict[str, str]] | None = None
        self._routing_lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self._priority_fields = sorted({rule.attribute for rule in config.priority})

    @staticmethod
    def _lock_state_dir(state_dir: Path) -> int:
        fd = os.open(state_dir / "bridge.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"another bridge is running on the state directory {state_dir}") from None
        return fd

    @property
    def archive(self) -> Archive:
        """This thread's archive client."""
        if not hasattr(self._local, "archive"):
            self._local.archive = self.archive_factory()
        return self._local.archive

    # -- lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Recover the journal and start the workers (``run`` calls it; tests may poll by hand)."""
        recovered = self.journal.recover(self.clock())
        if recovered:
            logger.info("%d studies interrupted while being read are queued again", recovered)
        self._remove_stray_outputs()
        for index in range(self.config.concurrency):
            worker = threading.Thread(target=self._work, name=f"bridge-worker-{index}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def run(self) -> int:
        """Poll until :meth:`stop`, then drain. Returns 0 when every study in progress finished within ``grace_s``."""
        if self.config.metrics_port:
            self.metrics.serve(self.config.metrics_port, self.config.metrics_host)
        self.start()
        logger.info(
            "bridge running: polling every %.1f s, stable after %.1f s, %d workers",
            self.config.poll_s,
            self.config.stable_s,
            self.config.concurrency,
        )
        failing: str | None = None
        while not self._stop.is_set():
            try:
                self.poll_once()
                if failing is not None:
                    logger.info("polling the archive again after %s", failing)
                failing = None
            except Exception as exc:  # a poll that fails is tried again at the next one; said once per outage
                error = classify(exc)
                logger.log(
                    logging.WARNING if failing != error.status else logging.DEBUG,
                    "poll failed: %s: %s",
                    error.status,
                    error.message,
                )
                failing = error.status
            self._stop.wait(self.config.poll_s)
        return self.drain()

    def stop(self) -> None:
        """Stop polling and claiming (SIGTERM); ``run`` then drains."""
        self._stop.set()
        with self._wake:
            self._wake.notify_all()

    def drain(self) -> int:
        with self._busy_lock:
            in_progress = len(self._busy)
        logger.info("stopping: no new studies; %d in progress get %.0f s to finish", in_progress, self.config.grace_s)
        deadline = time.monotonic() + self.config.grace_s
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        left = [w.name for w in self._workers if w.is_alive()]
        if left:
            logger.warning(
                "%d studies still in progress after the %.0f s grace; they resume at the next start",
                len(left),
                self.config.grace_s,
            )
            return 1
        logger.info("bridge drained")
        self.close()
        return 0

    def close(self) -> None:
        """Close the journal and release the state directory (after ``drain``, or for a bridge never started)."""
        self.journal.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _remove_stray_outputs(self) -> None:
        """Output files no waiting output refers to (left by a crash between storing and deleting them)."""
        root = self.config.outputs_dir
        if not root.is_dir():
            return
        waiting = {
            Path(o.path)
            for s in self.journal.studies()
            if s.state == State.STORING
            for o in self.journal.outputs(s.study_uid)
            if not o.stored
        }
        for path in root.rglob("*"):
            if path.is_file() and path not in waiting:
                path.unlink()
        for folder in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()

    # -- the poller -------------------------------------------------------------------------------------------

    def study_priority(self, attributes: dict[str, Any]) -> int:
        for rule in self.config.priority:
            if rule.matches(text_values(attributes, rule.tag)):
                return STAT if rule.priority == "STAT" else ROUTINE
        return ROUTINE

    def poll_once(self) -> None:
        """One poll: new studies (recorded in one transaction), changed counts, studies now stable."""
        listing: Sequence[StudyListing] = self.archive.list_studies(self._priority_fields)
        now = self.clock()
        known = self.journal.counts()
        new = []
        for study in listing:
            priority = self.study_priority(study.attributes)
            if study.uid not in known:
                new.append((study.uid, study.instances, priority))
            elif known[study.uid] != study.instances:
                self._changed(study, priority, now)
        if new:
            self.journal.discover(new, now)
            self.metrics.discovered.inc(len(new))
            for uid, instances, priority in new:
                audit("discovered", hash_uid(uid), priority=_priority_name(priority), instances=instances)
        if self.journal.promote_stable(now, self.config.stable_s):
            with self._wake:
                self._wake.notify_all()

    def _changed(self, study: StudyListing, priority: int, now: float) -> None:
        """A known study whose instance count changed. A finished one is read again only if an image series a model
        reads arrived: radserve's own SR and SEG (their series are in the journal), and whatever the series rules
        leave out, never trigger a read. When that cannot be decided now (radserve or the archive unreachable), the
        count is left as it was, so the next poll looks again."""
        row = self.journal.get(study.uid)
        arrived: list[dict[str, Any]] = []
        if row is not None and row.state in TERMINAL:
            seen = set(json.loads(row.series_seen)) if row.series_seen else set()
            try:
                routed = self.routed()
                arrived = [
                    s
                    for s in self.archive.list_series(study.uid)
                    if str(first_value(s, SERIES_UID, "")) not in seen
                    and series_exclusion(s, routed, self.config.series, seen) is None
                ]
            except (grpc.RpcError, ArchiveError) as exc:
                logger.debug("study %s changed; looked at again next poll (%s)", row.study_hash, type(exc).__name__)
                return
        self.journal.changed(study.uid, study.instances, priority, now)
        if arrived:
            self.journal.reopen(study.uid, now)
            audit("reopened", hash_uid(study.uid), new_series=len(arrived))

    # -- the workers ------------------------------------------------------------------------------------------

    def _claim(self) -> StudyRow | None:
        with self._busy_lock:
            row = self.journal.claim(self.clock(), self._busy)
            if row is not None:
                self._busy.add(row.study_uid)
            return row

    def work_one(self) -> StudyRow | None:
        """Claim the next study and work on it (see :meth:`process`); returns it, or None when none is due."""
        row = self._claim()
        if row is None:
            return None
        try:
            self.process(row)
        finally:
            with self._busy_lock:
                self._busy.discard(row.study_uid)
        return row

    def _work(self) -> None:
        while not self._stop.is_set():
            if self.work_one() is None:
                due = self.journal.next_due()
                wait_s = self.config.poll_s if due is None else min(self.config.poll_s, max(0.05, due - self.clock()))
                with self._wake:
                    self._wake.wait(wait_s)

    def process(self, row: StudyRow) -> None:
        """Work on one claimed study until it is stored, skipped, failed or scheduled for a retry."""
        study_hash = row.study_hash
        started = time.monotonic()
        stages: dict[str, float] = {}
        try:
            if row.state != State.STORING:
                result = self._read(row)
                if result is None:
                    return
                self.metrics.read.inc()
                stages = result.stages_s
            begun = time.monotonic()
            stored, present = self._store(row.study_uid)
            stages["store"] = time.monotonic() - begun
        except Exception as exc:  # every failure of a study is recorded; the bridge goes on
            self._failed(row, classify(exc))
            return
        for stage, seconds in stages.items():
            self.metrics.stages.labels(stage).observe(seconds)
        now = self.clock()
        self.journal.finish(row.study_uid, State.STORED, now)
        self.metrics.stored.inc()
        lag_s = now - row.stable_at if row.stable_at else None
        if lag_s is not None:
            self.metrics.lag.labels(row.priority_name).observe(lag_s)
        audit(
            "stored",
            study_hash,
            priority=row.priority_name,
            attempts=row.attempts + 1,
            stored=stored,
            already_present=present,
            work_s=round(time.monotonic() - started, 2),
            stable_to_stored_s=round(lag_s, 2) if lag_s is not None else None,
            **{f"{stage}_s": round(seconds, 2) for stage, seconds in stages.items()},
        )
        self._remove_outputs(row.study_uid)

    def routed(self) -> dict[str, str]:
        """Modality -> model name, as the server routes a read naming no model (ListModels, cached ``poll_s``)."""
        with self._routing_lock:
            if self._routing is None or time.monotonic() - self._routing[0] > self.config.poll_s:
                response = self.client.list_models(timeout_s=min(30.0, self.config.read_timeout_s))
                routed = {m.upper(): name.split(":", 1)[0] for m, name in response.default_models.items()}
                self._routing = (time.monotonic(), routed)
            return dict(self._routing[1])

    def _read(self, row: StudyRow) -> ReadResult | None:
        started = time.monotonic()
        routed = self.routed()
        archive = self.archive
        series = archive.list_series(row.study_uid)
        own = {o.series_uid for o in self.journal.outputs(row.study_uid)}
        wanted = candidates(series, routed, self.config.series, own)
        metadata = {uid: archive.series_metadata(row.study_uid, uid) for uid in wanted}
        selection = choose_series(series, metadata, routed, self.config.series, own)
        series_seen = [str(first_value(s, SERIES_UID, "")) for s in series]
        if not selection.choices:
            self.journal.finish(
                row.study_uid,
                State.SKIPPED,
                self.clock(),
                status="NOTHING_TO_READ",
                message=printable(selection.nothing_to_read(), 2000),
                choice=selection.describe(),
                series_seen=series_seen,
            )
            self.metrics.skipped.inc()
            audit("skipped", row.study_hash, series=len(series))
            return None
        stages = {"choose": time.monotonic() - started, "retrieve": 0.0, "read": 0.0, "server": 0.0, "keep": 0.0}
        outputs: list[OutputRow] = []
        findings = 0
        for choice in selection.choices:
            answer = self._read_one(row, choice, archive, stages)
            findings += len(answer.findings)
            begun = time.monotonic()
            outputs += self._keep_outputs(row, answer)
            stages["keep"] += time.monotonic() - begun
        self.journal.record_outputs(row.study_uid, outputs, selection.describe(), series_seen, self.clock())
        return ReadResult(outputs, findings, [c.model for c in selection.choices], stages)

    def _read_one(
        self, row: StudyRow, choice: SeriesChoice, archive: Archive, stages: dict[str, float]
    ) -> pb.ReadResponse:
        begun = time.monotonic()
        files = archive.retrieve(row.study_uid, choice.series_uid, choice.sop_uids)
        stages["retrieve"] += time.monotonic() - begun
        request_id = f"bridge-{row.study_hash}-{row.attempts + 1}-{random.getrandbits(24):06x}"
        logger.info(
            "study %s: reading %d images with %s (%s, request %s)",
            row.study_hash,
            len(files),
            choice.model,
            row.priority_name,
            request_id,
        )
        # All of the chosen series' instances: a model that reads progressively starts on its slabs as they upload.
        expected = {"expected_instances": len(files)} if files else {}
        begun = time.monotonic()
        answer = self.client.read_streamed(
            files,
            model=choice.model,
            priority=row.priority,
            request_id=request_id,
            series_instance_uid=choice.series_uid,
            outputs=[pb.FINDINGS, pb.DICOM_SR, pb.DICOM_SEG],
            timeout_s=self.config.read_timeout_s,
            **expected,
        )
        stages["read"] += time.monotonic() - begun
        stages["server"] += answer.timing_ms.get("total", 0.0) / 1000.0
        return answer

    def _keep_outputs(self, row: StudyRow, answer: pb.ReadResponse) -> list[OutputRow]:
        """Write each DICOM output of an answer into the state directory (fsynced) and describe it."""
        kept = []
        for field_name, kind in OUTPUT_KINDS.items():
            data = getattr(answer, field_name)
            if not data:
                continue
            study_uid, series_uid, sop_uid = output_uids(data)
            if study_uid != row.study_uid:
                raise BridgeError(
                    "INVALID_OUTPUT", f"radserve's {kind} names another study than the one read", retriable=False
                )
            path = self.config.outputs_dir / row.study_hash / f"{kind.lower()}-{hash_uid(sop_uid)}.dcm"
            fsync_write(path, data)
            kept.append(OutputRow(row.study_uid, sop_uid, series_uid, kind, str(path), 0))
        return kept

    def _store(self, study_uid: str) -> tuple[int, int]:
        """Store each output not stored yet, unless the archive has it already. Returns (stored, already there)."""
        archive = self.archive
        stored = present = 0
        for output in self.journal.outputs(study_uid):
            if output.stored:
                continue
            already_present = archive.has_instance(study_uid, output.series_uid, output.sop_uid)
            if already_present:
                present += 1
            else:
                archive.store(study_uid, Path(output.path).read_bytes())
                stored += 1
            self.journal.output_stored(study_uid, output.sop_uid, already_present=already_present)
            self.metrics.outputs.labels(output.kind, "already_present" if already_present else "stow").inc()
        return stored, present

    def _remove_outputs(self, study_uid: str) -> None:
        for output in self.journal.outputs(study_uid):
            with contextlib.suppress(FileNotFoundError):
                Path(output.path).unlink()
        folder = self.config.outputs_dir / hash_uid(study_uid)
        with contextlib.suppress(OSError):
            folder.rmdir()

    def _failed(self, row: StudyRow, error: BridgeError) -> None:
        now = self.clock()
        if error.retriable:
            attempts = row.attempts + 1
            if attempts < self.config.max_attempts:
                backoff_s = min(self.config.retry_max_backoff_s, self.config.retry_backoff_s * 2 ** (attempts - 1))
                backoff_s *= random.uniform(0.8, 1.2)  # jitter: studies that failed together do not retry together
                self.journal.retry_later(row.study_uid, error.status, error.message, now + backoff_s, now)
                self.metrics.retries.labels(error.status).inc()
                audit("retry", row.study_hash, status=error.status, attempt=attempts, backoff_s=round(backoff_s, 1))
                logger.warning(
                    "study %s: %s: %s; attempt %d of %d, next in %.1f s",
                    row.study_hash,
                    error.status,
                    error.message,
                    attempts,
                    self.config.max_attempts,
                    backoff_s,
                )
                return
            error = BridgeError(error.status, f"{error.message} (gave up after {attempts} attempts)", retriable=False)
        self.journal.finish(row.study_uid, State.FAILED, now, status=error.status, message=error.message)
        self.metrics.failed.labels(error.status).inc()
        audit("failed", row.study_hash, priority=row.priority_name, status=error.status, attempts=row.attempts + 1)
        logger.warning("study %s failed: %s: %s", row.study_hash, error.status, error.message)
