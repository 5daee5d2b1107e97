"""The archive's own auth: HTTP basic auth against a real Orthanc with users, and a bearer token read from a file
that another process refreshes."""

from __future__ import annotations

import os

import pytest
import requests

from inference.bridge.archive import ArchiveError, BearerTokenFile, DicomWebArchive
from inference.bridge.config import BridgeConfig
from inference.bridge.orthanc import OrthancProcess, orthanc_available


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
