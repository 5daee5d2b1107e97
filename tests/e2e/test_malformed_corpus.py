"""End to end: a corpus of malformed studies, each built here, each sent through the real server.

Every case asserts its gRPC status code exactly and that the message names what is at fault (the element, the
file index or the limit) without a traceback, a UID or a patient name. Files go through the `radserve read`
command (run in-process: the same code as the console script, without a Python start-up per case); RAW arrays
and broken streams go through the gRPC client. After the whole corpus, a valid phantom is read on the same
server and its planted nodules are found: no bad input took the server down.

The server reads from a temporary model repository holding only lung_nodule_ct (so that "no model reads this
modality" stays true when other models are added to models/), with small upload limits set by environment.
"""

from __future__ import annotations

import gzip
import json
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000Lossless, generate_uid

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.cli import main as radserve_main
from inference.client import ReadingClient
from inference.io import hash_uid
from inference.io.volume import Volume
from inference.phantoms import make_chest_ct, write_dicom_series
from inference.serverproc import ServerProcess

MODEL = "lung_nodule_ct"
MiB = 1024 * 1024
MAX_FILES = 80
MAX_CHUNK_BYTES = 1 * MiB
MAX_REQUEST_BYTES = 8 * MiB
LIMITS_ENV = {
    "RADSERVE_LIMITS_MAX_FILES": str(MAX_FILES),
    "RADSERVE_LIMITS_MAX_CHUNK_BYTES": str(MAX_CHUNK_BYTES),
    "RADSERVE_LIMITS_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
    "RADSERVE_WARMUP": "0",  # about 10 s of start-up on the shared CPU; the first read warms the model instead
}
PATIENT_NAME = "CORPUS^PATIENT^X9"
PATIENT_ID = "CORPUSPID9"
UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's generate_uid root: every study/series/SOP UID built here
SERIES_1 = UID_PREFIX + "4242.1"
SERIES_2 = UID_PREFIX + "4242.2"
STUDY = UID_PREFIX + "4242.0"
# Base study: 6 slices of 64 x 64 (JPEG 2000 needs at least this for its default 6 resolutions), 2 mm apart.
BASE_SHAPE = (64, 64, 6)
PIXEL_MM, SLICE_MM = 0.7, 2.0
MATCH_MM = 3.0


# --- the server ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_repo) -> Iterator[ServerProcess]:
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with ServerProcess(
        models=model_repo(MODEL), log_path=log_path, extra_args=["--log-level", "DEBUG"], env=LIMITS_ENV
    ) as proc:
        yield proc


def cli_read(capsys: pytest.CaptureFixture[str], server: ServerProcess, path: Path, *args: str) -> tuple[int, str, str]:
    """`radserve read PATH --server ... ARGS`: exit code, stdout, stderr."""
    capsys.readouterr()
    code = radserve_main(["read", str(path), "--server", server.target, "--timeout-s", "120", *args])
    out, err = capsys.readouterr()
    return code, out, err


def rpc_error(server: ServerProcess, messages: list[pb.ReadRequest]) -> tuple[str, str]:
    """Send a hand-made Read stream; the status code name and message of the error it must end in."""
    client = ReadingClient(server.target)
    try:
        client.stub.Read(iter(messages), timeout=60)
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""
    finally:
        client.close()
    raise AssertionError("the read succeeded; it should have failed")


# --- building the corpus ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A small valid CT series (file k is slice k) that the DICOM cases damage."""
    rng = np.random.default_rng(7)
    voxels = rng.normal(-300.0, 200.0, BASE_SHAPE).astype(np.float32)
    volume = Volume(voxels=voxels, affine=np.diag([PIXEL_MM, PIXEL_MM, SLICE_MM, 1.0]), modality="CT")
    return write_dicom_series(
        volume,
        tmp_path_factory.mktemp("base"),
        patient_name=PATIENT_NAME,
        patient_id=PATIENT_ID,
        study_instance_uid=STUDY,
        series_instance_uid=SERIES_1,
    )


