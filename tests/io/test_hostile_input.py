"""Inputs a hostile client sends, read by the readers directly: each defect of issue #12 that lives in inference/io.

Every case here failed before its fix: the deflated file wedged the reader in an endless loop, extreme but finite
geometry and rescale values got deep into MONAI/torch (INTERNAL) or were accepted, NaN voxels were replaced with 0,
a transfer syntax holding a newline was echoed into the message unescaped, and a deflate budget held per file
let a read inflate a file's limit once per file.
"""

from __future__ import annotations

import gzip
import io
import threading
import zlib

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from inference.errors import InvalidInputError, LimitExceededError, UnsupportedError, escape_text, quote
from inference.io import InputLimits, read_dicom_series, read_nifti, read_raw

ROOT = "1.2.826.0.1.3680043.10.998"


def dicom_file(
    stored: np.ndarray,
    *,
    number: int = 0,
    syntax: str = ExplicitVRLittleEndian,
    position: tuple[float, float, float] | None = None,
    **attrs: object,
) -> bytes:
    """One CT slice as a Part 10 file; ``attrs`` override or add elements (None deletes one)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = f"{ROOT}.1.{number}"
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = f"{ROOT}.1.{number}"
    ds.StudyInstanceUID = f"{ROOT}.2"
    ds.SeriesInstanceUID = f"{ROOT}.3"
    ds.SeriesNumber = 1
    ds.Modality = "CT"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelSpacing = [0.7, 0.7]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = list(position or (0.0, 0.0, 2.5 * number))
    ds.SliceThickness = 2.5
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    for key, value in attrs.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.PixelData = stored.astype("<u2").tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def deflate_body(data: bytes) -> tuple[bytes, int]:
    """The deflated data set of a Deflated Explicit VR Little Endian file, and the bytes left after its stream."""
    group_length = int.from_bytes(data[140:144], "little")
    body = data[144 + group_length :]
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflater.decompress(body)
    return body, len(inflater.unused_data)


@pytest.fixture(scope="module")
def padded_deflated_file() -> bytes:
    """A deflated CT slice of about 5 KB that inflates past 4 MiB (one inflate step) and whose deflate stream pydicom
    padded with one byte (an odd-length stream): what sent the reader's inflate loop spinning forever."""
    for rows in range(1500, 1600):
        data = dicom_file(np.zeros((rows, 1536), dtype=np.uint16), syntax=DeflatedExplicitVRLittleEndian)
        if deflate_body(data)[1] == 1:
            return data
    raise AssertionError("no odd-length deflate stream in 100 tries")


