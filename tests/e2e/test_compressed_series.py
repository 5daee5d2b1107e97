"""End to end: one phantom CT, stored five ways, read to the same findings by the real server and model.

The reference is the uncompressed single-frame series. Re-encoded as JPEG 2000 lossless and as RLE lossless it
holds the same stored values, so the findings must agree: same count, centers within 0.1 mm, scores within
1e-3. So must the same voxels with every axis flipped (rows right-to-left, columns anterior-to-posterior, slices
descending) in shuffled files, and as one Enhanced CT multi-frame file (JPEG 2000 compressed, frames in the
flipped order): the reader's geometry, not the file layout, decides where a finding is.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from inference.client import ReadingClient
from inference.io.volume import Volume
from inference.phantoms import make_chest_ct, write_dicom_multiframe, write_dicom_series
from inference.serverproc import ServerProcess

MODEL = "lung_nodule_ct"
CENTER_ATOL_MM = 0.1
SCORE_ATOL = 1e-3
MATCH_MM = 3.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_repo) -> Iterator[ServerProcess]:
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with ServerProcess(models=model_repo(MODEL), log_path=log_path, env={"RADSERVE_WARMUP": "0"}) as proc:
        yield proc


@pytest.fixture(scope="module")
def phantom():
    return make_chest_ct(
        20261130, shape=(128, 128, 60), pixel_spacing_mm=1.0, slice_spacing_mm=2.5, n_nodules=2,
        nodule_diameters_mm=(12.0, 18.0), row_direction=(1.0, 0.0, 0.0), column_direction=(0.0, 1.0, 0.0),
        slice_direction_sign=1,
    )  # fmt: skip


def flipped(volume: Volume) -> Volume:
    """The same voxels at the same patient positions, every array axis reversed."""
    flip = np.eye(4)
    for axis, size in enumerate(volume.shape):
        flip[axis, axis], flip[axis, 3] = -1.0, size - 1
    return Volume(
        voxels=np.ascontiguousarray(volume.voxels[::-1, ::-1, ::-1]), affine=volume.affine @ flip, modality="CT"
    )


def read(server: ServerProcess, files: list[Path]) -> list:
    client = ReadingClient(server.target)
    try:
        return list(client.read(sorted(files), model=MODEL, timeout_s=300).findings)
    finally:
        client.close()


def syntax_of(path: Path) -> str:
    return pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID


@pytest.fixture(scope="module")
def reference(server, phantom, tmp_path_factory) -> list:
    files = write_dicom_series(phantom, tmp_path_factory.mktemp("plain"), transfer_syntax=ExplicitVRLittleEndian)
    findings = read(server, files)
    for lesion in phantom.lesions:  # the comparison means something only if the model finds what was planted
        distances = [np.linalg.norm(np.subtract(f.center_mm, lesion.center_mm)) for f in findings]
        assert distances and min(distances) <= MATCH_MM, f"{lesion} not found in the reference read: {findings}"
    return findings


def assert_same_findings(findings: list, reference: list) -> None:
    assert len(findings) == len(reference), (findings, reference)
    remaining = list(findings)
    for expected in reference:
        nearest = min(remaining, key=lambda f: np.linalg.norm(np.subtract(f.center_mm, expected.center_mm)))
        remaining.remove(nearest)
        np.testing.assert_allclose(nearest.center_mm, expected.center_mm, atol=CENTER_ATOL_MM, rtol=0)
        assert nearest.score == pytest.approx(expected.score, abs=SCORE_ATOL)
        assert nearest.label == expected.label


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, RLELossless], ids=["jpeg2000_lossless", "rle_lossless"])
def test_lossless_compressed_series_gives_the_same_findings(server, phantom, reference, syntax, tmp_path):
    files = write_dicom_series(phantom, tmp_path, transfer_syntax=syntax)
    assert {syntax_of(f) for f in files} == {syntax}
    if shutil.which("dciodvfy"):  # the encoded instances are valid CT Image objects
        check = subprocess.run(["dciodvfy", str(files[0])], capture_output=True, text=True, timeout=60)
        errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
        assert not errors, errors
    assert_same_findings(read(server, files), reference)


def test_flipped_shuffled_series_gives_the_same_findings(server, phantom, reference, tmp_path):
    files = write_dicom_series(flipped(phantom.volume), tmp_path, shuffle=np.random.default_rng(11))
    first = pydicom.dcmread(sorted(files)[0], stop_before_pixels=True)
    assert [float(v) for v in first.ImageOrientationPatient] == [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0]
    assert_same_findings(read(server, files), reference)


def test_enhanced_multiframe_gives_the_same_findings(server, phantom, reference, tmp_path):
    path = write_dicom_multiframe(flipped(phantom.volume), tmp_path / "ct.dcm", transfer_syntax=JPEG2000Lossless)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.SOPClassUID == pydicom.uid.EnhancedCTImageStorage and int(ds.NumberOfFrames) == phantom.volume.shape[2]
    assert syntax_of(path) == JPEG2000Lossless
    assert_same_findings(read(server, [path]), reference)