def copy_series(
    base: list[Path],
    out: Path,
    edit: dict[int, Callable[[Dataset], None]] | None = None,
    *,
    drop: tuple[int, ...] = (),
) -> Path:
    """Write the base series into ``out`` with ``edit[k]`` applied to slice k; ``out`` for the CLI."""
    out.mkdir(parents=True, exist_ok=True)
    for k, path in enumerate(base):
        if k in drop:
            continue
        ds = pydicom.dcmread(path)
        if edit and k in edit:
            edit[k](ds)
        ds.save_as(out / path.name)
    return out


def write_bytes(out: Path, name: str, data: bytes) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_bytes(data)
    return out / name


def set_pixel_spacing(value: list[str]) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        ds.PixelSpacing = value

    return edit


def shift_position(dx: float = 0.0, dz: float = 0.0) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x + dx:.4f}", f"{y:.4f}", f"{z + dz:.4f}"]

    return edit


def j2k_codestream(path: Path) -> tuple[Dataset, bytes]:
    """The slice compressed as JPEG 2000 lossless, and its codestream."""
    ds = pydicom.dcmread(path)
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    return ds, next(generate_frames(ds.PixelData, number_of_frames=1))


def with_codestream(ds: Dataset, codestream: bytes, out: Path, name: str) -> None:
    ds.PixelData = encapsulate([codestream])
    ds.save_as(out / name, enforce_file_format=True)


# Each builder writes one case under ``out`` and returns the path to give `radserve read`.


def build_not_dicom(base: list[Path], out: Path) -> Path:
    return write_bytes(out, "report.dcm", b"%PDF-1.4 this is not a DICOM file\n" * 40)


def build_empty_file(base: list[Path], out: Path) -> Path:
    return write_bytes(out, "empty.dcm", b"")


def build_truncated_in_header(base: list[Path], out: Path) -> Path:
    copy_series(base, out)
    target = out / base[1].name
    target.write_bytes(target.read_bytes()[:700])
    return out


def build_truncated_in_pixel_data(base: list[Path], out: Path) -> Path:
    copy_series(base, out)
    target = out / base[3].name
    target.write_bytes(target.read_bytes()[:-1000])
    return out


def build_element_length_past_eof(base: list[Path], out: Path) -> Path:
    """WindowWidth (0028,1051) DS declares 65520 bytes; about 8 kB of file follow."""
    copy_series(base, out)
    target = out / base[2].name
    data = bytearray(target.read_bytes())
    at = data.find(b"\x28\x00\x51\x10DS")
    assert at > 0
    data[at + 6 : at + 8] = struct.pack("<H", 0xFFF0)
    target.write_bytes(bytes(data))
    return out


def build_missing_pixel_data(base: list[Path], out: Path) -> Path:
    def edit(ds: Dataset) -> None:
        del ds.PixelData

    return copy_series(base, out, {4: edit})


def build_pixel_length_mismatch(base: list[Path], out: Path) -> Path:
    def edit(ds: Dataset) -> None:
        ds.PixelData = ds.PixelData[: -BASE_SHAPE[0] * 2]  # one row short

    return copy_series(base, out, {0: edit})


def build_bits_stored_over_allocated(base: list[Path], out: Path) -> Path:
    def edit(ds: Dataset) -> None:
        ds.BitsStored, ds.HighBit = 20, 19

    return copy_series(base, out, {5: edit})


def build_bits_allocated_invalid(base: list[Path], out: Path) -> Path:
    def edit(ds: Dataset) -> None:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 12, 12, 11

    return copy_series(base, out, {1: edit})


def build_pixel_spacing_missing(base: list[Path], out: Path) -> Path:
    def edit(ds: Dataset) -> None:
        del ds.PixelSpacing

    return copy_series(base, out, {2: edit})


def build_pixel_spacing_zero(base: list[Path], out: Path) -> Path:
    return copy_series(base, out, {2: set_pixel_spacing(["0", "0.7"])})


def build_pixel_spacing_negative(base: list[Path], out: Path) -> Path:
    return copy_series(base, out, {3: set_pixel_spacing(["0.7", "-0.7"])})


def build_pixel_spacing_nan(base: list[Path], out: Path) -> Path:
    return copy_series(base, out, {4: set_pixel_spacing(["NaN", "0.7"])})


