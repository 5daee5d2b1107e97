"""Benchmark studies: synthetic phantoms of stated sizes, written once as the archive would send them.

A :class:`StudySpec` names a modality, a size and a seed. :func:`materialize` renders it with
:mod:`inference.phantoms`, writes it as DICOM (a CT or MR series, or one DX image with 16-bit pixels) and, for the
naive baseline, as NIfTI, into a cache folder, then decodes the DICOM once with radserve's own reader, so
that the service (which decodes the same files), ``direct`` and ``naive`` all see the same voxels.

Sizes are part of every figure (DESIGN.md): ``StudySpec.size_label`` (``512x512x300`` for CT, ``2048x2048`` for
X-ray) goes into each result row.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.api.upload import read_payload
from inference.client import CHUNK_BYTES
from inference.io.dicom import read_dicom_series
from inference.io.limits import InputLimits
from inference.io.volume import Volume

MODEL_BY_MODALITY = {"CT": "lung_nodule_ct", "MR": "brain_lesion_mr", "DX": "chest_xray", "CR": "chest_xray"}
_RAW_DTYPE = {"CT": np.int16, "MR": np.int16, "DX": np.uint16, "CR": np.uint16}
VOLUMES = ("CT", "MR")  # modalities read as a series of slices (the others: one projection image)


@dataclass(frozen=True)
class StudySpec:
    """One synthetic study. ``shape`` is (columns, rows, slices) for CT and (columns, rows) for X-ray."""

    modality: str  # CT | MR | DX
    shape: tuple[int, ...]
    spacing_mm: tuple[float, ...]  # CT, MR: (pixel, slice); DX: (pixel,)
    seed: int = 0
    # dicom: the DICOM files, streamed (the archive's path); raw: a RAW array with its affine (int16 for CT, uint16
    # for X-ray), streamed; shm: that array in a POSIX shared-memory segment named in the header (zero-copy ingest).
    payload: str = "dicom"

    @property
    def model(self) -> str:
        return MODEL_BY_MODALITY[self.modality]

    @property
    def size_label(self) -> str:
        return "x".join(str(s) for s in self.shape)

    @property
    def name(self) -> str:
        return f"{self.modality.lower()}-{self.size_label}-s{self.seed}-{self.payload}"

    @property
    def n_images(self) -> int:
        """Images per study: 1 for projection X-ray, the slice count for CT and MR."""
        return int(self.shape[2]) if self.modality in VOLUMES else 1

    @property
    def raw_voxel_bytes(self) -> int:
        """The study's voxels as 16-bit integers (how CT, MR and DX store them): the memory target's unit."""
        return 2 * math.prod(self.shape)

    def key(self) -> str:
        """The cache folder of the rendered study (shared by its payload kinds)."""
        fields = asdict(self)
        fields.pop("payload")
        text = json.dumps(fields, sort_keys=True) + CACHE_VERSION
        return f"{self.modality.lower()}-{self.size_label}-s{self.seed}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


CACHE_VERSION = "1"


@dataclass
class Study:
    """A materialized study: what the client sends, and what the in-process baselines read."""

    spec: StudySpec
    files: list[Path]  # DICOM files (the service's payload), or the one .raw file
    nifti: Path  # the same voxels and geometry as NIfTI (the naive baseline's input)
    volume: Volume  # radserve's decode of ``files`` (the direct baseline's input)
    payload_bytes: int = 0
    requests: list[pb.ReadRequest] = field(default_factory=list, repr=False)  # header + chunks, built once
    shm: shared_memory.SharedMemory | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    def payload_files(self) -> list[bytes]:
        """The streamed payload as the server holds it once received: one bytes object per file."""
        files: dict[int, list[bytes]] = {}
        for request in self.requests:
            if request.WhichOneof("kind") == "chunk":
                files.setdefault(request.chunk.file_index, []).append(request.chunk.data)
        return [b"".join(files[index]) for index in sorted(files)]

    def decode(self, files: list[bytes]) -> Volume:
        """The server's decode of ``files`` (:func:`inference.api.upload.read_payload`): the same readers and limits."""
        header = self.requests[0].header
        return read_payload(header, header.payload, files, InputLimits())

    def close(self) -> None:
        """Unlink the shared-memory segment of a ``shm`` study (the gateway's job once its reads are done)."""
        if self.shm is not None:
            self.shm.close()
            self.shm.unlink()
            self.shm = None


def _ct_phantom(spec: StudySpec):
    from inference.phantoms import make_chest_ct

    pixel, slice_ = spec.spacing_mm
    n_nodules = 2 if min(spec.shape[0] * pixel, spec.shape[2] * slice_) >= 100 else 1
    return make_chest_ct(
        np.random.default_rng(spec.seed),
        shape=tuple(spec.shape),
        pixel_spacing_mm=pixel,
        slice_spacing_mm=slice_,
        n_nodules=n_nodules,
    )


