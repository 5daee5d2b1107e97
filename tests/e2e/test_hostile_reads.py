"""Issue #12's reproducers against one real server: no input or client can wedge, starve or mislead it.

One server with the bundled models, short receive deadlines (2 s to the first chunk; after a 1 s grace, at least
64 KiB/s), at most 2 reads in flight and a 1 GB memory budget. Every hostile read must end with a precise status
(never INTERNAL or UNKNOWN), and the valid reads around them must still be answered.
"""

from __future__ import annotations

import gzip
import re
import sys
import threading
import time
from pathlib import Path

import grpc
import nibabel as nib
import numpy as np
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.api.gen.radserve.v1 import reading_pb2_grpc as pb_grpc
from inference.cli import main as cli_main
from inference.client import ReadingClient
from inference.io.dicom import hash_uid
from inference.io.volume import Volume
from inference.phantoms import make_chest_ct, write_dicom_series
from inference.serverproc import ServerProcess

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "io"))
from test_hostile_input import FORGED, deflate_body, dicom_file

ROOT = Path(__file__).resolve().parents[2]
FIRST_CHUNK_S = 2.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("hostile") / "server.log"
    args = ["--log-level", "DEBUG", "--max-in-flight", "2", "--memory-budget-gb", "1"]
    args += ["--upload-first-chunk-timeout-s", str(FIRST_CHUNK_S), "--upload-min-bytes-per-s", "65536"]
    env = {"RADSERVE_UPLOAD_RATE_GRACE_S": "1", "RADSERVE_DECODE_TIMEOUT_S": "60"}
    with ServerProcess(models=ROOT / "models", log_path=log_path, extra_args=args, env=env) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    client = ReadingClient(server.target)
    yield client
    client.close()


@pytest.fixture(scope="module")
def valid():
    """A small chest CT with one 16 mm nodule, as a raw array."""
    phantom = make_chest_ct(4, shape=(96, 96, 40), pixel_spacing_mm=1.5, slice_spacing_mm=2.5, n_nodules=1)
    volume = phantom.volume
    raw = pb.RawArray(dtype="float32", shape=volume.shape, affine=volume.affine.ravel().tolist())
    return volume.voxels.astype(np.float32).tobytes(), raw


def read_valid(client, valid, timeout_s: float = 120) -> pb.ReadResponse:
    data, raw = valid
    return client.read([data], payload_kind=pb.RAW, raw=raw, modality="CT", timeout_s=timeout_s)


