"""The bridge's journal: one SQLite database in ``--state`` recording each study's state and outputs.

A study moves ``discovered`` (seen, maybe still arriving) -> ``queued`` (quiet for ``stable_s``; waiting for a worker
or for its back-off) -> ``reading`` (series retrieved and streamed to radserve) -> ``storing`` (the outputs are on disk
in ``--state``, being stored into the study) -> ``stored``; or ends ``skipped`` (nothing in it a model reads) or
``failed`` (a non-retriable status, or retries exhausted), with the status and message.

Crash safety: every transition is one transaction (WAL, ``synchronous=FULL``), and an output file is written and
fsynced before the transaction that records it. After a crash or ``kill -9``, ``recover`` puts studies left
``reading`` back in the queue (nothing of theirs was stored); studies left ``storing`` resume storing their recorded
outputs, each checked with QIDO-RS first, so an output stored just before the crash is not stored again.

The journal holds StudyInstanceUIDs in clear (it must find the studies again); everything it prints or logs names a
study by :func:`hash_uid`. The state directory is as sensitive as the archive's index.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any


def hash_uid(uid: str) -> str:
    """A short, stable, non-reversible name for a UID: the first 12 hex digits of its SHA-256.

    The same function as the server's (``inference.io.dicom.hash_uid``), so that a study's bridge and server log lines
    carry the same name; the bridge does not import the server, a test keeps the two equal.
    """
    return hashlib.sha256(str(uid).strip().rstrip("\0").encode("utf-8")).hexdigest()[:12]


class State(StrEnum):
    DISCOVERED = "discovered"
    QUEUED = "queued"
    READING = "reading"
    STORING = "storing"
    STORED = "stored"
    SKIPPED = "skipped"
    FAILED = "failed"


TERMINAL = frozenset({State.STORED, State.SKIPPED, State.FAILED})
ROUTINE, STAT = 1, 2  # the proto's Priority values

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    study_hash TEXT NOT NULL,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL,
    instances INTEGER NOT NULL,        -- NumberOfStudyRelatedInstances when last polled
    discovered_at REAL NOT NULL,       -- wall-clock seconds (they must survive a restart)
    changed_at REAL NOT NULL,          -- when the instance count last changed
    stable_at REAL,                    -- when it was found quiet for stable_s (queued)
    stored_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    status TEXT,                       -- gRPC status or HTTP status of the last failure, or why skipped
    message TEXT,
    choice TEXT,                       -- JSON: what was read and why (hashed UIDs only)
    series_seen TEXT,                  -- JSON: the study's series UIDs when it was read, and its own outputs'
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS studies_by_state ON studies (state, priority, stable_at);
CREATE TABLE IF NOT EXISTS outputs (
    study_uid TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    kind TEXT NOT NULL,                -- SR | SEG
    path TEXT NOT NULL,                -- the object's file in the state directory until it is stored
    stored INTEGER NOT NULL DEFAULT 0, -- 0: waiting, 1: stored by STOW-RS, 2: found already in the study
    PRIMARY KEY (study_uid, sop_uid)
);
"""


@dataclass(frozen=True)
class StudyRow:
    study_uid: str
    study_hash: str
    state: State
    priority: int
    instances: int
    discovered_at: float
    changed_at: float
    stable_at: float | None
    stored_at: float | None
    attempts: int
    next_attempt_at: float
    status: str | None
    message: str | None
    choice: str | None
    series_seen: str | None
    updated_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> StudyRow:
        values = dict(row)
        values["state"] = State(values["state"])
        return cls(**values)

    @property
    def priority_name(self) -> str:
        return "STAT" if self.priority == STAT else "ROUTINE"


@dataclass(frozen=True)
class OutputRow:
    study_uid: str
    sop_uid: str
    series_uid: str
    kind: str
    path: str
    stored: int