def _mr_phantom(spec: StudySpec):
    from inference.phantoms import make_brain_mr

    pixel, slice_ = spec.spacing_mm
    return make_brain_mr(
        np.random.default_rng(spec.seed),
        shape=tuple(spec.shape),
        pixel_spacing_mm=pixel,
        slice_spacing_mm=slice_,
        n_lesions=2 if min(spec.shape[0] * pixel, spec.shape[2] * slice_) >= 100 else 1,
    )


def _xray_phantom(spec: StudySpec):
    from inference.phantoms.chest_xray import make_chest_xray

    columns, rows = spec.shape
    return make_chest_xray(
        np.random.default_rng(spec.seed),
        size_px=(rows, columns),
        pixel_spacing_mm=spec.spacing_mm[0],
        modality=spec.modality,
        bits_stored=16,
        photometric="MONOCHROME2",
    )


def materialize(spec: StudySpec, cache: Path, *, chunk_bytes: int = CHUNK_BYTES) -> Study:
    """Render, write (once per cache folder) and decode ``spec``; build its Read messages."""
    from inference.phantoms import write_dicom_series, write_nifti
    from inference.phantoms.writers import write_xray_dicom

    folder = Path(cache) / spec.key()
    done = folder / "done"
    if not done.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        if spec.modality in VOLUMES:
            phantom = _ct_phantom(spec) if spec.modality == "CT" else _mr_phantom(spec)
            files = write_dicom_series(phantom, folder / "dicom")
        else:
            phantom = _xray_phantom(spec)
            files = [write_xray_dicom(phantom, folder / "dicom" / "image.dcm")]
        volume = read_dicom_series(files)
        write_nifti(volume, folder / "study.nii")
        done.write_text(json.dumps(asdict(spec)))
    files = sorted((folder / "dicom").iterdir())
    volume = read_dicom_series(files)
    study = Study(spec, files, folder / "study.nii", volume)
    if spec.payload in ("raw", "shm"):
        voxels = np.rint(volume.voxels).astype(_RAW_DTYPE[spec.modality])
        raw = pb.RawArray(dtype=voxels.dtype.name, shape=voxels.shape, affine=volume.affine.ravel().tolist())
        header = pb.ReadHeader(model=spec.model, payload=pb.RAW, modality=spec.modality, raw=raw)
        if spec.payload == "shm":
            study.shm = shared_memory.SharedMemory(create=True, size=voxels.nbytes)
            np.ndarray(voxels.shape, voxels.dtype, buffer=study.shm.buf)[...] = voxels
            header.shared_memory.CopyFrom(pb.SharedMemoryRef(name=study.shm.name, size_bytes=voxels.nbytes))
            study.requests = [pb.ReadRequest(header=header)]
            study.payload_bytes = voxels.nbytes
            return study
        study.requests = list(_requests(header, [voxels.tobytes()], chunk_bytes))
    else:
        study.requests = list(_requests(pb.ReadHeader(model=spec.model, payload=pb.DICOM_FILES), files, chunk_bytes))
    study.payload_bytes = sum(len(r.chunk.data) for r in study.requests if r.WhichOneof("kind") == "chunk")
    return study


def _requests(header: pb.ReadHeader, payloads: list, chunk_bytes: int):
    """The Read stream: the header, then each payload (bytes, or a file read here) in chunks."""
    yield pb.ReadRequest(header=header)
    for index, payload in enumerate(payloads):
        data = payload.read_bytes() if isinstance(payload, Path) else payload
        view = memoryview(data)
        for offset in range(0, len(data), chunk_bytes):
            yield pb.ReadRequest(chunk=pb.Chunk(file_index=index, data=bytes(view[offset : offset + chunk_bytes])))


# -- profiles ---------------------------------------------------------------------------------------------------


def ct(shape: tuple[int, int, int], pixel_mm: float, slice_mm: float, seeds: int, payload: str = "dicom"):
    return [StudySpec("CT", shape, (pixel_mm, slice_mm), seed, payload) for seed in range(seeds)]


def mr(shape: tuple[int, int, int], pixel_mm: float, slice_mm: float, seeds: int, payload: str = "dicom"):
    return [StudySpec("MR", shape, (pixel_mm, slice_mm), seed, payload) for seed in range(seeds)]


def dx(size: int, pixel_mm: float, seeds: int, payload: str = "dicom"):
    return [StudySpec("DX", (size, size), (pixel_mm,), seed, payload) for seed in range(seeds)]