def status_of(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def padded_deflated() -> bytes:
    for rows in range(1500, 1600):
        data = dicom_file(np.zeros((rows, 1536), dtype=np.uint16), syntax=DeflatedExplicitVRLittleEndian)
        if deflate_body(data)[1] == 1:
            return data
    raise AssertionError("no odd-length deflate stream")


# -- defect 1 -----------------------------------------------------------------------------------------------------


def test_three_deflate_reads_then_a_valid_read_completes(client, valid):
    data = padded_deflated()
    for _ in range(3):
        code, details = status_of(lambda: client.read([data], timeout_s=60))
        # A one-slice 1500 x 1536 CT: read, then refused by the CT model's declared minimum (4 slices).
        assert code == grpc.StatusCode.FAILED_PRECONDITION, details
        assert "reads studies of at least 16 x 16 x 4 voxels (input.min_shape" in details
    assert read_valid(client, valid).model == "lung_nodule_ct"


# -- defect 2 -----------------------------------------------------------------------------------------------------


class IdleStream:
    """A Read that sends its header and then nothing, with no deadline."""

    def __init__(self, stub) -> None:
        self.release = threading.Event()

        def requests():
            yield pb.ReadRequest(header=pb.ReadHeader(payload=pb.RAW, modality="CT"))
            self.release.wait(120)

        self.future = stub.Read.future(requests())


def test_64_idle_streams_starve_no_one_and_end_at_the_receive_deadline(server, client, valid):
    channel = grpc.insecure_channel(server.target)
    stub = pb_grpc.ReadingServiceStub(channel)
    idle = [IdleStream(stub) for _ in range(64)]
    try:
        time.sleep(0.5)
        start = time.monotonic()
        for attempt in range(20):  # a client that retries UNAVAILABLE
            code, details = status_of(lambda: read_valid(client, valid))
            if code != grpc.StatusCode.UNAVAILABLE:
                break
            time.sleep(0.25 * (attempt + 1))
        assert code == grpc.StatusCode.OK, details
        assert attempt == 0, "idle uploads took the compute slots"
        assert time.monotonic() - start < 60
        outcomes = [status_of(lambda s=s: s.future.result(timeout=30)) for s in idle]
    finally:
        for stream in idle:
            stream.release.set()
        channel.close()
    assert {code for code, _ in outcomes} == {grpc.StatusCode.DEADLINE_EXCEEDED}, outcomes[:3]
    assert f"no payload arrived within {FIRST_CHUNK_S:g} s of the Read's start" in outcomes[0][1]


def test_an_upload_that_stalls_after_its_first_chunk_ends_at_the_minimum_rate(server):
    release = threading.Event()

    def requests():
        yield pb.ReadRequest(header=pb.ReadHeader(payload=pb.RAW, modality="CT"))
        yield pb.ReadRequest(chunk=pb.Chunk(file_index=0, data=bytes(4096)))
        release.wait(60)

    with grpc.insecure_channel(server.target) as channel:
        start = time.monotonic()
        code, details = status_of(lambda: pb_grpc.ReadingServiceStub(channel).Read(requests()))
        release.set()
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "the upload slowed below 65536 bytes/s (upload_min_bytes_per_s): 4096 bytes" in details
    assert time.monotonic() - start < 15


class TricklingUpload:
    """A progressive Read (lung_nodule_ct, ``expected_instances``) that sends one 128 x 128 slice every 0.25 s,
    above the minimum rate: its grid is fixed after two slices, and it would take 15 s to finish."""

    def __init__(self, stub, files: list[bytes]) -> None:
        self.stop = threading.Event()  # send no more slices
        self.cancelled = threading.Event()  # the call is cancelled: the generator may end

        def requests():
            header = pb.ReadHeader(model="lung_nodule_ct", payload=pb.DICOM_FILES, expected_instances=len(files))
            yield pb.ReadRequest(header=header)
            for index, data in enumerate(files):
                yield pb.ReadRequest(chunk=pb.Chunk(file_index=index, data=data))
                if self.stop.wait(0.25):
                    break
            self.cancelled.wait(60)  # the stream stays open until the call is cancelled

        self.future = stub.Read.future(requests(), timeout=60)


def test_slow_progressive_uploads_take_at_most_half_the_compute_slots(server, client, valid, tmp_path):
    """A read that computes while it uploads holds its compute slot until its client has sent everything; two slow
    ones must not take both slots of this server (then every other upload would get UNAVAILABLE)."""
    phantom = make_chest_ct(5, shape=(128, 128, 60), pixel_spacing_mm=1.5, slice_spacing_mm=2.5, n_nodules=1)
    files = [path.read_bytes() for path in write_dicom_series(phantom, tmp_path)]
    channel = grpc.insecure_channel(server.target)
    uploads = [TricklingUpload(pb_grpc.ReadingServiceStub(channel), files) for _ in range(2)]
    try:
        time.sleep(2.0)  # both grids fixed, the slab reads asked for their slots
        code, details = status_of(lambda: read_valid(client, valid))
        assert code == grpc.StatusCode.OK, details
        assert all(not upload.future.done() for upload in uploads), "the uploads ended before the valid read"
    finally:
        for upload in uploads:
            upload.stop.set()
            upload.future.cancel()
            upload.cancelled.set()
        channel.close()
    assert "no compute share free while uploading" in server.log_path.read_text()
    for _ in range(50):  # the cancelled reads give their slots back (cancellation reaches the server in a moment)
        code, details = status_of(lambda: read_valid(client, valid))
        if code != grpc.StatusCode.UNAVAILABLE:
            break
        time.sleep(0.2)
    assert code == grpc.StatusCode.OK, details


# -- defects 3 and 4 ---------------------------------------------------------------------------------------------


def raw_read(client, spacing=None, affine=None, shape=(8, 8, 8), dtype="float32", values=None):
    data = np.zeros(shape, dtype=dtype) if values is None else values
    raw = pb.RawArray(dtype=dtype, shape=shape, spacing_mm=spacing or (), affine=affine or ())
    return lambda: client.read([data.tobytes()], payload_kind=pb.RAW, raw=raw, modality="CT", timeout_s=30)


def nifti_read(client, zooms):
    image = nib.Nifti1Image(np.ones((8, 8, 8), dtype=np.int16), np.diag([*zooms, 1.0]))
    return lambda: client.read([gzip.compress(image.to_bytes())], payload_kind=pb.NIFTI, modality="CT", timeout_s=30)


def dicom_read(client, **attrs):
    stored = np.full((16, 16), 1000, dtype=np.uint16)
    files = [dicom_file(stored, number=i, **attrs) for i in range(2)]
    return lambda: client.read(files, timeout_s=30)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda c: raw_read(c, spacing=(1e-300, 1, 1)), "raw geometry: voxel spacing along axis 0"),
        (lambda c: raw_read(c, spacing=(1e300, 1, 1)), "raw geometry: voxel spacing along axis 0"),
        (lambda c: raw_read(c, spacing=(1, 1e20, 1)), "raw geometry: voxel spacing along axis 1"),
        (lambda c: nifti_read(c, (1e6, 1, 1)), "NIfTI sform: voxel spacing along axis 0"),
        (lambda c: nifti_read(c, (1, 1, 1e30)), "NIfTI sform: voxel spacing along axis 2"),
        (lambda c: dicom_read(c, PixelSpacing=[1e-6, 1e-6]), "PixelSpacing [1e-06, 1e-06]"),
        (lambda c: dicom_read(c, PixelSpacing=[1e300, 1e300]), "plausible range 0.001-100 mm"),
        (lambda c: dicom_read(c, RescaleSlope=1e308), "slope 1e+308 is outside the plausible range"),
        (lambda c: dicom_read(c, RescaleIntercept=1e308), "intercept 1e+308 is outside the plausible range"),
        (
            lambda c: raw_read(c, spacing=(1, 1, 1), dtype="float64", values=np.full((8, 8, 8), 1e300)),
            "NaN or infinite voxel values",
        ),
    ],
    ids=[
        "raw-1e-300",
        "raw-1e300",
        "raw-1e20",
        "nifti-1e6",
        "nifti-1e30",
        "px-1e-6",
        "px-1e300",
        "slope",
        "icept",
        "f64",
    ],
)
def test_extreme_but_finite_values_are_invalid_argument(client, make, message):
    code, details = status_of(make(client))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert message in details