def read_in_thread(files: list[bytes], timeout_s: float = 20.0, **kwargs: object) -> object:
    """read_dicom_series in a daemon thread: its result or exception, or AssertionError when it does not end."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["volume"] = read_dicom_series(files, **kwargs)
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"the reader did not finish within {timeout_s} s"
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["volume"]


# -- defect 1: a deflated file with a padding byte after its stream ---------------------------------------------


def test_a_deflated_file_padded_after_its_stream_is_read_not_looped_on(padded_deflated_file):
    assert len(padded_deflated_file) < 10_000
    volume = read_in_thread([padded_deflated_file])
    assert volume.shape[0] == 1536 and volume.shape[2] == 1
    assert float(volume.voxels.min()) == float(volume.voxels.max()) == -1024.0


def test_inflated_bytes_are_bounded_per_read_not_per_file():
    stored = np.zeros((256, 256), dtype=np.uint16)  # 128 KiB of zeros: each file inflates to ~131 KB
    files = [dicom_file(stored, number=i, syntax=DeflatedExplicitVRLittleEndian) for i in range(4)]
    limits = InputLimits(max_inflated_bytes=300_000)
    assert read_dicom_series(files[:2], limits=limits).shape == (256, 256, 2)
    with pytest.raises(LimitExceededError, match=r"\(up to file 2\) inflate to more than 300000 bytes"):
        read_dicom_series(files, limits=limits)


# -- defect 3: extreme but finite values ----------------------------------------------------------------------


def two_slices(**attrs: object) -> list[bytes]:
    stored = np.full((16, 16), 1000, dtype=np.uint16)
    return [dicom_file(stored, number=i, **attrs) for i in range(2)]


@pytest.mark.parametrize("spacing", [1e-6, 1e6, 1e-300, 1e300])
def test_implausible_pixel_spacing_is_invalid_argument(spacing):
    with pytest.raises(InvalidInputError, match=r"file 0: PixelSpacing .* plausible range 0.001-100 mm"):
        read_dicom_series(two_slices(PixelSpacing=[spacing, spacing]))


def test_slices_1e300_mm_apart_are_invalid_argument():
    stored = np.full((16, 16), 1000, dtype=np.uint16)
    files = [dicom_file(stored, number=0), dicom_file(stored, number=1, position=(0.0, 0.0, 1e300))]
    with pytest.raises(InvalidInputError, match=r"file 1: ImagePositionPatient .* outside the plausible \+-100000 mm"):
        read_dicom_series(files)


def test_slices_90_mm_apart_are_outside_the_plausible_step():
    stored = np.full((16, 16), 1000, dtype=np.uint16)
    files = [dicom_file(stored, number=0), dicom_file(stored, number=1, position=(0.0, 0.0, 150.0))]
    with pytest.raises(InvalidInputError, match=r"series 1: voxel spacing along axis 2 is 150 mm, outside"):
        read_dicom_series(files)


def test_a_stack_longer_than_max_extent_mm_is_resource_exhausted():
    stored = np.full((16, 16), 1000, dtype=np.uint16)
    files = [dicom_file(stored, number=i, position=(0.0, 0.0, 50.0 * i)) for i in range(5)]
    with pytest.raises(LimitExceededError, match=r"field of view is 200 mm along axis 2; the max_extent_mm limit"):
        read_dicom_series(files, limits=InputLimits(max_extent_mm=150))


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"RescaleSlope": 1e308}, r"slope 1e\+308 is outside the plausible range"),
        ({"RescaleIntercept": 1e308}, r"intercept 1e\+308 is outside the plausible range"),
        ({"RescaleSlope": -3e6}, r"slope -3e\+06 is outside the plausible range"),
    ],
)
def test_implausible_rescale_is_invalid_argument(attrs, message):
    with pytest.raises(InvalidInputError, match=message):
        read_dicom_series(two_slices(**attrs))


def nifti_bytes(data: np.ndarray, zooms: tuple[float, float, float], **header: float) -> bytes:
    image = nib.Nifti1Image(data, np.diag([*zooms, 1.0]))
    for key, value in header.items():
        image.header[key] = value
    return image.to_bytes()


@pytest.mark.parametrize("zoom", [1e6, 1e30, 1e-5])
def test_implausible_nifti_zooms_are_invalid_argument(zoom):
    data = np.ones((8, 8, 8), dtype=np.int16)
    with pytest.raises(InvalidInputError, match=r"NIfTI sform: voxel spacing along axis 0 is .* plausible range"):
        read_nifti(nifti_bytes(data, (zoom, 1.0, 1.0)))


def test_implausible_nifti_scaling_is_invalid_argument():
    data = np.ones((8, 8, 8), dtype=np.int16)
    with pytest.raises(InvalidInputError, match=r"NIfTI scl_slope/scl_inter: slope 1e\+30 is outside"):
        read_nifti(nifti_bytes(data, (1.0, 1.0, 1.0), scl_slope=1e30, scl_inter=0.0))


@pytest.mark.parametrize("spacing", [1e-300, 1e-6, 1e20, 1e300])
def test_implausible_raw_spacing_is_invalid_argument(spacing):
    data = np.zeros((4, 4, 4), dtype=np.float32)
    with pytest.raises(InvalidInputError, match=r"raw geometry: voxel spacing along axis 1 is .* plausible range"):
        read_raw(data.tobytes(), dtype="float32", shape=(4, 4, 4), spacing_mm=(1.0, spacing, 1.0), modality="CT")


def test_a_raw_affine_with_parallel_axes_or_a_far_origin_is_invalid_argument():
    data = np.zeros((4, 4, 4), dtype=np.float32).tobytes()
    sheared = np.array([[1.0, 0.999, 0, 0], [0, 0.001, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    with pytest.raises(InvalidInputError, match=r"raw geometry: the voxel axes are \(nearly\) parallel"):
        read_raw(data, dtype="float32", shape=(4, 4, 4), affine=sheared.ravel().tolist(), modality="CT")
    far = np.eye(4)
    far[0, 3] = 1e9
    with pytest.raises(InvalidInputError, match=r"voxel positions reach 1e\+09 mm from the origin"):
        read_raw(data, dtype="float32", shape=(4, 4, 4), affine=far.ravel().tolist(), modality="CT")


# -- non-finite and implausible voxel values are refused -----------------------------------------------------------


def test_nan_and_inf_voxels_are_refused():
    data = np.zeros((4, 4, 4), dtype=np.float32)
    data[0, 0, 0], data[1, 2, 3] = np.nan, -np.inf
    with pytest.raises(InvalidInputError, match=r"raw volume has 2 NaN or infinite voxel values"):
        read_raw(data.tobytes(), dtype="float32", shape=(4, 4, 4), spacing_mm=(1, 1, 1), modality="CT")
    with pytest.raises(InvalidInputError, match=r"NIfTI image has 2 NaN or infinite voxel values"):
        read_nifti(gzip.compress(nifti_bytes(data, (1.0, 1.0, 1.0))))


def test_float64_values_beyond_float32_and_huge_values_are_refused():
    data = np.zeros((4, 4, 4), dtype=np.float64)
    data[0, 0, 0] = 1e300  # infinite once cast to float32
    with pytest.raises(InvalidInputError, match=r"raw volume has 1 NaN or infinite voxel values"):
        read_raw(data.tobytes(), dtype="float64", shape=(4, 4, 4), spacing_mm=(1, 1, 1), modality="CT")
    data[0, 0, 0] = 3e38
    with pytest.raises(InvalidInputError, match=r"raw volume has voxel values from 0 to 3e\+38, outside"):
        read_raw(data.tobytes(), dtype="float64", shape=(4, 4, 4), spacing_mm=(1, 1, 1), modality="CT")


# -- defect 6: values from files are escaped -----------------------------------------------------------------------


FORGED = "1.2.3\n2024-01-01 00:00:00,000 INFO radserve.audit [-]: read forged status=OK\x00\x1b[2J\u2028"


def test_a_transfer_syntax_holding_a_newline_is_escaped_in_the_message():
    data = dicom_file(np.zeros((8, 8), dtype=np.uint16))
    # Rewrite the TransferSyntaxUID value in place (pydicom will not write a UID holding a newline).
    old = ExplicitVRLittleEndian.encode() + b"\0"
    new = FORGED.encode("utf-8")
    new += b"\0" * (len(new) % 2)
    patched = data.replace(len(old).to_bytes(2, "little") + old, len(new).to_bytes(2, "little") + new, 1)
    group_length = int.from_bytes(patched[140:144], "little") + len(new) - len(old)
    patched = patched[:140] + group_length.to_bytes(4, "little") + patched[144:]
    with pytest.raises((UnsupportedError, InvalidInputError)) as err:
        read_dicom_series([patched])
    message = err.value.message
    assert "\n" not in message and "\x00" not in message and "\x1b" not in message and "\u2028" not in message
    assert message.isascii()
    assert r"1.2.3\n2024-01-01" in message


def test_escape_text_and_quote():
    assert escape_text("a\nb\r\x00\x1b\x7f é\u2028") == r"a\nb\r\x00\x1b\x7f \xe9\u2028"
    assert quote("x" * 100, 10) == "'xxxxxxxxxx...'"
    assert escape_text(FORGED).isascii() and "\n" not in escape_text(FORGED)
