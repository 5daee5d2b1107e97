"""End to end: a study read while it arrives gives the whole-study read's findings (issue #15).

DICOM files, and the same study as a .nii, a .nii.gz and a RAW array: those are decoded plane by plane as their
bytes arrive and, for the CT model, read by slab with no ``expected_instances`` (their header states the grid).

The real server and the bundled models on small phantoms. The CT model reads progressively (model.yaml
``progressive: true``): with ``expected_instances`` its patches are preprocessed and inferred as their slices arrive,
in order, reversed or shuffled; the MR model cannot (a whole-volume z-score and bias field) and reads the same
upload as a whole study. Either way the findings must equal the whole-study read's: same count and labels, centers
within 0.1 mm, scores within 1e-4; and the CT reads must find the planted nodules.
"""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest

grpc = pytest.importorskip("grpc")

from benchmarks.progressive import Throttle, same_findings  # noqa: E402
from inference.api.gen.radserve.v1 import reading_pb2 as pb  # noqa: E402
from inference.api.gen.radserve.v1 import reading_pb2_grpc as pb_grpc  # noqa: E402
from inference.cli import main as cli_main  # noqa: E402
from inference.client import MAX_MESSAGE_BYTES, iter_requests  # noqa: E402
from inference.io.dicom import read_dicom_series  # noqa: E402
from inference.io.volume import LPS_TO_RAS  # noqa: E402
from inference.phantoms import (  # noqa: E402
    make_brain_mr,
    make_chest_ct,
    make_chest_xray,
    write_dicom_series,
    write_xray_dicom,
)

MATCH_MM = 5.0


@pytest.fixture(scope="module")
def stub(server):
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    with grpc.insecure_channel(server.target, options=options) as channel:
        yield pb_grpc.ReadingServiceStub(channel)


@pytest.fixture(scope="module")
def ct_study(tmp_path_factory):
    """96 x 96 x 100 slices of 1.5 x 1.5 x 2 mm: a preprocessed grid of two patch rows along the slices."""
    rng = np.random.default_rng(15)
    phantom = make_chest_ct(
        rng, shape=(96, 96, 100), pixel_spacing_mm=1.5, slice_spacing_mm=2.0, n_nodules=2, nodule_diameters_mm=(14, 20)
    )
    folder = tmp_path_factory.mktemp("ct")
    files = write_dicom_series(phantom, folder)
    return phantom, [f.read_bytes() for f in files], folder


def read(
    stub,
    files: list[bytes],
    order,
    *,
    model: str,
    expected: int | None = None,
    rate: float | None = None,
    header: pb.ReadHeader | None = None,
):
    header = header or pb.ReadHeader(model=model, payload=pb.DICOM_FILES)
    if expected is not None:
        header.expected_instances = expected
    requests = list(iter_requests(header, [files[i] for i in order], chunk_bytes=256 * 1024))
    response = stub.Read(iter(Throttle(requests, rate)), timeout=300)
    findings = [{"label": f.label, "score": f.score, "center_mm": list(f.center_mm)} for f in response.findings]
    return findings, dict(response.timing_ms)


@pytest.fixture(scope="module")
def ct_whole(stub, ct_study):
    _, files, _ = ct_study
    findings, timing = read(stub, files, range(len(files)), model="lung_nodule_ct")
    assert "patches_before_upload_end" not in timing  # no expected_instances: the whole-study path
    return findings


def test_whole_study_read_finds_the_planted_nodules(ct_study, ct_whole):
    phantom, _, _ = ct_study
    assert ct_whole, "no findings"
    for lesion in phantom.lesions:
        distance = min(np.linalg.norm(np.subtract(f["center_mm"], lesion.center_mm)) for f in ct_whole)
        assert distance <= MATCH_MM, (lesion, ct_whole)


@pytest.mark.parametrize("order", ["in-order", "reversed", "shuffled"])
def test_progressive_ct_read_gives_the_whole_study_findings(stub, ct_study, ct_whole, order):
    _, files, _ = ct_study
    indices = list(range(len(files)))
    if order == "reversed":
        indices.reverse()
    elif order == "shuffled":
        np.random.default_rng(7).shuffle(indices)
    findings, timing = read(stub, files, indices, model="lung_nodule_ct", expected=len(files))
    assert "patches_before_upload_end" in timing, timing  # the slab path answered
    assert same_findings(findings, ct_whole), (findings, ct_whole)