def build_duplicate_slice(base: list[Path], out: Path) -> Path:
    copy_series(base, out)
    ds = pydicom.dcmread(base[2])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out / "slice_9999.dcm")  # sorts last: file 6
    return out


def build_missing_slice(base: list[Path], out: Path) -> Path:
    return copy_series(base, out, drop=(3,))


def build_varying_spacing(base: list[Path], out: Path) -> Path:
    return copy_series(base, out, {4: shift_position(dz=0.5), 5: shift_position(dz=1.0)})


def build_tilted_stack(base: list[Path], out: Path) -> Path:
    tilt = math.tan(math.radians(10.0)) * SLICE_MM
    return copy_series(base, out, {k: shift_position(dx=k * tilt) for k in range(len(base))})


def build_mixed_series(base: list[Path], out: Path) -> Path:
    copy_series(base, out)
    for k, path in enumerate(base):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SeriesNumber = SERIES_2, 2
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(out / f"series2_{k}.dcm")
    return out


def build_only_non_image_objects(base: list[Path], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    classes = [("1.2.840.10008.5.1.4.1.1.88.11", "SR"), ("1.2.840.10008.5.1.4.1.1.88.22", "SR")]
    classes.append(("1.2.840.10008.5.1.4.1.1.88.59", "KO"))
    for k, (sop_class, modality) in enumerate(classes):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, generate_uid()
        ds.Modality, ds.PatientName, ds.PatientID = modality, PATIENT_NAME, PATIENT_ID
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class, ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.save_as(out / f"object_{k}.dcm", enforce_file_format=True)
    return out


def build_corrupt_jpeg2000(base: list[Path], out: Path) -> Path:
    """Bytes in the middle of the codestream overwritten (0xFF fill, as an erased block leaves them)."""
    copy_series(base, out)
    ds, codestream = j2k_codestream(base[2])
    middle = len(codestream) // 2
    with_codestream(ds, codestream[:middle] + b"\xff" * 24 + codestream[middle + 24 :], out, base[2].name)
    return out


def build_jpeg2000_bytes_lost(base: list[Path], out: Path) -> Path:
    """64 bytes missing from the middle of the codestream (the tile-part length no longer fits)."""
    copy_series(base, out)
    ds, codestream = j2k_codestream(base[2])
    middle = len(codestream) // 2
    with_codestream(ds, codestream[:middle] + codestream[middle + 64 :], out, base[2].name)
    return out


def build_transfer_syntax_without_codec(base: list[Path], out: Path) -> Path:
    def edit(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG4HP41
        ds.PixelData = encapsulate([b"\x00\x00\x00\x01\x67" + bytes(59)])
        ds["PixelData"].VR = "OB"

    return copy_series(base, out, {0: edit})


def build_modality_no_model_reads(base: list[Path], out: Path) -> Path:
    def edit(ds: Dataset) -> None:
        ds.Modality = "PT"

    return copy_series(base, out, dict.fromkeys(range(len(base)), edit))


def build_valid(base: list[Path], out: Path) -> Path:
    return copy_series(base, out)


def build_too_many_files(base: list[Path], out: Path) -> Path:
    for k in range(MAX_FILES + 1):
        write_bytes(out, f"f{k:03d}.dcm", b"x")
    return out


def nifti_bytes(shape: tuple[int, int, int] = (16, 16, 8)) -> bytes:
    data = np.random.default_rng(3).integers(-1000, 1000, shape).astype(np.int16)
    image = nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.0, 1.0]))
    image.set_sform(image.affine, code=1)
    return image.to_bytes()


def patched_dims(raw: bytes, dims: list[int]) -> bytes:
    """NIfTI-1 bytes with dim[0..len(dims)-1] overwritten (int16 at byte 40)."""
    data = bytearray(raw)
    for i, value in enumerate(dims):
        struct.pack_into("<h", data, 40 + 2 * i, value)
    return bytes(data)


def build_nifti_bad_dim0(base: list[Path], out: Path) -> Path:
    return write_bytes(out, "study.nii", patched_dims(nifti_bytes(), [9]))


