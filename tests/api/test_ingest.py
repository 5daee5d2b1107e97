"""Zero-copy ingest against a real server: shared memory and files under an ingest root read like a streamed upload.

Refusals: a path outside the ingest roots (or a symlink leading out of one) is PERMISSION_DENIED, as is a
referenced payload on a server that has the path disabled; a segment smaller than the array the header describes
is INVALID_ARGUMENT; the input limits apply to referenced payloads as to streamed ones (RESOURCE_EXHAUSTED).

The server runs the real lung nodule network with seeded untrained weights and a score threshold of 0, so that
every read returns findings to compare whatever the state of the bundled weights.
"""

from __future__ import annotations

import os
import shutil
from multiprocessing import shared_memory
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import yaml

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.client import ReadingClient
from inference.modelrepo.schema import ModelConfig
from inference.phantoms import make_chest_ct, write_dicom_series, write_nifti
from inference.serverproc import ServerProcess
from inference.tasks import task_class

ROOT = Path(__file__).resolve().parents[2]
MAX_VOXELS = 1_000_000  # the test server's limit: the study below fits, a twice-as-long one does not


def untrained_repository(dst: Path) -> Path:
    """models/lung_nodule_ct/1's model.yaml with seeded random weights and score threshold 0."""
    version = dst / "lung_nodule_ct" / "1"
    version.mkdir(parents=True)
    data = yaml.safe_load((ROOT / "models" / "lung_nodule_ct" / "1" / "model.yaml").read_text())
    data["postprocessing"]["score_threshold"] = 0.0
    (version / "model.yaml").write_text(yaml.safe_dump(data))
    config = ModelConfig.from_yaml(version / "model.yaml")
    torch.manual_seed(0)
    network = task_class(config)(config, torch.device("cpu")).build_network()
    torch.save(network.state_dict(), version / "model.pt")
    return dst


@pytest.fixture(scope="module")
def ingest_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ingest_root").resolve()


@pytest.fixture(scope="module")
def ingest_server(tmp_path_factory, ingest_root):
    models = untrained_repository(tmp_path_factory.mktemp("models"))
    env = {
        "RADSERVE_INGEST_ROOTS": str(ingest_root),
        "RADSERVE_INGEST_SHARED_MEMORY": "1",
        "RADSERVE_LIMITS_MAX_VOXELS": str(MAX_VOXELS),
    }
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with ServerProcess(models=models, log_path=log_path, env=env) as proc:
        yield proc


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory):
    """A server with the default settings: ingest disabled."""
    models = untrained_repository(tmp_path_factory.mktemp("models_plain"))
    with ServerProcess(models=models, log_path=tmp_path_factory.mktemp("plain") / "server.log") as proc:
        yield proc


@pytest.fixture(scope="module")
def client(ingest_server):
    client = ReadingClient(ingest_server.target)
    yield client
    client.close()


@pytest.fixture(scope="module")
def study():
    phantom = make_chest_ct(np.random.default_rng(3), shape=(128, 128, 48), slice_spacing_mm=2.5, n_nodules=1)
    voxels = np.ascontiguousarray(np.rint(phantom.volume.voxels).astype(np.int16))
    raw = pb.RawArray(dtype="int16", shape=voxels.shape, affine=phantom.volume.affine.ravel().tolist())
    return phantom, voxels, raw


def _header(raw: pb.RawArray | None = None, payload: int = pb.RAW, **fields) -> pb.ReadHeader:
    return pb.ReadHeader(payload=payload, modality="CT", raw=raw, **fields)


def _read_referenced(client: ReadingClient, header: pb.ReadHeader) -> pb.ReadResponse:
    return client.stub.Read(iter([pb.ReadRequest(header=header)]), timeout=300)


def _findings(response: pb.ReadResponse) -> list[tuple]:
    return [(f.label, round(f.score, 4), *np.round(f.center_mm, 2), *np.round(f.bbox_mm, 2)) for f in response.findings]


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def _shm_with(data: bytes, size: int | None = None) -> shared_memory.SharedMemory:
    shm = shared_memory.SharedMemory(create=True, size=size or len(data))
    shm.buf[: min(len(data), shm.size)] = data[: shm.size]
    return shm


def test_shared_memory_and_files_find_what_a_streamed_upload_finds(client, study, ingest_root):
    _, voxels, raw = study
    data = voxels.tobytes()
    streamed = client.read([data], payload_kind=pb.RAW, modality="CT", raw=raw, timeout_s=300)
    assert streamed.findings, "the untrained model with threshold 0 should return findings to compare"

    shm = _shm_with(data, size=len(data) + 4096)  # a larger segment with the array at an offset
    try:
        shm.buf[4096 : 4096 + len(data)] = data
        ref = pb.SharedMemoryRef(name=shm.name, size_bytes=len(data), offset_bytes=4096)
        from_shm = client.read_referenced(shared_memory=ref, raw=raw, modality="CT", timeout_s=300)
    finally:
        shm.close()
        shm.unlink()

    (ingest_root / "study.raw").write_bytes(data)
    from_file = client.read_referenced(paths=[ingest_root / "study.raw"], raw=raw, modality="CT", timeout_s=300)

    assert _findings(from_shm) == _findings(streamed)
    assert _findings(from_file) == _findings(streamed)
    for response in (from_shm, from_file):
        assert {"receive", "decode", "infer", "total"} <= set(response.timing_ms)


