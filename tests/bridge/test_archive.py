"""The DICOMweb archive client: the study listing against a real Orthanc, the archive's own auth (HTTP basic auth
against an Orthanc with users, a bearer token read from a file that another process refreshes)."""

from __future__ import annotations

import os

import pytest
import requests

from inference.bridge.archive import ArchiveError, BearerTokenFile, DicomWebArchive
from inference.bridge.config import BridgeConfig
from inference.bridge.orthanc import OrthancProcess, orthanc_available


@pytest.mark.server
@pytest.mark.skipif(not orthanc_available(), reason="Orthanc with its DICOMweb plugin is not installed")
def test_basic_auth_against_an_orthanc_with_users(tmp_path):
    from pydicom.data import get_testdata_file

    with OrthancProcess(tmp_path / "orthanc", users={"bridge": "s3cret"}) as orthanc:
        orthanc.upload([get_testdata_file("CT_small.dcm")])
        (study,) = DicomWebArchive(orthanc.dicomweb_url, basic_auth="bridge:s3cret").list_studies([])
        assert study.instances == 1
        with pytest.raises(ArchiveError) as refused:
            DicomWebArchive(orthanc.dicomweb_url).list_studies([])
        assert (refused.value.status, refused.value.retriable) == ("HTTP 401", False)
        assert "s3cret" not in refused.value.message and orthanc.dicomweb_url not in refused.value.message


def test_a_token_file_is_read_again_when_it_changes(tmp_path):
    path = tmp_path / "token"
    path.write_text("first-token\n")
    auth = BearerTokenFile(path)
    request = requests.Request("GET", "https://archive.example.com/dicom-web/studies", auth=auth).prepare()
    assert request.headers["Authorization"] == "Bearer first-token"
    path.write_text("second-token\n")
    os.utime(path, (1, 1))  # a refresh within the same mtime tick is still seen as a change
    request = requests.Request("GET", "https://archive.example.com/dicom-web/studies", auth=auth).prepare()
    assert request.headers["Authorization"] == "Bearer second-token"


def test_one_archive_auth_at_most():
    base = {"dicomweb_url": "https://archive/dicom-web", "server": "radserve:50051", "state_dir": "/tmp/s"}
    with pytest.raises(ValueError, match="at most one of dicomweb_token, dicomweb_token_file"):
        BridgeConfig(**base, dicomweb_token="t", dicomweb_basic_auth="u:p")
    with pytest.raises(ValueError, match="USER:PASSWORD"):
        BridgeConfig(**base, dicomweb_basic_auth="no-colon")
    assert "u:p" not in repr(BridgeConfig(**base, dicomweb_basic_auth="u:p"))


@pytest.mark.server
@pytest.mark.skipif(not orthanc_available(), reason="Orthanc with its DICOMweb plugin is not installed")
def test_a_study_uid_under_two_patients_and_overlapping_pages_count_each_instance_once(tmp_path):
    """Orthanc keys a study by patient and UID, so one StudyInstanceUID stored under two PatientIDs is listed twice;
    the bridge knows studies by UID and must see every instance. Pages of 2 overlapping by 1 list entries twice."""
    import pydicom
    from pydicom.data import get_testdata_file

    first = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    other_patient = pydicom.dcmread(get_testdata_file("reportsi.dcm"))
    other_patient.StudyInstanceUID = first.StudyInstanceUID
    other_patient.PatientID = "SOMEONE-ELSE"
    other_patient.save_as(tmp_path / "other.dcm")
    third = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    third.save_as(tmp_path / "third.dcm")
    with OrthancProcess(tmp_path / "orthanc") as orthanc:
        orthanc.upload([get_testdata_file("CT_small.dcm"), tmp_path / "other.dcm", tmp_path / "third.dcm"])
        listing = DicomWebArchive(orthanc.dicomweb_url, page_size=2, page_overlap=1).list_studies([])
    counts = {study.uid: study.instances for study in listing}
    assert counts == {str(first.StudyInstanceUID): 2, str(third.StudyInstanceUID): 1}
