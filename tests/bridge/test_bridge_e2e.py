"""End to end: a real Orthanc (DICOMweb), the real server with the bundled models, `radserve bridge` as a process.

Independently written CT, MR and X-ray studies, a malformed CT and a study holding only a report go into the archive
through Orthanc's REST API; the bridge is killed with SIGKILL mid-way and restarted. Every readable study must end
with exactly one SR (and the MR one SEG) in its own study, the CT's SR must hold the planted nodules, the malformed
study must fail alone with its status in `radserve bridge status`, and nothing may be stored twice.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from pydicom.data import get_testdata_file

from inference.bridge.journal import hash_uid
from inference.phantoms import make_brain_mr, make_chest_ct, make_chest_xray, write_dicom_series, write_xray_dicom
from tests.bridge.conftest import BridgeProcess, wait_until

MATCH_MM = 3.0
TERMINAL = {"stored", "skipped", "failed"}


def describe(paths: list[Path], description: str) -> list[Path]:
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.StudyDescription = description
        ds.save_as(path)
    return paths


def chest_ct(folder: Path, seed: int = 20261128) -> tuple[list[Path], object]:
    phantom = make_chest_ct(
        np.random.default_rng(seed),
        shape=(192, 192, 72),
        pixel_spacing_mm=0.9,
        slice_spacing_mm=2.5,
        n_nodules=3,
        nodule_diameters_mm=(9.0, 14.0, 24.0),
        row_direction=(-1.0, 0.0, 0.0),
        column_direction=(0.0, -1.0, 0.0),
        slice_direction_sign=-1,
        origin_mm=(112.0, 95.0, 1234.5),
    )
    return describe(write_dicom_series(phantom, folder), "CT CHEST ROUTINE"), phantom


def chest_xray(folder: Path, seed: int = 4242) -> Path:
    phantom = make_chest_xray(
        np.random.default_rng(seed), size_px=(2048, 2048), pixel_spacing_mm=0.15, opacity_diameters_mm=(16.0, 28.0)
    )
    folder.mkdir(parents=True, exist_ok=True)
    return write_xray_dicom(phantom, folder / "cxr.dcm", modality="DX")


def study_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def series_by_modality(client: DICOMwebClient, uid: str) -> dict[str, list[int]]:
    """Modality -> the instance count of each of the study's series of that modality."""
    found: dict[str, list[int]] = {}
    for series in client.search_for_series(uid, fields=["NumberOfSeriesRelatedInstances"]):
        modality = series["00080060"]["Value"][0]
        found.setdefault(modality, []).append(int(series["00201209"]["Value"][0]))
    return found


def sr_centers(client: DICOMwebClient, uid: str, sr_finding_groups) -> np.ndarray:
    """The 3-D center (SCOORD3D) of each finding of the study's one SR, read back from the archive."""
    (series,) = [s for s in client.search_for_series(uid) if s["00080060"]["Value"][0] == "SR"]
    (sr,) = client.retrieve_series(uid, series["0020000E"]["Value"][0])
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    return np.array([groups["center_3d"].roi.graphic_data[0] for groups in sr_finding_groups(report)]).reshape(-1, 3)


@pytest.fixture
def dicomweb(orthanc) -> DICOMwebClient:
    return DICOMwebClient(orthanc.dicomweb_url)