def test_dicom_folder_and_nifti_file_under_the_root_match_their_streamed_reads(client, study, ingest_root):
    phantom, _, _ = study
    files = write_dicom_series(phantom, ingest_root / "series")
    streamed = client.read([Path(f) for f in files], timeout_s=300)
    from_folder = _read_referenced(
        client, pb.ReadHeader(payload=pb.DICOM_FILES, file=pb.FileRef(paths=[str(ingest_root / "series")]))
    )
    assert streamed.findings and _findings(from_folder) == _findings(streamed)
    assert from_folder.findings[0].sop_instance_uid  # the DICOM context came through

    nifti = write_nifti(phantom, ingest_root / "study.nii.gz")
    streamed = client.read([Path(nifti)], payload_kind=pb.NIFTI, modality="CT", timeout_s=300)
    from_file = _read_referenced(client, _header(payload=pb.NIFTI, file=pb.FileRef(paths=[str(nifti)])))
    assert _findings(from_file) == _findings(streamed)


def test_paths_outside_the_ingest_roots_are_permission_denied(client, study, ingest_root, tmp_path):
    _, voxels, raw = study
    outside = tmp_path / "outside.raw"
    outside.write_bytes(voxels.tobytes())
    link = ingest_root / "link.raw"
    if link.is_symlink():
        link.unlink()
    os.symlink(outside, link)
    folder = ingest_root / "linked_folder"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    os.symlink(outside, folder / "slice.dcm")
    for paths, payload in (
        ([str(outside)], pb.RAW),
        ([str(ingest_root / ".." / tmp_path.name / "outside.raw")], pb.RAW),  # traversal
        ([str(link)], pb.RAW),  # a symlink inside the root that leads out of it
        ([str(folder)], pb.DICOM_FILES),  # a folder holding such a link
        (["/etc/hostname"], pb.RAW),
    ):
        header = _header(raw, payload=payload, file=pb.FileRef(paths=paths))
        with pytest.raises(grpc.RpcError) as info:
            _read_referenced(client, header)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, paths
        assert str(outside) not in info.value.details()  # messages never echo paths
    relative = _header(raw, file=pb.FileRef(paths=["study.raw"]))
    assert _code(lambda: _read_referenced(client, relative)) == grpc.StatusCode.INVALID_ARGUMENT
    missing = _header(raw, file=pb.FileRef(paths=[str(ingest_root / "missing.raw")]))
    assert _code(lambda: _read_referenced(client, missing)) == grpc.StatusCode.INVALID_ARGUMENT


def test_a_segment_smaller_than_the_described_array_is_invalid_argument(client, study):
    _, voxels, raw = study
    data = voxels.tobytes()
    shm = _shm_with(data, size=len(data) // 2)
    try:
        too_small = _header(raw, shared_memory=pb.SharedMemoryRef(name=shm.name, size_bytes=len(data)))
        assert _code(lambda: _read_referenced(client, too_small)) == grpc.StatusCode.INVALID_ARGUMENT
        short = _header(raw, shared_memory=pb.SharedMemoryRef(name=shm.name, size_bytes=shm.size))
        assert _code(lambda: _read_referenced(client, short)) == grpc.StatusCode.INVALID_ARGUMENT  # raw reader
    finally:
        shm.close()
        shm.unlink()
    for name in ("../etc/passwd", "a/b", "no_such_segment_radserve"):
        header = _header(raw, shared_memory=pb.SharedMemoryRef(name=name, size_bytes=len(data)))
        assert _code(lambda h=header: _read_referenced(client, h)) == grpc.StatusCode.INVALID_ARGUMENT, name


def test_chunks_after_a_referencing_header_are_invalid_argument(client, study, ingest_root):
    _, voxels, raw = study
    (ingest_root / "study.raw").write_bytes(voxels.tobytes())
    header = _header(raw, file=pb.FileRef(paths=[str(ingest_root / "study.raw")]))
    messages = [pb.ReadRequest(header=header), pb.ReadRequest(chunk=pb.Chunk(data=b"x"))]
    assert _code(lambda: client.stub.Read(iter(messages), timeout=60)) == grpc.StatusCode.INVALID_ARGUMENT


def test_limits_apply_to_referenced_payloads(client, ingest_root):
    big = np.zeros((128, 128, 96), np.int16)  # 1.57 M voxels > MAX_VOXELS
    raw = pb.RawArray(dtype="int16", shape=big.shape, spacing_mm=[1.0, 1.0, 1.0])
    data = big.tobytes()
    (ingest_root / "big.raw").write_bytes(data)
    shm = _shm_with(data)
    try:
        via_shm = _header(raw, shared_memory=pb.SharedMemoryRef(name=shm.name, size_bytes=len(data)))
        assert _code(lambda: _read_referenced(client, via_shm)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        shm.close()
        shm.unlink()
    via_file = _header(raw, file=pb.FileRef(paths=[str(ingest_root / "big.raw")]))
    assert _code(lambda: _read_referenced(client, via_file)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    streamed = lambda: client.read([data], payload_kind=pb.RAW, modality="CT", raw=raw, timeout_s=60)  # noqa: E731
    assert _code(streamed) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_server_without_ingest_settings_refuses_referenced_payloads(plain_server, study, tmp_path):
    _, voxels, raw = study
    (tmp_path / "study.raw").write_bytes(voxels.tobytes())
    shm = _shm_with(voxels.tobytes())
    client = ReadingClient(plain_server.target)
    try:
        for header in (
            _header(raw, file=pb.FileRef(paths=[str(tmp_path / "study.raw")])),
            _header(raw, shared_memory=pb.SharedMemoryRef(name=shm.name, size_bytes=voxels.nbytes)),
        ):
            assert _code(lambda h=header: _read_referenced(client, h)) == grpc.StatusCode.PERMISSION_DENIED
    finally:
        client.close()
        shm.close()
        shm.unlink()