def build_nifti_dim_zero(base: list[Path], out: Path) -> Path:
    return write_bytes(out, "study.nii", patched_dims(nifti_bytes(), [3, 16, 0, 8]))


def build_nifti_dim_negative(base: list[Path], out: Path) -> Path:
    return write_bytes(out, "study.nii", patched_dims(nifti_bytes(), [3, 16, 16, -4]))


def build_nifti_truncated(base: list[Path], out: Path) -> Path:
    raw = nifti_bytes()
    return write_bytes(out, "study.nii", raw[: len(raw) // 2])


def build_nifti_2pow31_voxels(base: list[Path], out: Path) -> Path:
    """A header claiming 2048 x 1024 x 1024 = 2**31 voxels, followed by a few bytes."""
    return write_bytes(out, "study.nii", patched_dims(nifti_bytes((4, 4, 4)), [3, 2048, 1024, 1024]))


def build_nifti_gzip_corrupt(base: list[Path], out: Path) -> Path:
    packed = bytearray(gzip.compress(nifti_bytes((32, 32, 16))))
    packed[len(packed) // 2] ^= 0x10  # one bit flipped in the deflate stream
    return write_bytes(out, "study.nii.gz", bytes(packed))


def build_nifti_valid(base: list[Path], out: Path) -> Path:
    return write_bytes(out, "study.nii", nifti_bytes())


@dataclass(frozen=True)
class FileCase:
    name: str
    build: Callable[[list[Path], Path], Path]
    code: str
    names: tuple[str, ...]  # substrings the message must hold: the element, file index or limit at fault
    args: tuple[str, ...] = ()


FILE_CASES = [
    FileCase("not_dicom", build_not_dicom, "INVALID_ARGUMENT", ("file 0 is not a DICOM file", "DICM")),
    FileCase("empty_file", build_empty_file, "INVALID_ARGUMENT", ("no payload",)),
    FileCase("truncated_in_header", build_truncated_in_header, "INVALID_ARGUMENT", ("file 1 is truncated",)),
    FileCase(
        "truncated_in_pixel_data",
        build_truncated_in_pixel_data,
        "INVALID_ARGUMENT",
        ("file 3 is truncated", "PixelData declares 8192 bytes"),
    ),
    FileCase(
        "element_length_past_end_of_file",
        build_element_length_past_eof,
        "INVALID_ARGUMENT",
        ("file 2 is truncated", "element (0028,1051)", "of 65520 bytes"),
    ),
    FileCase("missing_pixel_data", build_missing_pixel_data, "INVALID_ARGUMENT", ("file 4: PixelData missing",)),
    FileCase(
        "pixel_data_length_mismatch",
        build_pixel_length_mismatch,
        "INVALID_ARGUMENT",
        ("file 0: PixelData length mismatch", "8064 bytes, expected 8192"),
    ),
    FileCase(
        "bits_stored_over_bits_allocated",
        build_bits_stored_over_allocated,
        "INVALID_ARGUMENT",
        ("file 5: BitsStored (20) exceeds BitsAllocated (16)",),
    ),
    FileCase(
        "bits_allocated_not_a_multiple_of_8",
        build_bits_allocated_invalid,
        "INVALID_ARGUMENT",
        ("file 1: BitsAllocated 12 is not valid",),
    ),
    FileCase(
        "pixel_spacing_missing", build_pixel_spacing_missing, "INVALID_ARGUMENT", ("file 2: PixelSpacing missing",)
    ),
    FileCase(
        "pixel_spacing_zero",
        build_pixel_spacing_zero,
        "INVALID_ARGUMENT",
        ("file 2: PixelSpacing [0, 0.7]", "plausible range 0.001-100 mm"),
    ),
    FileCase(
        "pixel_spacing_negative",
        build_pixel_spacing_negative,
        "INVALID_ARGUMENT",
        ("file 3: PixelSpacing [0.7, -0.7]", "plausible range 0.001-100 mm"),
    ),
    FileCase(
        "pixel_spacing_nan",
        build_pixel_spacing_nan,
        "INVALID_ARGUMENT",
        ("file 4: PixelSpacing [nan, 0.7]", "plausible range 0.001-100 mm"),
    ),
    FileCase(
        "duplicate_slice",
        build_duplicate_slice,
        "INVALID_ARGUMENT",
        ("duplicate slice positions in series 1", "file 2 and file 6"),
    ),
    FileCase(
        "missing_slice",
        build_missing_slice,
        "INVALID_ARGUMENT",
        ("1 slice missing in series 1", "file 2 and file 3", "4 mm, 2 times the usual 2 mm step"),
    ),
    FileCase(
        "varying_slice_spacing",
        build_varying_spacing,
        "INVALID_ARGUMENT",
        ("slice spacing varies (2 mm vs 2.5 mm) in series 1", "file 3 and file 4"),
    ),
    FileCase("tilted_stack", build_tilted_stack, "UNIMPLEMENTED", ("series 1 is a tilted or sheared stack", "10.00")),
    FileCase(
        "mixed_series_without_selection",
        build_mixed_series,
        "INVALID_ARGUMENT",
        (
            "2 image series and none was chosen (set series_instance_uid to one's UID or to the hash shown here",
            f"series 1 ({hash_uid(SERIES_1)}, 6 images)",
            f"series 2 ({hash_uid(SERIES_2)}, 6 images)",
        ),
    ),
    FileCase(
        "only_non_image_objects",
        build_only_non_image_objects,
        "INVALID_ARGUMENT",
        ("no images, only 3 non-image objects", "structured report"),
    ),
    FileCase(
        "corrupt_jpeg2000_codestream",
        build_corrupt_jpeg2000,
        "INVALID_ARGUMENT",
        ("file 2: pixel data could not be decoded", "JPEG 2000", "tile-part 0"),
    ),
    FileCase(
        "jpeg2000_bytes_lost",
        build_jpeg2000_bytes_lost,
        "INVALID_ARGUMENT",
        ("file 2: pixel data could not be decoded", "JPEG 2000", "Psot"),
    ),
    FileCase(
        "transfer_syntax_without_codec",
        build_transfer_syntax_without_codec,
        "UNIMPLEMENTED",
        ("file 0: transfer syntax MPEG-4 AVC/H.264 High Profile / Level 4.1", "1.2.840.10008.1.2.4.102"),
    ),
    FileCase(
        "modality_no_model_reads", build_modality_no_model_reads, "FAILED_PRECONDITION", ("no loaded model reads PT",)
    ),
    FileCase(
        "unknown_model",
        build_valid,
        "NOT_FOUND",
        ("model 'no_such_model' is not loaded",),
        ("--model", "no_such_model"),
    ),
    FileCase(
        "unknown_version",
        build_valid,
        "NOT_FOUND",
        (f"model '{MODEL}' has no version '999'",),
        ("--model", f"{MODEL}:999"),
    ),
    FileCase("too_many_files", build_too_many_files, "RESOURCE_EXHAUSTED", (f"limit of {MAX_FILES} files per study",)),
    FileCase("nifti_bad_dim0", build_nifti_bad_dim0, "INVALID_ARGUMENT", ("NIfTI dim[0] is 9; it must be 1..7",)),
    FileCase("nifti_dim_zero", build_nifti_dim_zero, "INVALID_ARGUMENT", ("NIfTI dim[2] is 0",)),
    FileCase("nifti_dim_negative", build_nifti_dim_negative, "INVALID_ARGUMENT", ("NIfTI dim[3] is -4",)),
    FileCase(
        "nifti_truncated",
        build_nifti_truncated,
        "INVALID_ARGUMENT",
        ("NIfTI data is truncated", "2048 voxels of int16"),
    ),
    FileCase(
        "nifti_2pow31_voxels",
        build_nifti_2pow31_voxels,
        "RESOURCE_EXHAUSTED",
        ("NIfTI image has 2147483648 voxels", "the limit is"),
    ),
    FileCase("nifti_gzip_corrupt", build_nifti_gzip_corrupt, "INVALID_ARGUMENT", ("NIfTI gzip stream is corrupt",)),
    FileCase(
        "nifti_modality_no_model_reads",
        build_nifti_valid,
        "FAILED_PRECONDITION",
        ("no loaded model reads MR",),
        ("--modality", "MR"),
    ),
    FileCase(
        "nifti_model_does_not_read_modality",
        build_nifti_valid,
        "FAILED_PRECONDITION",
        (f"model '{MODEL}' reads CT studies, not MR",),
        ("--modality", "MR", "--model", MODEL),
    ),
    FileCase(
        "nifti_unknown_modality",
        build_nifti_valid,
        "INVALID_ARGUMENT",
        ("header.modality must be one of",),
        ("--modality", "XA9"),
    ),
]


def header(**fields: object) -> pb.ReadRequest:
    return pb.ReadRequest(header=pb.ReadHeader(**fields))


def chunk(index: int, data: bytes) -> pb.ReadRequest:
    return pb.ReadRequest(chunk=pb.Chunk(file_index=index, data=data))


def raw_header(dtype: str = "int16", shape: tuple[int, ...] = (4, 4, 4), **geometry: object) -> pb.ReadRequest:
    if not geometry:
        geometry = {"spacing_mm": [1.0, 1.0, 1.0]}
    return header(payload=pb.RAW, modality="CT", raw=pb.RawArray(dtype=dtype, shape=shape, **geometry))


@dataclass(frozen=True)
class StreamCase:
    name: str
    messages: Callable[[], list[pb.ReadRequest]]
    code: str
    names: tuple[str, ...] = field(default=())


STREAM_CASES = [
    StreamCase(
        "raw_wrong_byte_count",
        lambda: [raw_header(), chunk(0, bytes(100))],
        "INVALID_ARGUMENT",
        ("raw data has 100 bytes; shape (4, 4, 4) of int16 needs 128",),
    ),
    StreamCase(
        "raw_unknown_dtype",
        lambda: [raw_header(dtype="complex64"), chunk(0, bytes(512))],
        "INVALID_ARGUMENT",
        ("raw dtype 'complex64' is not supported",),
    ),
    StreamCase(
        "raw_shape_not_3d",
        lambda: [raw_header(shape=(4, 4)), chunk(0, bytes(32))],
        "INVALID_ARGUMENT",
        ("raw shape", "three positive integers"),
    ),
    StreamCase(
        "raw_without_geometry",
        lambda: [
            header(payload=pb.RAW, modality="CT", raw=pb.RawArray(dtype="int16", shape=(4, 4, 4))),
            chunk(0, bytes(128)),
        ],
        "INVALID_ARGUMENT",
        ("exactly one of affine (16 numbers) or spacing_mm",),
    ),
    StreamCase(
        "raw_singular_affine",
        lambda: [raw_header(affine=[0.0] * 15 + [1.0]), chunk(0, bytes(128))],
        "INVALID_ARGUMENT",
        ("raw affine is singular",),
    ),
    StreamCase(
        "chunk_over_limit",
        lambda: [header(), chunk(0, bytes(MAX_CHUNK_BYTES + 1))],
        "RESOURCE_EXHAUSTED",
        (f"chunk of {MAX_CHUNK_BYTES + 1} bytes exceeds the chunk limit of {MAX_CHUNK_BYTES} bytes",),
    ),
    StreamCase(
        "request_over_limit",
        lambda: [header()]
        + [chunk(k, bytes(MAX_CHUNK_BYTES)) for k in range(MAX_REQUEST_BYTES // MAX_CHUNK_BYTES + 1)],
        "RESOURCE_EXHAUSTED",
        (f"request limit of {MAX_REQUEST_BYTES} bytes",),
    ),
    StreamCase(
        "header_sent_twice",
        lambda: [header(), header(), chunk(0, b"x")],
        "INVALID_ARGUMENT",
        ("header was sent twice",),
    ),
    StreamCase(
        "chunk_before_header",
        lambda: [chunk(0, b"x"), header()],
        "INVALID_ARGUMENT",
        ("first message of a Read must be the header",),
    ),
    StreamCase("empty_stream", lambda: [], "INVALID_ARGUMENT", ("the Read stream was empty",)),
    StreamCase("header_only", lambda: [header()], "INVALID_ARGUMENT", ("carried no payload",)),
    StreamCase(
        "chunk_skips_a_file",
        lambda: [header(), chunk(1, b"x")],
        "INVALID_ARGUMENT",
        ("chunk for file 1 arrived before any chunk of file 0",),
    ),
    StreamCase(
        "chunk_back_to_an_earlier_file",
        lambda: [header(), chunk(0, b"x"), chunk(1, b"y"), chunk(0, b"z")],
        "INVALID_ARGUMENT",
        ("chunk for file 0 arrived after file 1",),
    ),
    StreamCase(
        "bad_request_id",
        lambda: [header(request_id="no spaces allowed!"), chunk(0, b"x")],
        "INVALID_ARGUMENT",
        ("header.request_id must be 1-64 characters",),
    ),
    StreamCase(
        "nifti_payload_of_two_files",
        lambda: [header(payload=pb.NIFTI), chunk(0, b"a"), chunk(1, b"b")],
        "INVALID_ARGUMENT",
        ("a NIFTI payload is one file, got 2",),
    ),
    StreamCase(
        "unknown_output_kind",
        lambda: [header(outputs=[99]), chunk(0, b"x")],
        "INVALID_ARGUMENT",
        ("header.outputs holds unknown OutputKind values [99]",),
    ),
]


def check_message(case_name: str, code: str, message: str, expected_code: str, names: tuple[str, ...]) -> None:
    assert code == expected_code, f"{case_name}: got {code}: {message}"
    for name in names:
        assert name in message, f"{case_name}: {name!r} missing from {message!r}"
    for forbidden in ("Traceback", 'File "', UID_PREFIX, PATIENT_NAME, PATIENT_ID, "PATIENT"):
        assert forbidden not in message, f"{case_name}: {forbidden!r} in {message!r}"


@pytest.mark.parametrize("case", FILE_CASES, ids=lambda c: c.name)
def test_malformed_file(case: FileCase, server, base_series, tmp_path, capsys):
    path = case.build(base_series, tmp_path / case.name)
    code, out, err = cli_read(capsys, server, path, *case.args)
    assert code != 0 and not out, f"{case.name}: exit {code}, stdout {out!r}"
    assert err.startswith("error: ") and err.count("\n") == 1, err
    status, _, message = err.removeprefix("error: ").strip().partition(": ")
    check_message(case.name, status, message, case.code, case.names)


@pytest.mark.parametrize("case", STREAM_CASES, ids=lambda c: c.name)
def test_malformed_stream(case: StreamCase, server):
    status, message = rpc_error(server, case.messages())
    check_message(case.name, status, message, case.code, case.names)


def test_corpus_is_large_and_covers_every_client_error_code():
    assert len(FILE_CASES) + len(STREAM_CASES) >= 25
    codes = {c.code for c in FILE_CASES} | {c.code for c in STREAM_CASES}
    assert codes == {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "NOT_FOUND", "FAILED_PRECONDITION", "UNIMPLEMENTED"}


def test_valid_study_after_the_corpus_is_read_and_the_server_is_still_up(server, tmp_path, capsys):
    """Run last: the same server, after every malformed input, reads a phantom and finds its planted nodules."""
    rng = np.random.default_rng(20261128)
    phantom = make_chest_ct(
        rng, shape=(128, 128, 60), pixel_spacing_mm=1.0, slice_spacing_mm=2.5, n_nodules=2,
        nodule_diameters_mm=(12.0, 18.0),
    )  # fmt: skip
    folder = tmp_path / "phantom"
    write_dicom_series(phantom, folder, shuffle=rng)
    code, out, err = cli_read(capsys, server, folder, "--format", "json")
    assert code == 0, err
    findings = json.loads(out)["findings"]
    for lesion in phantom.lesions:
        distances = [np.linalg.norm(np.subtract(f["center_mm"], lesion.center_mm)) for f in findings]
        assert distances and min(distances) <= MATCH_MM, f"{lesion} not found in {findings}"
    assert server.process is not None and server.process.poll() is None, "the server process exited"
    log = server.log_path.read_text(errors="replace")
    assert "failed with an unexpected error" not in log, "a malformed input reached INTERNAL"