def test_patches_run_while_the_upload_goes_on(stub, ct_study, ct_whole):
    """At 2 MB/s (a second for this study) the first patch row is inferred before the last slice arrives."""
    _, files, _ = ct_study
    findings, timing = read(stub, files, range(len(files)), model="lung_nodule_ct", expected=len(files), rate=2e6)
    assert timing["patches_before_upload_end"] >= 1, timing
    assert same_findings(findings, ct_whole)


@pytest.fixture(scope="module")
def ct_payloads(ct_study):
    """The DICOM study as a .nii, a .nii.gz (int16, sform) and a RAW int16 array with its LPS affine: the same voxels
    (integer HU) on the same grid, up to the sform's float32 rounding."""
    _, files, _ = ct_study
    volume = read_dicom_series(files)
    hu = volume.voxels.astype(np.int16)
    assert np.array_equal(hu, volume.voxels)
    image = nib.Nifti1Image(hu, LPS_TO_RAS @ volume.affine)
    image.set_sform(LPS_TO_RAS @ volume.affine, code=1)
    nii = image.to_bytes()
    raw = pb.RawArray(dtype="int16", shape=list(hu.shape), affine=volume.affine.ravel().tolist())
    return {
        "nii": (pb.ReadHeader(model="lung_nodule_ct", payload=pb.NIFTI, modality="CT"), nii),
        "nii.gz": (pb.ReadHeader(model="lung_nodule_ct", payload=pb.NIFTI, modality="CT"), gzip.compress(nii)),
        "raw": (pb.ReadHeader(model="lung_nodule_ct", payload=pb.RAW, modality="CT", raw=raw), hu.tobytes()),
    }


@pytest.mark.parametrize("kind", ["nii", "nii.gz", "raw"])
def test_nifti_and_raw_uploads_are_read_by_slab_with_the_dicom_whole_study_findings(stub, ct_payloads, ct_whole, kind):
    """At 2 MB/s: a .nii's z-slices complete the first patch row before its last byte. The .nii.gz is two chunks
    of 256 KiB (the phantom compresses well), and a RAW array's x-planes (its grid's slices) cover both patch rows'
    x-extent only at the end; their slab reads answer all the same."""
    header, payload = ct_payloads[kind]
    findings, timing = read(stub, [payload], [0], model="lung_nodule_ct", header=header, rate=2e6)
    assert "patches_before_upload_end" in timing, timing  # the slab path answered
    if kind == "nii":
        assert timing["patches_before_upload_end"] >= 1, timing
    assert same_findings(findings, ct_whole), (findings, ct_whole)


@pytest.mark.parametrize("damage", ["truncated", "one byte flipped"])
def test_a_damaged_nifti_keeps_the_whole_payload_reader_s_status_and_message(stub, ct_payloads, damage):
    """The stream leaves what it cannot prove to the whole-payload reader: the same error as a read of the same
    bytes by reference would give (here: read_nifti's message, INVALID_ARGUMENT)."""
    header, payload = ct_payloads["nii.gz"]
    if damage == "truncated":
        payload = payload[: len(payload) - 1000]
    else:
        payload = bytearray(payload)
        payload[-6] ^= 0x01  # the trailer's CRC-32: the voxels inflate, the check fails at the end
        payload = bytes(payload)
    with pytest.raises(grpc.RpcError) as caught:
        read(stub, [payload], [0], model="lung_nodule_ct", header=header, rate=4e6)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "NIfTI gzip stream is corrupt or truncated" in caught.value.details()


def test_radserve_read_declares_the_instance_count(server, ct_study, ct_whole, capsys):
    """`radserve read` of a series' folder sends its file count, so the CT model's slab path answers."""
    _, _, folder = ct_study
    args = ["read", str(folder), "--model", "lung_nodule_ct", "--format", "json", "--server", server.target]
    assert cli_main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert "patches_before_upload_end" in result["timing_ms"], result["timing_ms"]
    assert same_findings(result["findings"], ct_whole), (result["findings"], ct_whole)


