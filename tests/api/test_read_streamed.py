"""ReadStreamed through the real server and the bundled brain MR model: DICOM SR and SEG in chunks.

The server sends DICOM outputs in chunks of 8 KiB here (``output_chunk_bytes``; 4 MiB by default), so that the SEG
of a small study (about 50 kB) comes in several chunks and the test stays fast on a CPU: the chunking does not
depend on the chunk size. 4 MiB chunks of larger objects, and Read refusing an answer that exceeds the maximum
message size: tests/api/test_streamed_outputs.py.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from inference import client as client_module
from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.cli import main as radserve_main
from inference.client import ReadingClient, assemble, iter_requests
from inference.phantoms import make_brain_mr, write_dicom_series
from inference.serverproc import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
CHUNK_BYTES = 8192
OUTPUTS = [pb.FINDINGS, pb.DICOM_SR, pb.DICOM_SEG]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server with only the brain MR model (less warm-up) and small output chunks."""
    tmp = tmp_path_factory.mktemp("streamed")
    repo = tmp / "models"
    repo.mkdir()
    (repo / "brain_lesion_mr").symlink_to(ROOT / "models" / "brain_lesion_mr")
    config = tmp / "radserve.yaml"
    config.write_text(f"output_chunk_bytes: {CHUNK_BYTES}\n")
    with ServerProcess(models=repo, log_path=tmp / "server.log", extra_args=["--config", str(config)]) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    reading = ReadingClient(server.target)
    yield reading
    reading.close()


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> list[Path]:
    """A 160x160x40 brain MR with two bright lesions (the study of tests/e2e/test_read_modalities.py)."""
    phantom = make_brain_mr(
        np.random.default_rng(777),
        shape=(160, 160, 40),
        pixel_spacing_mm=1.2,
        slice_spacing_mm=4.0,
        lesion_diameters_mm=(14.0, 24.0),
        lesion_contrasts=("bright", "bright"),
    )
    return write_dicom_series(phantom, tmp_path_factory.mktemp("mr"), shuffle=np.random.default_rng(1))


def canonical(data: bytes) -> list[tuple[str, str, object]]:
    """A DICOM object's elements, depth first, with what each object gets anew (UIDs made for it, its creation date
    and time) replaced by placeholders: UIDs by the order of their first appearance, so that references between
    elements must still agree."""
    uids: dict[str, str] = {}

    def walk(ds: pydicom.Dataset, path: str) -> list[tuple[str, str, object]]:
        rows = []
        for element in ds:
            where = f"{path}{element.tag}"
            if element.VR == "SQ":
                for index, item in enumerate(element.value):
                    rows += walk(item, f"{where}[{index}].")
                continue
            value = element.value
            if element.tag == 0x00020000:  # FileMetaInformationGroupLength: follows the lengths of the new UIDs
                value = "<group length>"
            elif element.VR == "UI" and not str(value).startswith("1.2.840.10008."):  # not a DICOM-defined UID
                value = uids.setdefault(str(value), f"uid{len(uids)}")
            elif element.VR in ("DA", "TM", "DT"):
                value = "<date/time>"
            rows.append((where, element.VR, value))
        return rows

    ds = pydicom.dcmread(io.BytesIO(data))
    return walk(ds.file_meta, "meta.") + walk(ds, "")


def test_streamed_read_gives_the_findings_sr_and_seg_of_read(client, study):
    single = client.read(study, outputs=OUTPUTS)
    streamed = client.read_streamed(study, outputs=OUTPUTS)
    assert single.findings, "the phantom has two planted lesions"
    assert single.dicom_sr and single.dicom_seg
    for field in ("model", "model_version", "device", "findings", "warnings"):
        assert getattr(streamed, field) == getattr(single, field), field
    for name in ("dicom_sr", "dicom_seg"):
        # Two reads of one study make the same objects: only their creation times may differ. Their UIDs are derived
        # from the study and the model (inference.outputs.uids), so they are the same too: a redelivery.
        assert canonical(getattr(single, name)) == canonical(getattr(streamed, name)), name
        first, second = (pydicom.dcmread(io.BytesIO(getattr(r, name))) for r in (single, streamed))
        assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (second.SOPInstanceUID, second.SeriesInstanceUID)