def test_every_study_is_read_and_stored_exactly_once_through_a_kill_9(
    server, orthanc, dicomweb, sr_finding_groups, tmp_path
):
    ct_files, ct = chest_ct(tmp_path / "ct")
    mr = make_brain_mr(
        np.random.default_rng(777),
        shape=(160, 160, 40),
        pixel_spacing_mm=1.2,
        slice_spacing_mm=4.0,
        lesion_diameters_mm=(14.0, 24.0),
        lesion_contrasts=("dark", "bright"),
    )
    mr_files = describe(write_dicom_series(mr, tmp_path / "mr"), "MR BRAIN STROKE PROTOCOL")
    dx_file = chest_xray(tmp_path / "dx")
    bad = make_chest_ct(np.random.default_rng(5), shape=(96, 96, 30), n_nodules=0)
    bad_files = write_dicom_series(bad, tmp_path / "bad")
    del bad_files[15]  # a missing slice, which the server refuses (INVALID_ARGUMENT)
    report_only = Path(get_testdata_file("reportsi.dcm"))
    studies = {
        "ct": study_uid(ct_files[0]),
        "mr": study_uid(mr_files[0]),
        "dx": study_uid(dx_file),
        "bad": study_uid(bad_files[0]),
        "report": study_uid(report_only),
    }
    for files in (ct_files, mr_files, [dx_file], bad_files, [report_only]):
        orthanc.upload(files)
    rules = tmp_path / "bridge.yaml"
    rules.write_text("priority:\n  - {attribute: StudyDescription, match: '\\bstroke\\b', priority: STAT}\n")

    bridge = BridgeProcess(orthanc, server.target, tmp_path / "state", "--config", str(rules), "--concurrency", "2")
    try:
        bridge.start()
        wait_until(lambda: any(r["state"] in ("reading", "storing") for r in bridge.rows().values()), 120, "a read")
        bridge.kill()
        interrupted = {uid for uid, r in bridge.rows().items() if r["state"] in ("reading", "storing")}
        assert interrupted
        bridge.start()
        wait_until(
            lambda: len(rows := bridge.rows()) == len(studies) and all(r["state"] in TERMINAL for r in rows.values()),
            420,
            "every study finished",
            interval_s=0.5,
        )
        time.sleep(3)  # a few more polls: the results stored into the studies must not trigger reads
        rows = bridge.rows()
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{bridge.metrics_port}/metrics", timeout=10).read().decode()
        assert bridge.terminate() == 0  # a clean drain
    finally:
        bridge.stop()

    states = {name: (rows[uid]["state"], rows[uid]["status"]) for name, uid in studies.items()}
    assert states == {
        "ct": ("stored", None),
        "mr": ("stored", None),
        "dx": ("stored", None),
        "bad": ("failed", "INVALID_ARGUMENT"),
        "report": ("skipped", "NOTHING_TO_READ"),
    }
    assert rows[studies["mr"]]["priority"] == 2 and rows[studies["ct"]]["priority"] == 1  # STAT by StudyDescription
    assert rows[studies["bad"]]["message"].startswith("1 slice missing in series 1")

    # Exactly one SR per readable study (the MR one a SEG too), nothing stored twice, nothing added elsewhere.
    archived = {name: series_by_modality(dicomweb, uid) for name, uid in studies.items()}
    assert archived["ct"]["CT"] == [72] and archived["ct"]["SR"] == [1] and archived["ct"].get("SEG", [1]) == [1]
    assert archived["mr"]["MR"] == [40] and archived["mr"]["SR"] == [1] and archived["mr"]["SEG"] == [1]
    assert archived["dx"]["DX"] == [1] and archived["dx"]["SR"] == [1] and archived["dx"].get("SEG", [1]) == [1]
    assert archived["bad"] == {"CT": [29]}
    assert archived["report"] == {"SR": [1]}

    # The CT's findings, read back from the archived SR, are the planted nodules.
    centers = sr_centers(dicomweb, studies["ct"], sr_finding_groups)
    for lesion in ct.lesions:
        distance = np.linalg.norm(centers - np.asarray(lesion.center_mm), axis=1).min()
        assert distance <= MATCH_MM, f"nodule at {lesion.center_mm} missing from the archived SR ({distance:.1f} mm)"
    assert len(centers) <= len(ct.lesions) + 1

    # `bridge status` names the malformed study by its hash, with its status and message.
    status = subprocess.run(
        [sys.executable, "-m", "inference.cli", "bridge", "status", "--state", str(bridge.state_dir)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith("discovered 0  queued 0  reading 0  storing 0  stored 3  skipped 1  failed 1")
    (failed_line,) = [line for line in status.stdout.splitlines() if hash_uid(studies["bad"]) in line]
    assert "failed" in failed_line and "INVALID_ARGUMENT: 1 slice missing in series 1" in failed_line

    # `bridge retry` requeues the failed study by its hash (here with the bridge stopped: it is read at the next start).
    retry = subprocess.run(
        [sys.executable, "-m", "inference.cli", "bridge", "retry", "--state", str(bridge.state_dir),
         hash_uid(studies["bad"])[:8]],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert retry.returncode == 0, retry.stderr
    assert retry.stdout.strip() == f"{hash_uid(studies['bad'])}: failed -> queued"
    assert bridge.rows()[studies["bad"]]["state"] == "queued" and bridge.rows()[studies["bad"]]["attempts"] == 0

    assert 'radserve_bridge_studies{state="stored"} 3.0' in metrics
    assert 'radserve_bridge_studies{state="failed"} 1.0' in metrics

    # The log and the audit lines name studies by hash only: no UID, no patient data.
    log = bridge.log()
    assert "event=stored study=" + hash_uid(studies["ct"]) in log
    assert "event=reopened" not in log
    for secret in [*studies.values(), "PHANTOM", str(pydicom.dcmread(ct_files[0]).SeriesInstanceUID)]:
        assert secret not in log
    for uid in interrupted:
        assert f"study={hash_uid(uid)}" in log


class CrashAfterStore(BaseException):  # nothing in the bridge catches it, as with a kill -9
    pass


def test_a_crash_between_storing_and_journaling_stores_nothing_twice(server, orthanc, dicomweb, tmp_path):
    """The narrowest window: the archive has the SR, the journal does not know yet. The next run asks the archive
    (QIDO-RS) before storing and finds it."""
    from inference.bridge.archive import DicomWebArchive
    from inference.bridge.config import BridgeConfig
    from inference.bridge.service import Bridge

    class CrashingArchive(DicomWebArchive):
        def store(self, study_uid: str, part10: bytes) -> None:
            super().store(study_uid, part10)
            raise CrashAfterStore

    dx_file = chest_xray(tmp_path / "dx", seed=99)
    uid = study_uid(dx_file)
    orthanc.upload([dx_file])
    config = BridgeConfig(orthanc.dicomweb_url, server.target, tmp_path / "state", stable_s=0.0, metrics_port=0)

    first = Bridge(config, archive_factory=lambda: CrashingArchive(orthanc.dicomweb_url))
    first.poll_once()
    row = first._claim()
    assert row.study_uid == uid
    with pytest.raises(CrashAfterStore):
        first.process(row)
    first.close()
    assert series_by_modality(dicomweb, uid)["SR"] == [1]  # stored, and the journal still says "storing"

    second = Bridge(config)
    second.start()  # recovery and the workers, which finish the study
    try:
        wait_until(lambda: second.journal.get(uid).state == "stored", 60, "the study stored")
    finally:
        second.stop()
        assert second.drain() == 0
    archived = series_by_modality(dicomweb, uid)
    assert archived["SR"] == [1] and archived.get("SEG", [1]) == [1]
    sample = second.metrics.registry.get_sample_value
    assert sample("radserve_bridge_outputs_stored_total", {"kind": "SR", "how": "already_present"}) == 1

    # A lost journal: a bridge with a new state directory reads the study again. The SR and SEG UIDs are derived
    # from the source and the model (deterministic), so the archive already has both and nothing is stored twice.
    third = Bridge(dataclasses.replace(config, state_dir=tmp_path / "new-state"))
    third.start()
    try:
        third.poll_once()
        wait_until(lambda: third.journal.get(uid).state == "stored", 60, "the study read again")
    finally:
        third.stop()
        assert third.drain() == 0
    assert series_by_modality(dicomweb, uid) == archived
    sample = third.metrics.registry.get_sample_value
    assert sample("radserve_bridge_outputs_stored_total", {"kind": "SR", "how": "already_present"}) == 1
    assert sample("radserve_bridge_outputs_stored_total", {"kind": "SR", "how": "stow"}) is None


def test_sigterm_lets_the_study_in_progress_finish(server, orthanc, dicomweb, tmp_path):
    ct_files, _ = chest_ct(tmp_path / "ct", seed=31)
    uid = study_uid(ct_files[0])
    bridge = BridgeProcess(orthanc, server.target, tmp_path / "state")
    try:
        bridge.start()
        orthanc.upload(ct_files)
        wait_until(lambda: bridge.rows().get(uid, {}).get("state") == "reading", 120, "the read")
        assert bridge.terminate() == 0
    finally:
        bridge.stop()
    assert bridge.rows()[uid]["state"] == "stored"
    log = bridge.log()
    assert log.index("stopping: no new studies; 1 in progress") < log.index(f"event=stored study={hash_uid(uid)}")
    assert series_by_modality(dicomweb, uid)["SR"] == [1]


def test_an_archive_stopped_for_20_s_delays_but_loses_nothing(server, orthanc, dicomweb, tmp_path):
    ct_files, _ = chest_ct(tmp_path / "ct", seed=47)
    dx_file = chest_xray(tmp_path / "dx", seed=48)
    uids = [study_uid(ct_files[0]), study_uid(dx_file)]
    bridge = BridgeProcess(orthanc, server.target, tmp_path / "state")
    try:
        bridge.start()
        orthanc.upload(ct_files)
        wait_until(lambda: bridge.rows().get(uids[0], {}).get("state") == "reading", 120, "the CT read")
        orthanc.upload([dx_file])
        orthanc.stop()
        time.sleep(20)
        orthanc.start()
        wait_until(
            lambda: all(bridge.rows().get(uid, {}).get("state") == "stored" for uid in uids),
            180,
            "both studies stored",
            interval_s=0.5,
        )
        assert bridge.terminate() == 0
    finally:
        bridge.stop()
    for uid in uids:
        assert series_by_modality(dicomweb, uid)["SR"] == [1]
    log = bridge.log()
    assert f"event=retry study={hash_uid(uids[0])} status=CONNECTION" in log
    assert "poll failed: CONNECTION" in log


@pytest.mark.slow
def test_the_thin_install_runs_the_bridge_without_torch(server, orthanc, dicomweb, tmp_path):
    """`pip install 'radserve[client]'` into a clean virtual environment (from PyPI), then the bridge from there
    against the real server: no torch, no MONAI, no server module."""
    root = Path(__file__).resolve().parents[2]
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    shutil.copytree(root / "inference", source / "inference", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{source}[client]"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-4000:]
    installed = subprocess.run([python, "-m", "pip", "list"], capture_output=True, text=True, timeout=120).stdout
    for heavy in ("torch", "monai", "highdicom", "nibabel", "scipy"):
        assert f"\n{heavy} " not in installed.lower(), heavy
    refused = subprocess.run([str(venv / "bin" / "radserve"), "serve"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "pip install 'radserve[server]'" in refused.stderr

    dx_file = chest_xray(tmp_path / "dx", seed=61)
    uid = study_uid(dx_file)
    orthanc.upload([dx_file])
    bridge = BridgeProcess(orthanc, server.target, tmp_path / "state")
    try:
        bridge.start(python=python)  # the thin venv's interpreter, run from outside the checkout
        wait_until(lambda: bridge.rows().get(uid, {}).get("state") == "stored", 120, "the study stored")
        assert bridge.terminate() == 0
    finally:
        bridge.stop()
    assert series_by_modality(dicomweb, uid)["SR"] == [1]


def in_process_bridge(orthanc, server_target: str, state_dir: Path, **settings):
    from inference.bridge.config import BridgeConfig
    from inference.bridge.service import Bridge

    config = BridgeConfig(orthanc.dicomweb_url, server_target, state_dir, stable_s=0.0, metrics_port=0, **settings)
    return Bridge(config)


def work_once(bridge) -> str:
    """One poll, then one claimed study worked on to its next state; returns that state."""
    bridge.poll_once()
    row = bridge.work_one()
    assert row is not None
    return bridge.journal.get(row.study_uid).state


def test_radserve_unreachable_is_retried_with_back_off_then_fails(orthanc, tmp_path):
    from inference.bridge.orthanc import free_port

    dx_file = chest_xray(tmp_path / "dx", seed=71)
    uid = study_uid(dx_file)
    orthanc.upload([dx_file])
    bridge = in_process_bridge(
        orthanc, f"127.0.0.1:{free_port()}", tmp_path / "state", max_attempts=2, retry_backoff_s=0.0
    )
    try:
        assert work_once(bridge) == "queued"
        row = bridge.journal.get(uid)
        assert (row.attempts, row.status) == (1, "UNAVAILABLE")
        assert work_once(bridge) == "failed"
        row = bridge.journal.get(uid)
        assert row.status == "UNAVAILABLE" and row.message.endswith("(gave up after 2 attempts)")
        assert bridge.metrics.registry.get_sample_value("radserve_bridge_retries_total", {"status": "UNAVAILABLE"}) == 1
    finally:
        bridge.close()


def test_a_late_image_series_reopens_a_study_and_reports_do_not(server, orthanc, dicomweb, tmp_path):
    first = make_brain_mr(np.random.default_rng(81), shape=(96, 96, 24), n_lesions=1)
    files = write_dicom_series(first, tmp_path / "mr1")
    uid = study_uid(files[0])
    orthanc.upload(files)
    bridge = in_process_bridge(orthanc, server.target, tmp_path / "state")
    try:
        assert work_once(bridge) == "stored"
        bridge.poll_once()  # the SR and SEG stored into the study change its count: no new read
        assert bridge.journal.get(uid).state == "stored"

        report = pydicom.dcmread(get_testdata_file("reportsi.dcm"))  # another system's report on this patient
        source = pydicom.dcmread(files[0], stop_before_pixels=True)
        report.PatientID, report.PatientName = source.PatientID, source.PatientName
        report.StudyInstanceUID = uid
        report.SeriesInstanceUID = pydicom.uid.generate_uid()
        report.SOPInstanceUID = pydicom.uid.generate_uid()
        report.save_as(tmp_path / "report.dcm")
        orthanc.upload([tmp_path / "report.dcm"])
        bridge.poll_once()  # another system's report: nothing a model reads
        assert bridge.journal.get(uid).state == "stored"

        late = make_brain_mr(np.random.default_rng(82), shape=(96, 96, 30), n_lesions=1)
        orthanc.upload(write_dicom_series(late, tmp_path / "mr2", study_instance_uid=uid, series_number=2))
        bridge.poll_once()  # a new MR series of 30 slices: read again, once quiet
        assert bridge.journal.get(uid).state == "queued"
        assert work_once(bridge) == "stored"
    finally:
        bridge.close()
    archived = series_by_modality(dicomweb, uid)
    assert sorted(archived["MR"]) == [24, 30]
    assert archived["SR"] == [1, 1, 1]  # the other system's report, and one radserve SR per series read


def test_a_malformed_instance_reaches_radserve_as_stored_and_fails_the_study_alone(server, orthanc, tmp_path):
    """WADO-RS hands the archive's own bytes to radserve, untouched: a slice whose pixel data is cut short fails
    its study with radserve's INVALID_ARGUMENT naming the file, at the first attempt; the good study is stored."""
    good = write_dicom_series(make_chest_ct(np.random.default_rng(91), shape=(64, 64, 12), n_nodules=0), tmp_path / "g")
    bad = write_dicom_series(make_chest_ct(np.random.default_rng(92), shape=(64, 64, 12), n_nodules=0), tmp_path / "b")
    cut = pydicom.dcmread(bad[5])
    cut.PixelData = cut.PixelData[: len(cut.PixelData) // 2]
    cut.save_as(bad[5])
    orthanc.upload(good + bad)
    bridge = in_process_bridge(orthanc, server.target, tmp_path / "state")
    try:
        bridge.poll_once()
        while bridge.work_one() is not None:
            pass
        bad_row, good_row = bridge.journal.get(study_uid(bad[0])), bridge.journal.get(study_uid(good[0]))
    finally:
        bridge.close()
    assert (good_row.state, bad_row.state, bad_row.status, bad_row.attempts) == (
        "stored",
        "failed",
        "INVALID_ARGUMENT",
        0,
    )
    assert "file" in bad_row.message and "pixel" in bad_row.message.lower(), bad_row.message
