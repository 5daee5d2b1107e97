"""The journal: state transitions, the claim order (STAT first), recovery after a crash, retry and status look-ups."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
from pathlib import Path

import pytest

from inference.bridge.journal import ROUTINE, STAT, Journal, OutputRow, State, hash_uid


@pytest.fixture
def journal(tmp_path: Path) -> Journal:
    j = Journal(tmp_path / "journal.sqlite3")
    yield j
    j.close()


def queue(journal: Journal, uid: str, priority: int = ROUTINE, *, at: float) -> None:
    journal.discover([(uid, 10, priority)], at)
    journal.promote_stable(at, 0.0)


def test_a_study_is_queued_only_after_its_count_is_quiet_for_stable_s(journal):
    journal.discover([("1.1", 10, ROUTINE)], 100.0)
    assert journal.promote_stable(105.0, 10.0) == []
    assert journal.changed("1.1", 12, ROUTINE, 108.0) == State.DISCOVERED  # still arriving: the clock restarts
    assert journal.promote_stable(115.0, 10.0) == []
    assert journal.promote_stable(118.0, 10.0) == ["1.1"]
    row = journal.get("1.1")
    assert (row.state, row.instances, row.stable_at) == (State.QUEUED, 12, 118.0)


def test_stat_is_claimed_before_routine_studies_that_were_stable_earlier(journal):
    for k in range(3):
        queue(journal, f"2.{k}", at=100.0 + k)
    queue(journal, "2.stat", STAT, at=200.0)
    order = []
    while (row := journal.claim(300.0, busy=[])) is not None:
        order.append(row.study_uid)
        assert journal.get(row.study_uid).state == State.READING
    assert order == ["2.stat", "2.0", "2.1", "2.2"]


def test_busy_and_backed_off_studies_are_not_claimed(journal):
    queue(journal, "3.1", at=100.0)
    queue(journal, "3.2", at=101.0)
    assert journal.claim(102.0, busy=["3.1"]).study_uid == "3.2"
    assert journal.retry_later("3.2", "UNAVAILABLE", "server is draining", 160.0, 102.0) == 1
    row = journal.get("3.2")
    assert (row.state, row.attempts, row.status) == (State.QUEUED, 1, "UNAVAILABLE")
    assert journal.claim(150.0, busy=["3.1"]) is None
    assert journal.next_due() == 0  # 3.1 is due (only busy)
    assert journal.claim(160.0, busy=["3.1"]).study_uid == "3.2"


def test_recovery_requeues_reads_and_resumes_stores(journal, tmp_path):
    queue(journal, "4.1", at=100.0)
    queue(journal, "4.2", at=101.0)
    journal.claim(102.0)
    journal.claim(102.0)
    out = OutputRow("4.2", "4.2.sr", "4.2.srseries", "SR", str(tmp_path / "sr.dcm"), 0)
    journal.record_outputs("4.2", [out], {"reads": []}, ["4.2.ct"], 103.0)
    journal.close()

    reopened = Journal(tmp_path / "journal.sqlite3")
    assert reopened.recover(200.0) == 1
    assert reopened.get("4.1").state == State.QUEUED
    assert reopened.get("4.2").state == State.STORING
    assert reopened.claim(201.0).study_uid == "4.2"  # results made: storing them comes before new reads
    assert reopened.outputs("4.2") == [out]
    reopened.output_stored("4.2", "4.2.sr", already_present=True)
    assert reopened.outputs("4.2")[0].stored == 2
    reopened.close()


def _write_and_die(path: str) -> None:
    j = Journal(Path(path))
    j.discover([("5.1", 10, ROUTINE)], 1.0)
    j.promote_stable(2.0, 0.0)
    j.claim(3.0)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_writer_leaves_a_consistent_journal(tmp_path):
    path = tmp_path / "journal.sqlite3"
    process = multiprocessing.get_context("spawn").Process(target=_write_and_die, args=(str(path),))
    process.start()
    process.join(60)
    assert process.exitcode == -signal.SIGKILL
    journal = Journal(path)
    assert journal.get("5.1").state == State.READING
    assert journal.recover(10.0) == 1 and journal.get("5.1").state == State.QUEUED
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone() == ("ok",)
    journal.close()


def test_finish_requeue_and_find(journal, tmp_path):
    queue(journal, "6.1", at=100.0)
    journal.claim(101.0)
    journal.finish("6.1", State.FAILED, 102.0, status="INVALID_ARGUMENT", message="slice spacing varies")
    row = journal.get("6.1")
    assert (row.state, row.status, row.message) == (State.FAILED, "INVALID_ARGUMENT", "slice spacing varies")
    digest = hash_uid("6.1")
    assert [r.study_uid for r in journal.find(digest[:6])] == ["6.1"]
    assert journal.find(digest[:5]) == []  # too short to name a study
    assert [r.study_uid for r in journal.find("6.1")] == ["6.1"]
    assert journal.requeue("6.1", 103.0) == State.QUEUED
    row = journal.get("6.1")
    assert (row.state, row.attempts, row.status) == (State.QUEUED, 0, None)
    assert journal.state_counts()["queued"] == 1
    with pytest.raises(ValueError, match="terminal state"):
        journal.finish("6.1", State.QUEUED, 104.0)


def test_a_failed_store_is_retried_as_a_store(journal, tmp_path):
    queue(journal, "7.1", at=100.0)
    journal.claim(101.0)
    out = OutputRow("7.1", "7.1.sr", "7.1.srseries", "SR", str(tmp_path / "sr.dcm"), 0)
    journal.record_outputs("7.1", [out], {}, [], 102.0)
    journal.finish("7.1", State.FAILED, 103.0, status="STOW_REFUSED", message="refused")
    assert journal.requeue("7.1", 104.0) == State.STORING
    assert journal.outputs("7.1") == [out]


def test_hash_uid_is_the_servers():
    from inference.io.dicom import hash_uid as server_hash_uid

    for uid in ("1.2.3", "1.2.840.113619.2.55.3.604688119.969.1268071029.320", " 1.2.3\0"):
        assert hash_uid(uid) == server_hash_uid(uid)