@dataclass(frozen=True)
class Workload:
    """A homogeneous set of studies measured together (one row per concurrency)."""

    name: str
    specs: list[StudySpec]
    concurrency: tuple[int, ...] = (1, 8)
    reads: int = 8  # measured reads per concurrency
    max_s: float | None = None  # and at most this long per concurrency (then the reads done so far count)
    warmup_reads: int | None = None  # before each concurrency's measured reads; None: one per worker
    baseline_studies: int = 4  # studies the direct baseline reads (cycled)
    naive_studies: int = 2  # and the naive one
    direct_from: str | None = None  # compare with this workload's direct baseline (same studies, other payload)

    @property
    def modality(self) -> str:
        return self.specs[0].modality

    @property
    def model(self) -> str:
        return self.specs[0].model

    @property
    def size_label(self) -> str:
        return self.specs[0].size_label


PROFILES: dict[str, list[Workload]] = {
    # Smoke (tests/benchmarks/test_bench_smoke.py, and gpu_run.sh --dry-run): every path once, as few forward
    # passes as possible.
    "tiny": [
        Workload(
            "ct",
            ct((64, 64, 32), 2.0, 3.0, 2),
            concurrency=(1, 2),
            reads=2,
            warmup_reads=0,
            baseline_studies=1,
            naive_studies=1,
        ),
        Workload("dx-256", dx(256, 1.6, 4), concurrency=(1, 8), reads=8, baseline_studies=4, naive_studies=1),
        # The naive baseline is a detector's (MONAI's RetinaNetDetector); segmentation has none.
        Workload(
            "mr",
            mr((64, 64, 24), 3.0, 4.0, 1),
            concurrency=(1, 2),
            reads=2,
            warmup_reads=0,
            baseline_studies=1,
            naive_studies=0,
        ),
    ],
    # `make bench` on a 2-core CPU, within 5 minutes: a CT of 8 patches of 96^3 after resampling (a study's own
    # patches fill the batches of 4) and X-ray at 512x512 and 2048x2048 (16-bit DX), all as DICOM.
    "quick": [
        Workload(
            "ct-8patch", ct((256, 256, 72), 0.7, 2.5, 2), reads=4, warmup_reads=1, baseline_studies=2, naive_studies=1
        ),
        Workload("dx-512", dx(512, 0.8, 8), reads=32, baseline_studies=16, naive_studies=2),
        Workload("dx-2048", dx(2048, 0.2, 4), concurrency=(8,), reads=16, baseline_studies=8, naive_studies=1),
    ],
    # benchmarks/gpu_run.sh on one H100/H200, within run.py's --budget-s (benchmarks/README.md, "The GPU run's
    # budget"): CT 512x512x300 (0.7 mm pixels, 1 mm slices: 36 patches) as DICOM and through shared memory; brain MR
    # 256x256x160 as DICOM; X-ray 512x512 and 2048x2048 16-bit DX as DICOM, and 512x512 through shared memory. Most
    # important first: a run cut short by its budget loses the last. Each row stops at `reads` or `max_s`; a CT
    # read is bound by its DICOM decode (about 2.7 s a read on one core), so its rows are short in reads.
    "gpu": [
        Workload(
            "ct-512x512x300",
            ct((512, 512, 300), 0.7, 1.0, 1),
            reads=8,
            max_s=20.0,
            warmup_reads=1,
            baseline_studies=2,
            naive_studies=1,
        ),
        Workload(
            "dx-512",
            dx(512, 0.8, 8),
            concurrency=(1, 8, 64),
            reads=600,
            max_s=8.0,
            baseline_studies=256,
            naive_studies=4,
        ),
        Workload(
            "mr-256x256x160",
            mr((256, 256, 160), 0.9, 1.2, 1),
            reads=8,
            max_s=15.0,
            warmup_reads=1,
            baseline_studies=2,
            naive_studies=0,
        ),
        Workload(
            "dx-2048",
            dx(2048, 0.2, 4),
            concurrency=(1, 8, 32),
            reads=200,
            max_s=8.0,
            baseline_studies=32,
            naive_studies=2,
        ),
        Workload(
            "ct-512x512x300-shm",
            ct((512, 512, 300), 0.7, 1.0, 1, payload="shm"),
            concurrency=(8,),
            reads=16,
            max_s=10.0,
            baseline_studies=0,
            naive_studies=0,
            direct_from="ct-512x512x300",
        ),
        Workload(
            "dx-512-shm",
            dx(512, 0.8, 8, payload="shm"),
            concurrency=(64,),
            reads=1000,
            max_s=6.0,
            baseline_studies=0,
            naive_studies=0,
            direct_from="dx-512",
        ),
    ],
}