def test_a_wrong_instance_count_falls_back_to_the_whole_study_answer(stub, ct_study, ct_whole):
    _, files, _ = ct_study
    findings, timing = read(stub, files, range(len(files)), model="lung_nodule_ct", expected=len(files) + 4)
    assert "patches_before_upload_end" not in timing, timing
    assert same_findings(findings, ct_whole)


def test_series_checks_keep_their_status(stub, ct_study):
    """A missing slice is the whole-study read's INVALID_ARGUMENT, with the same message."""
    _, files, _ = ct_study
    order = [i for i in range(len(files)) if i != 40]
    messages = []
    for expected in (None, len(files)):
        with pytest.raises(grpc.RpcError) as caught:
            read(stub, files, order, model="lung_nodule_ct", expected=expected)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        messages.append(caught.value.details())
    assert "missing" in messages[0] and messages[0] == messages[1]


def test_expected_instances_out_of_range_is_invalid_argument_or_the_file_limit(stub, ct_study):
    _, files, _ = ct_study
    with pytest.raises(grpc.RpcError) as caught:
        read(stub, files[:3], range(3), model="lung_nodule_ct", expected=0)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "header.expected_instances must be at least 1, got 0" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:  # the server's default limit: 4000 files per study
        read(stub, files[:3], range(3), model="lung_nodule_ct", expected=100_000)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "declares 100000 files, more than the limit of" in caught.value.details()


def test_a_model_that_cannot_read_progressively_answers_as_a_whole_study(stub, tmp_path):
    phantom = make_brain_mr(
        np.random.default_rng(3),
        shape=(96, 96, 48),
        pixel_spacing_mm=2.0,
        slice_spacing_mm=2.5,
        n_lesions=1,
        lesion_diameters_mm=(24.0,),
    )
    files = [f.read_bytes() for f in write_dicom_series(phantom, tmp_path)]
    whole, _ = read(stub, files, range(len(files)), model="brain_lesion_mr")
    (lesion,) = phantom.lesions
    assert any(np.linalg.norm(np.subtract(f["center_mm"], lesion.center_mm)) <= MATCH_MM for f in whole), whole
    shuffled = list(range(len(files)))
    np.random.default_rng(1).shuffle(shuffled)
    findings, timing = read(stub, files, shuffled, model="brain_lesion_mr", expected=len(files))
    assert "patches_before_upload_end" not in timing
    assert same_findings(findings, whole), (findings, whole)


def test_an_xray_declaring_its_one_instance_answers_as_without(stub, tmp_path):
    """A projection X-ray is one image: declared or not, it is read whole, and the answer is the same."""
    phantom = make_chest_xray(
        np.random.default_rng(4242), size_px=(512, 512), pixel_spacing_mm=0.6, opacity_diameters_mm=(30.0,)
    )
    write_xray_dicom(phantom, tmp_path / "dx.dcm")
    files = [(tmp_path / "dx.dcm").read_bytes()]
    whole, _ = read(stub, files, [0], model="chest_xray")
    assert whole, "no findings"
    findings, timing = read(stub, files, [0], model="chest_xray", expected=1)
    assert "patches_before_upload_end" not in timing
    assert same_findings(findings, whole), (findings, whole)


@pytest.mark.server
def test_without_progressive_reads_a_nifti_is_decoded_after_its_last_byte_with_the_same_findings(
    model_repo, ct_payloads, ct_whole
):
    """The operator's switch (`--no-progressive-reads`, the benchmarks' baseline): the whole-study path answers."""
    import asyncio

    from inference.api.server import RadserveServer
    from inference.config import ServerConfig
    from inference.serverproc import free_port

    config = ServerConfig(
        port=free_port(),
        models=model_repo("lung_nodule_ct"),
        device="cpu",
        metrics_port=0,
        model_poll_interval_s=0,
        progressive_reads=False,
    )
    header, payload = ct_payloads["nii"]

    async def scenario() -> pb.ReadResponse:
        server = RadserveServer(config)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = pb_grpc.ReadingServiceStub(channel)
                return await stub.Read(iter(iter_requests(header, [payload], chunk_bytes=256 * 1024)), timeout=120)
        finally:
            await server.stop()

    response = asyncio.run(scenario())
    assert "patches_before_upload_end" not in response.timing_ms
    findings = [{"label": f.label, "score": f.score, "center_mm": list(f.center_mm)} for f in response.findings]
    assert same_findings(findings, ct_whole), (findings, ct_whole)
