"""PlaneStream: NIfTI and RAW payloads decoded plane by plane as their bytes arrive, in chunks of any size.

Each stream's volume must be exactly what the whole-payload reader returns (voxels bit for bit, affine, warnings),
each plane must be in place as soon as it is reported, and every payload the reader would refuse, or that the
stream cannot prove equal, must stop the stream (volume None: the server then reads it whole, for its own error).
"""

from __future__ import annotations

import gzip
import zlib

import nibabel as nib
import numpy as np
import pytest

from inference.errors import OverloadedError
from inference.io import InputLimits, read_nifti
from inference.io.nifti import MAX_EXTENSION_BYTES
from inference.io.raw import read_raw
from inference.io.streaming import NiftiPlaneStream, RawPlaneStream

SHAPE = (24, 20, 16)
_angle = np.deg2rad(25.0)
RAS_AFFINE = np.array(
    [
        [0.8 * np.cos(_angle), -0.8 * np.sin(_angle), 0.0, 40.0],
        [0.8 * np.sin(_angle), 0.8 * np.cos(_angle), 0.0, -17.5],
        [0.0, 0.0, 1.5, -60.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def nifti_bytes(data: np.ndarray, *, version: int = 1, slope: float | None = None, extension: bool = False) -> bytes:
    klass = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    image = klass(data, RAS_AFFINE)
    image.set_sform(RAS_AFFINE, code=2)
    if slope is not None:
        image.header.set_slope_inter(slope, -1024.0)
    if extension:
        image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"x" * 1000))
    return image.to_bytes()


def phantom(dtype: type) -> np.ndarray:
    values = np.random.default_rng(15).normal(40.0, 300.0, SHAPE)
    return values.astype(dtype)


def feed(stream, payload: bytes, seed: int = 0) -> list[int]:
    """``payload`` in chunks of random sizes (1 byte to 3 planes); every plane reported is checked at once."""
    rng = np.random.default_rng(seed)
    placed, position = [], 0
    while position < len(payload):
        size = int(rng.integers(1, 3 * SHAPE[0] * SHAPE[1] * 8))
        new = stream.feed(payload[position : position + size])
        position += size
        for k in new:
            assert np.array_equal(stream.plane(k), stream.plane(k))  # readable at once (not torn)
        placed += new
    return placed


@pytest.mark.parametrize("compress", [False, True], ids=["nii", "nii.gz"])
@pytest.mark.parametrize(
    ("version", "dtype", "slope", "extension"),
    [(1, np.int16, None, False), (1, np.int16, 0.5, True), (2, np.float32, None, False), (1, np.uint8, None, True)],
)
def test_a_nifti_stream_is_the_whole_reader_s_volume(compress, version, dtype, slope, extension):
    raw = nifti_bytes(phantom(dtype), version=version, slope=slope, extension=extension)
    payload = gzip.compress(raw, compresslevel=6) if compress else raw
    whole = read_nifti(payload)
    stream = NiftiPlaneStream("CT", InputLimits())
    placed = feed(stream, payload)
    assert placed == list(range(SHAPE[2]))  # z-slices, in order, each once
    assert stream.grid.shape == SHAPE and np.array_equal(stream.grid.affine, whole.affine)
    for k in placed:
        assert np.array_equal(stream.plane(k), whole.voxels[:, :, k])
    volume = stream.volume()
    assert volume is not None and stream.failed is None
    assert np.array_equal(volume.voxels, whole.voxels) and volume.voxels.dtype == np.float32
    assert np.array_equal(volume.affine, whole.affine) and volume.warnings == whole.warnings


@pytest.mark.parametrize(
    ("dtype", "geometry"),
    [("int16", {"spacing_mm": (0.7, 0.8, 2.5)}), ("float32", {"affine": tuple(np.eye(4).ravel() * 1.0)})],
)
def test_a_raw_stream_is_the_whole_reader_s_volume_on_a_grid_of_its_reversed_axes(dtype, geometry):
    array = phantom(np.dtype(dtype))
    payload = array.tobytes()
    description = {"dtype": dtype, "shape": SHAPE, "modality": "CT", "affine": None, "spacing_mm": None, **geometry}
    whole = read_raw(payload, **description)
    stream = RawPlaneStream(**description, limits=InputLimits())
    placed = feed(stream, payload, seed=3)
    assert placed == list(range(SHAPE[0]))  # x-planes arrive first in C order: they are the grid's slices
    grid = stream.grid
    assert grid.shape == SHAPE[::-1]
    index = np.array([5, 7, 11, 1.0])  # grid voxel (z, y, x) and array voxel (x, y, z) are the same point
    assert np.allclose(grid.affine @ index, whole.affine @ np.array([11, 7, 5, 1.0]))
    for k in placed:
        assert np.array_equal(stream.plane(k), whole.voxels[k].T)
    volume = stream.volume()
    assert np.array_equal(volume.voxels, whole.voxels) and np.array_equal(volume.affine, whole.affine)


def gzip_with_bad_crc(raw: bytes) -> bytes:
    payload = bytearray(gzip.compress(raw))
    payload[-8] ^= 0xFF  # the CRC-32 in the trailer
    return bytes(payload)


REFUSED = {
    "truncated .nii": lambda raw: raw[:-100],
    "truncated .nii.gz": lambda raw: gzip.compress(raw)[:-20],
    "damaged CRC": gzip_with_bad_crc,
    "bytes after the gzip stream": lambda raw: gzip.compress(raw) + b"garbage",
    "two gzip members": lambda raw: gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]),
    "not NIfTI": lambda raw: b"\0" * 4 + raw[4:],
    "more voxels than the limits": lambda raw: raw,  # with the small limits below
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_the_stream_cannot_prove_equal_is_left_to_the_whole_reader(case):
    raw = nifti_bytes(phantom(np.int16))
    limits = InputLimits(max_voxels=1000, max_dimension=100) if case == "more voxels than the limits" else InputLimits()
    stream = NiftiPlaneStream("CT", limits)
    feed(stream, REFUSED[case](raw))
    assert stream.volume() is None