def test_a_seg_in_many_chunks_reassembles_into_a_valid_segmentation(client, server, study):
    header = pb.ReadHeader(request_id="streamed-seg-1", outputs=OUTPUTS)
    parts = list(client.stub.ReadStreamed(iter_requests(header, study), timeout=300))
    assert parts[0].WhichOneof("kind") == "summary" and not parts[0].summary.dicom_seg
    assert parts[0].summary.request_id == "streamed-seg-1"
    sizes = {}
    for kind in (pb.DICOM_SR, pb.DICOM_SEG):
        chunks = [p.chunk for p in parts if p.HasField("chunk") and p.chunk.output == kind]
        (end,) = [p.output_end for p in parts if p.HasField("output_end") and p.output_end.output == kind]
        sizes[kind] = end.total_bytes
        assert len(chunks) == end.chunks == math.ceil(end.total_bytes / CHUNK_BYTES)
        assert all(0 < len(c.data) <= CHUNK_BYTES and c.total_bytes == end.total_bytes for c in chunks)
        assert [c.offset for c in chunks] == [i * CHUNK_BYTES for i in range(len(chunks))]
        assert re.fullmatch(r"[0-9a-f]{64}", end.sha256)
    assert sizes[pb.DICOM_SEG] > 4 * CHUNK_BYTES
    kinds = [p.WhichOneof("kind") for p in parts]
    sr_end, seg_end = (i for i, k in enumerate(kinds) if k == "output_end")
    assert all(p.chunk.output == pb.DICOM_SR for p in parts[1:sr_end])  # SR first, then SEG, not interleaved
    assert seg_end == len(parts) - 1

    response = assemble(parts)
    seg = hd.seg.segread(io.BytesIO(response.dicom_seg))
    sources = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in study}
    referenced = {ref.ReferencedSOPInstanceUID for ref in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced <= sources
    assert seg.get_segment_description(1).segment_label == "lesion 1"  # one segment per finding
    assert seg.get_volume().array.any()
    sr = hd.sr.srread(io.BytesIO(response.dicom_sr))
    tracking_uids = {group.tracking_uid for group in sr.content.get_planar_roi_measurement_groups()}
    assert len(tracking_uids) == len(response.findings) == len(seg.SegmentSequence)

    log = Path(server.log_path).read_text()
    assert re.search(r"read streamed-seg-1 tenant=- model=brain_lesion_mr:\S+ study=\w+ status=OK", log)


def test_cli_sr_and_seg_files_are_what_the_rpc_returned(server, study, tmp_path, capsys, monkeypatch):
    received: list[pb.ReadResponsePart] = []

    def recording_assemble(parts):
        parts = list(parts)
        received.extend(parts)
        return assemble(parts)

    monkeypatch.setattr(client_module, "assemble", recording_assemble)
    sr_path, seg_path = tmp_path / "sr.dcm", tmp_path / "seg.dcm"
    args = ["read", str(study[0].parent), "--server", server.target, "--format", "json"]
    code = radserve_main([*args, "--sr", str(sr_path), "--seg", str(seg_path)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"wrote DICOM SR to {sr_path}" in err and f"wrote DICOM SEG to {seg_path}" in err
    for kind, path in ((pb.DICOM_SR, sr_path), (pb.DICOM_SEG, seg_path)):
        chunks = [p.chunk.data for p in received if p.HasField("chunk") and p.chunk.output == kind]
        assert len(chunks) > 1
        assert path.read_bytes() == b"".join(chunks)
    pydicom.dcmread(seg_path)
