"""End to end: patient data never reaches the server log or an error message.

Studies whose patient name, ID, birth date, accession number, free-text fields and every UID (study, series,
frame of reference, SOP instance) are canary strings are read on a server logging at DEBUG: valid ones (with
DICOM SR and SEG requested, so the derived-object code runs too) and malformed ones, including values pydicom
finds invalid (its validation warnings quote the value) and an SR build that fails (a library exception quoting
the birth date). No canary may appear in the captured server log, at any level, nor in any message returned.
"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import grpc
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset

from inference.cli import main as radserve_main
from inference.client import ReadingClient
from inference.phantoms import make_chest_ct, write_dicom_multiframe, write_dicom_series, write_nifti
from inference.serverproc import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
MODEL = "lung_nodule_ct"

NAME = "CANARY^NAME^7f3a"
PATIENT_ID = "CANARYID7f3a"
BIRTH_DATE = "19230417"
ACCESSION = "CANARYACC7f3a"
UID_ROOT = "1.2.826.0.1.3680043.8.498.7777"
STUDY_UID = f"{UID_ROOT}.1"
SERIES_UID = f"{UID_ROOT}.2"
SERIES_2_UID = f"{UID_ROOT}.22"
FRAME_OF_REFERENCE_UID = f"{UID_ROOT}.3"
FREE_TEXT = {
    "ReferringPhysicianName": "CANARY^DOCTOR^7f3a",
    "InstitutionName": "CANARY HOSPITAL 7f3a",
    "StudyDescription": "CT CHEST CANARY 7f3a",
    "OtherPatientIDs": "CANARYOTHER7f3a",
}
# Invalid forms, for the values pydicom's validation would quote: letters in UIDs, a date that is no date.
BAD_UID_ROOT = f"{UID_ROOT}.CANARY"
BAD_BIRTH_DATE = "CANARYDOB7f3a"
# What must never appear: every canary above in clear (the UIDs by their common root), and the birth date in
# the ISO form a formatter might print.
CANARIES = ("CANARY", UID_ROOT, BIRTH_DATE, "1923-04-17", "7f3a^", "^7f3a")
# Most valid studies are read up to the model only: decoded in full, then NOT_FOUND for this model name. The model
# and the SR/SEG code run for two studies (a valid one, and one with invalid values), which is where they matter.
DECODE_ONLY = ("--model", "decode_only_no_such_model")


# --- the server and how reads are sent ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_repo) -> Iterator[ServerProcess]:
    with ServerProcess(
        models=model_repo(MODEL),
        log_path=tmp_path_factory.mktemp("server") / "server.log",
        extra_args=["--log-level", "DEBUG"],
        env={"RADSERVE_WARMUP": "0"},  # start-up time; the first read warms the model
    ) as proc:
        yield proc


def assert_no_canary(text: str, where: str) -> None:
    for canary in CANARIES:
        assert canary not in text, f"{canary!r} leaked into {where}: ...{_around(text, canary)}..."


def _around(text: str, needle: str) -> str:
    at = text.find(needle)
    return text[max(at - 200, 0) : at + 200]


def cli_read(capsys: pytest.CaptureFixture[str], server: ServerProcess, path: Path, *args: str) -> tuple[int, str]:
    """`radserve read PATH --server ...`: the exit code; stderr (every message shown to the user) is checked."""
    capsys.readouterr()
    code = radserve_main(["read", str(path), "--server", server.target, "--timeout-s", "300", *args])
    _, err = capsys.readouterr()
    assert_no_canary(err, f"the error message of `radserve read {path.name}`")
    return code, err


# --- canary studies -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom():
    return make_chest_ct(
        20261201, shape=(96, 96, 40), pixel_spacing_mm=1.2, slice_spacing_mm=3.0, n_nodules=1,
        nodule_diameters_mm=(14.0,),
    )  # fmt: skip


def canary_series(
    phantom, out: Path, *, series_uid: str = SERIES_UID, series_number: int = 1, prefix: str = "slice"
) -> list[Path]:
    """The phantom as a DICOM series whose patient, study and instance identifiers are all canaries."""
    paths = write_dicom_series(
        phantom,
        out,
        series_number=series_number,
        patient_name=NAME,
        patient_id=PATIENT_ID,
        accession_number=ACCESSION,
        study_instance_uid=STUDY_UID,
        series_instance_uid=series_uid,
        frame_of_reference_uid=FRAME_OF_REFERENCE_UID,
        file_prefix=prefix,
    )
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{series_uid}.{k + 1}"
        edit_canaries(ds)
        ds.save_as(path)
    return paths


def edit_canaries(ds: Dataset) -> None:
    ds.PatientBirthDate = BIRTH_DATE
    for keyword, value in FREE_TEXT.items():
        setattr(ds, keyword, value)


def rewrite(paths: list[Path], edit) -> None:
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        edit(k, ds)
        ds.save_as(path)


@pytest.fixture(scope="module")
def valid_series(phantom, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("valid")
    canary_series(phantom, folder)
    return folder


def invalid_values_series(phantom, out: Path) -> Path:
    """Geometry and pixels valid; UIDs with letters, a birth date that is no date, a name whose bytes are invalid
    in the declared character set: values pydicom warns about, quoting them."""
    paths = canary_series(phantom, out)

    def edit(k: int, ds: Dataset) -> None:
        ds.StudyInstanceUID = f"{BAD_UID_ROOT}.1"
        ds.SeriesInstanceUID = f"{BAD_UID_ROOT}.2"
        ds.FrameOfReferenceUID = f"{BAD_UID_ROOT}.3"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{BAD_UID_ROOT}.4.{k + 1}"
        ds.PatientBirthDate = BAD_BIRTH_DATE
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds["PatientName"].value = b"CANARY^\xff\xfeNAME^7f3a"

    rewrite(paths, edit)
    return out


def expect_error(code: int, err: str, status: str) -> None:
    assert code != 0 and err.startswith(f"error: {status}: "), err


# --- valid reads --------------------------------------------------------------------------------------------------


def test_valid_series_with_sr_and_seg(server, valid_series, tmp_path, capsys):
    code, err = cli_read(
        capsys,
        server,
        valid_series,
        "--format",
        "json",
        "--sr",
        str(tmp_path / "sr.dcm"),
        "--seg",
        str(tmp_path / "seg.dcm"),
    )
    assert code == 0, err
    assert (tmp_path / "sr.dcm").exists()
    # The derived objects are for the archive: they carry the patient, as they must.
    assert pydicom.dcmread(tmp_path / "sr.dcm").PatientName == NAME


def test_enhanced_multiframe(server, phantom, tmp_path, capsys):
    path = write_dicom_multiframe(
        phantom,
        tmp_path / "mf" / "ct.dcm",
        patient_name=NAME,
        patient_id=PATIENT_ID,
        accession_number=ACCESSION,
        study_instance_uid=STUDY_UID,
        series_instance_uid=f"{UID_ROOT}.5",
        frame_of_reference_uid=FRAME_OF_REFERENCE_UID,
    )
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{UID_ROOT}.5.1"
    edit_canaries(ds)
    ds.save_as(path)
    code, err = cli_read(capsys, server, path.parent, *DECODE_ONLY)
    expect_error(code, err, "NOT_FOUND")


def test_nifti_with_patient_data_in_its_text_fields(server, phantom, tmp_path, capsys):
    path = write_nifti(phantom.volume, tmp_path / "study.nii")
    image = nib.Nifti1Image.from_bytes(path.read_bytes())
    image.header["descrip"] = NAME.encode()
    image.header["aux_file"] = PATIENT_ID.encode()
    image.header["db_name"] = ACCESSION.encode()  # NIfTI-1 keeps Analyze's unused fields
    path.write_bytes(image.to_bytes())
    code, err = cli_read(capsys, server, path, *DECODE_ONLY)
    expect_error(code, err, "NOT_FOUND")


def test_invalid_uids_and_birth_date_are_read_without_pydicom_quoting_them(server, phantom, tmp_path, capsys):
    code, err = cli_read(capsys, server, invalid_values_series(phantom, tmp_path / "bad"), *DECODE_ONLY)
    expect_error(code, err, "NOT_FOUND")  # decoded: the invalid values do not stop a read


def test_sr_of_a_study_with_an_invalid_birth_date(server, phantom, tmp_path, capsys):
    """Building the SR copies the birth date; whatever the outcome, the value is not logged or returned."""
    folder = invalid_values_series(phantom, tmp_path / "bad")
    cli_read(capsys, server, folder, "--format", "json", "--sr", str(tmp_path / "sr.dcm"))


# --- malformed reads ----------------------------------------------------------------------------------------------


def test_mixed_series_are_listed_by_hash(server, phantom, tmp_path, capsys):
    canary_series(phantom, tmp_path / "two")
    canary_series(phantom, tmp_path / "two", series_uid=SERIES_2_UID, series_number=2, prefix="second")
    code, err = cli_read(capsys, server, tmp_path / "two")
    expect_error(code, err, "INVALID_ARGUMENT")


def test_requested_series_absent_is_named_by_hash(server, valid_series):
    client = ReadingClient(server.target)
    try:
        with pytest.raises(grpc.RpcError) as failure:
            client.read(sorted(valid_series.iterdir()), series_instance_uid=SERIES_2_UID, timeout_s=120)
    finally:
        client.close()
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_no_canary(failure.value.details(), "the requested-series error")


def test_same_sop_instance_twice(server, valid_series, tmp_path, capsys):
    folder = shutil.copytree(valid_series, tmp_path / "dup")
    paths = sorted(folder.iterdir())
    rewrite(paths[:2], lambda k, ds: setattr(ds, "SOPInstanceUID", f"{SERIES_UID}.1"))
    code, err = cli_read(capsys, server, folder)
    expect_error(code, err, "INVALID_ARGUMENT")


def test_truncated_inside_the_patient_name(server, valid_series, tmp_path, capsys):
    folder = shutil.copytree(valid_series, tmp_path / "cut")
    target = sorted(folder.iterdir())[3]
    data = target.read_bytes()
    target.write_bytes(data[: data.find(NAME.encode()) + 7])
    code, err = cli_read(capsys, server, folder)
    expect_error(code, err, "INVALID_ARGUMENT")
    assert "(0010,0010)" in err


def test_missing_slice(server, valid_series, tmp_path, capsys):
    folder = shutil.copytree(valid_series, tmp_path / "gap")
    sorted(folder.iterdir())[10].unlink()
    code, err = cli_read(capsys, server, folder)
    expect_error(code, err, "INVALID_ARGUMENT")


def test_only_non_image_objects(server, tmp_path, capsys):
    folder = tmp_path / "sr_only"
    folder.mkdir()
    for k in range(2):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.22", f"{UID_ROOT}.9.{k}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_UID, f"{UID_ROOT}.9"
        ds.Modality, ds.PatientName, ds.PatientID, ds.PatientBirthDate = "SR", NAME, PATIENT_ID, BIRTH_DATE
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = (
            ds.SOPClassUID,
            ds.SOPInstanceUID,
        )
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.save_as(folder / f"sr{k}.dcm", enforce_file_format=True)
    code, err = cli_read(capsys, server, folder)
    expect_error(code, err, "INVALID_ARGUMENT")


def test_truncated_nifti_with_patient_data_in_its_header(server, tmp_path, capsys):
    image = nib.Nifti1Image(np.zeros((16, 16, 8), np.int16), np.eye(4))
    image.header["descrip"] = NAME.encode()
    raw = image.to_bytes()
    data = bytearray(raw[: len(raw) - 100])
    struct.pack_into("<h", data, 40, 3)
    path = tmp_path / "cut.nii"
    path.write_bytes(bytes(data))
    code, err = cli_read(capsys, server, path)
    expect_error(code, err, "INVALID_ARGUMENT")


def test_the_server_log_holds_no_patient_data(server):
    """Run last: the whole DEBUG log of every read above."""
    log = server.log_path.read_text(errors="replace")
    assert "request" in log and "INVALID_ARGUMENT" in log, "the log did not capture the reads"
    assert_no_canary(log, "the server log")
    assert log.count("DICOM CT:") >= 3, "the DICOM reads did not reach the log"