def test_nan_voxels_stop_the_stream_as_the_reader_refuses_them():
    data = phantom(np.float32)
    data[3, 4, 9] = np.nan
    stream = NiftiPlaneStream("CT", InputLimits())
    placed = feed(stream, nifti_bytes(data))
    assert stream.failed == "InvalidInputError" and stream.volume() is None and max(placed) < 9


@pytest.mark.parametrize("change", ["one byte more", "one byte less", "a bad dtype"])
def test_a_raw_payload_the_reader_refuses_is_left_to_it(change):
    payload = phantom(np.int16).tobytes()
    dtype = "complex64" if change == "a bad dtype" else "int16"
    payload = payload + b"\0" if change == "one byte more" else payload[:-1] if change == "one byte less" else payload
    stream = RawPlaneStream(
        dtype=dtype, shape=SHAPE, affine=None, spacing_mm=(1, 1, 1), modality="CT", limits=InputLimits()
    )
    feed(stream, payload)
    assert stream.volume() is None


def test_inflating_stops_past_what_the_header_implies():
    """A small image followed by 200 MB of zeros (a 200 KB upload) inflates no further than the reader would read."""
    raw = nifti_bytes(phantom(np.int16))
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = compressor.compress(raw) + b"".join(compressor.compress(bytes(1 << 20)) for _ in range(200))
    bomb += compressor.flush()
    assert len(bomb) < 400_000
    stream = NiftiPlaneStream("CT", InputLimits())
    feed(stream, bomb)
    assert stream.volume() is None and stream.failed == "the gzip stream continues after the voxels"
    assert stream._decoded <= len(raw) + MAX_EXTENSION_BYTES + (1 << 20)
    small = NiftiPlaneStream("CT", InputLimits(max_inflated_bytes=len(raw) // 2))  # the read's inflate budget
    feed(small, gzip.compress(raw))
    assert small.failed == "LimitExceededError" and small.volume() is None


def test_planes_are_reserved_as_they_are_converted_and_a_refusal_stops_the_stream():
    raw = nifti_bytes(phantom(np.int16))
    reserved: list[int] = []
    stream = NiftiPlaneStream("CT", InputLimits(), reserve=reserved.append)
    stream.feed(raw[: 352 + 5 * SHAPE[0] * SHAPE[1] * 2])  # the header and five slices: five slices reserved
    assert sum(reserved) == 5 * SHAPE[0] * SHAPE[1] * 4

    def refuse(n_bytes: int) -> None:
        raise OverloadedError("the memory budget is held")

    refused = NiftiPlaneStream("CT", InputLimits(), reserve=refuse)
    feed(refused, raw)
    assert refused.failed == "OverloadedError" and refused.volume() is None and refused.planes_done == 0


def test_a_defect_in_the_stream_leaves_the_payload_to_the_whole_reader(monkeypatch, caplog):
    def broken(self, buffer, first, count):
        raise ValueError("a defect")

    monkeypatch.setattr(NiftiPlaneStream, "_convert", broken)
    stream = NiftiPlaneStream("CT", InputLimits())
    feed(stream, nifti_bytes(phantom(np.int16)))
    assert stream.failed == "unexpected ValueError" and stream.volume() is None
    assert "streamed decode failed unexpectedly (ValueError)" in caplog.text