class Journal:
    """Thread-safe (one connection, one lock); another process (``bridge status``, ``bridge retry``) may open the same
    file at the same time: SQLite's WAL lets it read while the bridge writes, and writers wait ``busy_timeout_s``."""

    def __init__(self, path: Path, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _one(self, sql: str, args: Iterable[Any] = ()) -> StudyRow | None:
        with self._lock:
            row = self._db.execute(sql, tuple(args)).fetchone()
        return StudyRow.from_row(row) if row is not None else None

    # -- the poller ---------------------------------------------------------------------------------------------

    def get(self, study_uid: str) -> StudyRow | None:
        return self._one("SELECT * FROM studies WHERE study_uid = ?", (study_uid,))

    def counts(self) -> dict[str, int]:
        """Each study's last polled instance count, by UID (the poller compares against it)."""
        with self._lock:
            return dict(self._db.execute("SELECT study_uid, instances FROM studies").fetchall())

    def discover(self, studies: Iterable[tuple[str, int, int]], now: float) -> None:
        """New studies, each (UID, instance count, priority), in one transaction (a first poll may list many)."""
        with self._transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO studies (study_uid, study_hash, state, priority, instances, discovered_at, "
                "changed_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (uid, hash_uid(uid), State.DISCOVERED, priority, instances, now, now, now)
                    for uid, instances, priority in studies
                ],
            )

    def changed(self, study_uid: str, instances: int, priority: int, now: float) -> State | None:
        """A new instance count for a known study. A study not yet being read waits again for ``stable_s`` (it is
        still arriving); one being read or stored keeps going. Returns its state (None when unknown)."""
        with self._transaction() as db:
            row = db.execute("SELECT state FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
            if row is None:
                return None
            state = State(row["state"])
            if state in (State.DISCOVERED, State.QUEUED):
                db.execute(
                    "UPDATE studies SET state = ?, instances = ?, priority = ?, changed_at = ?, stable_at = NULL, "
                    "updated_at = ? WHERE study_uid = ?",
                    (State.DISCOVERED, instances, priority, now, now, study_uid),
                )
            else:
                db.execute(
                    "UPDATE studies SET instances = ?, updated_at = ? WHERE study_uid = ?", (instances, now, study_uid)
                )
            return state

    def reopen(self, study_uid: str, now: float) -> None:
        """A finished study that received new image series is read again once quiet."""
        with self._transaction() as db:
            db.execute(
                "UPDATE studies SET state = ?, changed_at = ?, stable_at = NULL, attempts = 0, next_attempt_at = 0, "
                "status = NULL, message = NULL, updated_at = ? WHERE study_uid = ?",
                (State.DISCOVERED, now, now, study_uid),
            )

    def promote_stable(self, now: float, stable_s: float) -> list[str]:
        """Queue the discovered studies whose count has not changed for ``stable_s``; returns their UIDs."""
        with self._transaction() as db:
            uids = [
                r[0]
                for r in db.execute(
                    "SELECT study_uid FROM studies WHERE state = ? AND changed_at <= ?",
                    (State.DISCOVERED, now - stable_s),
                ).fetchall()
            ]
            db.executemany(
                "UPDATE studies SET state = ?, stable_at = ?, updated_at = ? WHERE study_uid = ?",
                [(State.QUEUED, now, now, uid) for uid in uids],
            )
        return uids

    # -- the workers ------------------------------------------------------------------------------------------

    def recover(self, now: float) -> int:
        """After a restart: studies left ``reading`` go back to the queue. Returns how many."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE studies SET state = ?, updated_at = ? WHERE state = ?", (State.QUEUED, now, State.READING)
            )
            return cursor.rowcount

    def claim(self, now: float, busy: Iterable[str] = ()) -> StudyRow | None:
        """The next study to work on: STAT first; within a priority, studies left ``storing`` (their results are
        made, storing them takes seconds) before queued ones (which become ``reading``), each in the order they
        became stable. ``busy``: studies this process is working on already."""
        busy = list(busy)
        exclude = f"AND study_uid NOT IN ({','.join('?' * len(busy))})" if busy else ""
        with self._transaction() as db:
            row = db.execute(
                f"SELECT * FROM studies WHERE state IN (?, ?) AND next_attempt_at <= ? {exclude} "
                "ORDER BY priority DESC, state = ? DESC, stable_at ASC, discovered_at ASC LIMIT 1",
                (State.QUEUED, State.STORING, now, *busy, State.STORING),
            ).fetchone()
            if row is None:
                return None
            if row["state"] == State.QUEUED:
                db.execute(
                    "UPDATE studies SET state = ?, updated_at = ? WHERE study_uid = ?",
                    (State.READING, now, row["study_uid"]),
                )
            return StudyRow.from_row(row)

    def next_due(self) -> float | None:
        """When the earliest waiting study (queued or storing) is due, or None when none waits."""
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(next_attempt_at) FROM studies WHERE state IN (?, ?)", (State.QUEUED, State.STORING)
            ).fetchone()
        return row[0]

    def record_outputs(
        self, study_uid: str, outputs: Iterable[OutputRow], choice: Any, series_seen: Iterable[str], now: float
    ) -> None:
        """The read's outputs (their files already written and fsynced): the study moves to ``storing``."""
        outputs = list(outputs)
        with self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO outputs (study_uid, sop_uid, series_uid, kind, path, stored) "
                "VALUES (?, ?, ?, ?, ?, 0)",
                [(o.study_uid, o.sop_uid, o.series_uid, o.kind, o.path) for o in outputs],
            )
            seen = sorted({*series_seen, *(o.series_uid for o in outputs)})
            db.execute(
                "UPDATE studies SET state = ?, choice = ?, series_seen = ?, updated_at = ? WHERE study_uid = ?",
                (State.STORING, json.dumps(choice), json.dumps(seen), now, study_uid),
            )

    def outputs(self, study_uid: str) -> list[OutputRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM outputs WHERE study_uid = ? ORDER BY kind DESC, sop_uid", (study_uid,)
            ).fetchall()
        return [OutputRow(**dict(r)) for r in rows]

    def output_stored(self, study_uid: str, sop_uid: str, already_present: bool) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE outputs SET stored = ? WHERE study_uid = ? AND sop_uid = ?",
                (2 if already_present else 1, study_uid, sop_uid),
            )

    def finish(
        self,
        study_uid: str,
        state: State,
        now: float,
        *,
        status: str | None = None,
        message: str | None = None,
        choice: Any = None,
        series_seen: Iterable[str] | None = None,
    ) -> None:
        """A terminal state: stored, skipped (status names why) or failed (status and message)."""
        if state not in TERMINAL:
            raise ValueError(f"finish() takes a terminal state, got {state!r}")
        sets = ["state = ?", "status = ?", "message = ?", "next_attempt_at = 0", "updated_at = ?"]
        args: list[Any] = [state, status, message, now]
        if state == State.STORED:
            sets.append("stored_at = ?")
            args.append(now)
        if choice is not None:
            sets.append("choice = ?")
            args.append(json.dumps(choice))
        if series_seen is not None:
            sets.append("series_seen = ?")
            args.append(json.dumps(sorted(series_seen)))
        with self._transaction() as db:
            db.execute(f"UPDATE studies SET {', '.join(sets)} WHERE study_uid = ?", (*args, study_uid))

    def retry_later(self, study_uid: str, status: str, message: str, next_attempt_at: float, now: float) -> int:
        """A retriable failure: back to the queue (or to ``storing``, outputs kept) until ``next_attempt_at``.
        Returns the attempts made so far."""
        with self._transaction() as db:
            db.execute(
                "UPDATE studies SET state = CASE WHEN state = ? THEN ? ELSE state END, attempts = attempts + 1, "
                "next_attempt_at = ?, status = ?, message = ?, updated_at = ? WHERE study_uid = ?",
                (State.READING, State.QUEUED, next_attempt_at, status, message, now, study_uid),
            )
            return int(db.execute("SELECT attempts FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()[0])

    # -- status and retry -------------------------------------------------------------------------------------

    def studies(self) -> list[StudyRow]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM studies ORDER BY state, updated_at").fetchall()
        return [StudyRow.from_row(r) for r in rows]

    def state_counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM studies GROUP BY state").fetchall()
        return {state.value: 0 for state in State} | {r[0]: r[1] for r in rows}

    def find(self, study: str) -> list[StudyRow]:
        """Studies named by UID, by hash, or by a hash prefix of at least 6 digits."""
        study = study.strip()
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM studies WHERE study_uid = ? OR study_hash = ? OR (length(?) >= 6 AND study_hash LIKE ?)",
                (study, study, study, study.lower() + "%"),
            ).fetchall()
        return [StudyRow.from_row(r) for r in rows]

    def requeue(self, study_uid: str, now: float | None = None) -> State:
        """``bridge retry``: the study is worked on again at once, attempts reset; one with outputs still to store
        resumes storing them, any other is read again. Returns the new state."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            waiting = db.execute(
                "SELECT COUNT(*) FROM outputs WHERE study_uid = ? AND stored = 0", (study_uid,)
            ).fetchone()[0]
            state = State.STORING if waiting else State.QUEUED
            if state == State.QUEUED:
                db.execute("DELETE FROM outputs WHERE study_uid = ?", (study_uid,))
            db.execute(
                "UPDATE studies SET state = ?, attempts = 0, next_attempt_at = 0, status = NULL, message = NULL, "
                "stable_at = COALESCE(stable_at, ?), updated_at = ? WHERE study_uid = ?",
                (state, now, now, study_uid),
            )
        return state