def test_slices_1e300_mm_apart_are_invalid_argument(client):
    stored = np.full((16, 16), 1000, dtype=np.uint16)
    files = [dicom_file(stored, number=0), dicom_file(stored, number=1, position=(0.0, 0.0, 1e300))]
    code, details = status_of(lambda: client.read(files, timeout_s=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "outside the plausible +-100000 mm" in details


def test_an_unknown_payload_kind_with_two_files_is_invalid_argument(client):
    code, details = status_of(lambda: client.read([b"a", b"b"], payload_kind=99, timeout_s=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("header.payload 99 is not a known PayloadKind")


# -- defect 5 ---------------------------------------------------------------------------------------------------


def test_a_tiny_upload_that_would_resample_into_gigabytes_is_refused_before_it_is_built(client):
    code, details = status_of(raw_read(client, spacing=(15.0, 15.0, 15.0), shape=(64, 64, 16), dtype="int16"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "would resample the study's 65536 voxels onto 65536000 (1000 times as many" in details


def test_a_read_larger_than_the_memory_budget_is_resource_exhausted(client):
    shape = (400, 400, 400)  # 64 MB of uint8: its decoded float32 voxels alone are 256 MB, its estimate over 1 GB
    code, details = status_of(raw_read(client, spacing=(1.0, 1.0, 1.0), shape=shape, dtype="uint8"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "more than this server's whole memory budget of 1074 MB (memory_budget_gb)" in details


def test_a_one_slice_mr_and_a_16_pixel_xray_get_the_models_minimum(client):
    code, details = status_of(lambda: client.read([Path(get_testdata_file("MR_small.dcm"))], timeout_s=60))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    # The default (newest) version of the brain model; every version declares the same minimum.
    assert re.search(r"model brain_lesion_mr:\d+ reads studies of at least 16 x 16 x 4 voxels", details), details
    xray = np.full((16, 16, 1), 1000, dtype=np.uint16)
    raw = pb.RawArray(dtype="uint16", shape=(16, 16, 1), spacing_mm=(0.2, 0.2, 1.0))
    code, details = status_of(
        lambda: client.read([xray.tobytes()], payload_kind=pb.RAW, raw=raw, modality="DX", timeout_s=60)
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "model chest_xray:1 reads studies of at least 64 x 64 voxels" in details


# -- defect 6 ---------------------------------------------------------------------------------------------------


def test_a_forged_transfer_syntax_reaches_neither_message_nor_log_as_a_line(server, client):
    data = dicom_file(np.zeros((8, 8), dtype=np.uint16))
    old = b"1.2.840.10008.1.2.1\0"
    new = FORGED.encode("utf-8")
    new += b"\0" * (len(new) % 2)
    patched = data.replace(len(old).to_bytes(2, "little") + old, len(new).to_bytes(2, "little") + new, 1)
    group_length = int.from_bytes(patched[140:144], "little") + len(new) - len(old)
    patched = patched[:140] + group_length.to_bytes(4, "little") + patched[144:]
    code, details = status_of(lambda: client.read([patched], timeout_s=30))
    assert code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INVALID_ARGUMENT), details
    assert "\n" not in details and "\x00" not in details and details.isascii()
    time.sleep(0.5)
    log = server.log_path.read_bytes()
    assert b"\x00" not in log and b"\x1b" not in log
    for line in log.decode("ascii").splitlines():  # every byte of the log is ASCII
        assert not line.startswith("2024-01-01 00:00:00,000"), "a forged log line"
    assert "1.2.3\\n2024-01-01 00:00:00,000 INFO radserve.audit" in log.decode()


# -- the CLI as a new user meets it ---------------------------------------------------------------------------


def test_read_series_picks_one_series_of_several_and_the_error_lists_them(server, tmp_path, capsys):
    phantom = make_chest_ct(9, shape=(48, 48, 12), pixel_spacing_mm=0.8, slice_spacing_mm=2.5, n_nodules=1)
    write_dicom_series(phantom, tmp_path / "a", series_instance_uid="1.2.826.0.1.3680043.10.997.1", series_number=5)
    write_dicom_series(phantom, tmp_path / "b", series_instance_uid="1.2.826.0.1.3680043.10.997.2", series_number=6)
    assert cli_main(["read", str(tmp_path), "--server", server.target, "--format", "json"]) == 1
    err = capsys.readouterr().err
    assert "error: INVALID_ARGUMENT: the upload holds 2 image series and none was chosen" in err
    assert err.count("\n") == 1, err  # one line, as every error of the CLI, naming each series without its UID
    first, second = hash_uid("1.2.826.0.1.3680043.10.997.1"), hash_uid("1.2.826.0.1.3680043.10.997.2")
    assert f"series 5 ({first}, 12 images); series 6 ({second}, 12 images)" in err and "997" not in err
    args = ["read", str(tmp_path), "--server", server.target, "--format", "json"]
    assert cli_main([*args, "--series", "1.2.826.0.1.3680043.10.997.2"]) == 0
    assert '"model": "lung_nodule_ct"' in capsys.readouterr().out
    assert cli_main([*args, "--series", first]) == 0  # or by the hash the error lists it by


def test_read_seg_with_nothing_to_segment_says_so_on_stderr(server, client, valid, tmp_path, capsys):
    air = Volume(np.full((48, 48, 12), -1000.0, dtype=np.float32), np.diag([0.8, 0.8, 2.5, 1.0]), "CT")
    files = write_dicom_series(air, tmp_path / "ct")  # nothing in it to find, so nothing to segment
    seg = tmp_path / "seg.dcm"
    assert cli_main(["read", *map(str, files), "--server", server.target, "--seg", str(seg)]) == 0
    err = capsys.readouterr().err
    assert f"no DICOM SEG written to {seg}: no findings: DICOM SEG omitted" in err and not seg.exists()


def test_read_help_gives_the_servers_default(capsys):
    with pytest.raises(SystemExit):
        cli_main(["read", "--help"])
    assert "(default 127.0.0.1:50051)" in " ".join(capsys.readouterr().out.split())


def test_without_a_tokens_file_model_management_is_off(client):
    code, details = status_of(lambda: client.load_model(ROOT / "models" / "lung_nodule_ct" / "1"))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "LoadModel needs an operator's token, and this server has no tokens file" in details
    assert {v.source for m in client.list_models().models for v in m.versions} == {""}


def test_no_read_got_internal_or_unknown(server):
    log = server.log_path.read_text()
    assert "status=INTERNAL" not in log and "status=UNKNOWN" not in log
    assert "failed with an unexpected error" not in log
