"""read_raw and the InputLimits it shares with the other readers."""

from __future__ import annotations

import numpy as np
import pytest

from inference.errors import InvalidInputError, LimitExceededError
from inference.io import (
    RAW_DTYPES,
    DicomSeriesReader,
    InputLimits,
    NiftiReader,
    RawReader,
    VolumeReader,
    read_raw,
)

SHAPE = (5, 4, 3)


def array(dtype: str) -> np.ndarray:
    return (np.arange(np.prod(SHAPE)) % 100).astype(dtype).reshape(SHAPE)


@pytest.mark.parametrize("dtype", RAW_DTYPES)
def test_every_dtype_round_trips_in_c_order(dtype):
    data = array(dtype)
    volume = read_raw(
        data.astype(f"<{data.dtype.str[1:]}").tobytes(),
        dtype=dtype,
        shape=SHAPE,
        spacing_mm=(0.5, 0.6, 2.0),
        modality="CT",
    )
    assert volume.shape == SHAPE
    assert volume.voxels.dtype == np.float32
    np.testing.assert_array_equal(volume.voxels, data.astype(np.float32))
    np.testing.assert_array_equal(volume.affine, np.diag([0.5, 0.6, 2.0, 1.0]))
    assert volume.voxels.flags.writeable


def test_affine_is_row_major_voxel_to_lps():
    affine = [0.0, 0.0, 2.0, -10.0, 0.7, 0.0, 0.0, 5.0, 0.0, -0.7, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    volume = read_raw(array("int16").tobytes(), dtype="int16", shape=SHAPE, affine=affine, modality="MR")
    np.testing.assert_array_equal(volume.affine, np.reshape(affine, (4, 4)))
    np.testing.assert_allclose(volume.voxel_to_lps([1, 2, 3])[0], [-10 + 6.0, 5 + 0.7, 1 - 1.4])
    assert volume.modality == "MR"


def test_reader_class():
    reader = RawReader(dtype="uint8", shape=SHAPE, modality="CT", spacing_mm=(1.0, 1.0, 1.0))
    assert reader.read(array("uint8").tobytes()).shape == SHAPE


def test_readers_share_one_interface():
    for reader in (DicomSeriesReader(), NiftiReader(), RawReader(dtype="uint8", shape=SHAPE, modality="CT")):
        assert isinstance(reader, VolumeReader)

    class Incomplete(VolumeReader[bytes]):
        def read(self, payload: bytes):
            return super().read(payload)

    with pytest.raises(NotImplementedError, match="Incomplete must implement read"):
        Incomplete().read(b"")


def test_wrong_byte_count():
    with pytest.raises(InvalidInputError, match=r"raw data has 118 bytes; shape \(5, 4, 3\) of int16 needs 120"):
        read_raw(array("int16").tobytes()[:-2], dtype="int16", shape=SHAPE, spacing_mm=(1, 1, 1), modality="CT")


@pytest.mark.parametrize("dtype", ["int8", "complex64", "float16", "<i2", "nonsense"])
def test_unsupported_dtype(dtype):
    with pytest.raises(InvalidInputError, match=r"raw dtype .* is not supported; use one of uint8, int16"):
        read_raw(b"", dtype=dtype, shape=SHAPE, spacing_mm=(1, 1, 1), modality="CT")


@pytest.mark.parametrize("shape", [(5, 4), (5, 4, 3, 1), (5, 0, 3), (5, -4, 3), (5, 4.5, 3), (True, 4, 3), "abc"])
def test_bad_shape(shape):
    with pytest.raises(InvalidInputError, match="must be three positive integers"):
        read_raw(b"", dtype="uint8", shape=shape, spacing_mm=(1, 1, 1), modality="CT")


def test_limits_are_checked_before_the_byte_count():
    limits = InputLimits(max_voxels=1000, max_dimension=100)
    with pytest.raises(LimitExceededError, match=r"raw volume has 1000000 voxels .* the limit is 1000 voxels"):
        read_raw(b"", dtype="uint8", shape=(100, 100, 100), spacing_mm=(1, 1, 1), modality="CT", limits=limits)
    with pytest.raises(LimitExceededError, match=r"raw volume has 101 voxels along axis 1"):
        read_raw(b"", dtype="uint8", shape=(1, 101, 1), spacing_mm=(1, 1, 1), modality="CT", limits=limits)


@pytest.mark.parametrize(
    ("geometry", "message"),
    [
        ({}, "exactly one of affine"),
        ({"affine": [1.0] * 16, "spacing_mm": (1, 1, 1)}, "exactly one of affine"),
        ({"affine": [1.0] * 12}, "raw affine has 12 numbers"),
        ({"affine": [*np.eye(4).ravel()[:-1], np.nan]}, "NaN or infinite"),
        ({"affine": [*np.diag([1.0, 1.0, 1.0, 1.0])[:3].ravel(), 0.0, 0.0, 1.0, 1.0]}, "last row"),
        ({"affine": list(np.diag([1.0, 0.0, 1.0, 1.0]).ravel())}, "singular"),
        ({"affine": ["a"] * 16}, "must be 16 numbers"),
        ({"spacing_mm": (1.0, 0.0, 1.0)}, "spacing_mm .* must be three positive finite numbers"),
        ({"spacing_mm": (1.0, float("nan"), 1.0)}, "spacing_mm .* must be three positive finite numbers"),
        ({"spacing_mm": (1.0, 1.0)}, "spacing_mm .* must be three positive finite numbers"),
    ],
)
def test_bad_geometry(geometry, message):
    with pytest.raises(InvalidInputError, match=message):
        read_raw(array("uint8").tobytes(), dtype="uint8", shape=SHAPE, modality="CT", **geometry)


def test_nan_and_inf_are_refused():
    data = array("float32")
    data[0, 0, 0], data[4, 3, 2] = np.nan, -np.inf
    with pytest.raises(InvalidInputError, match="raw volume has 2 NaN or infinite voxel values"):
        read_raw(data.tobytes(), dtype="float32", shape=SHAPE, spacing_mm=(1, 1, 1), modality="CT")


def test_bad_modality():
    with pytest.raises(InvalidInputError, match="modality 'ct' is not a DICOM Modality code"):
        read_raw(array("uint8").tobytes(), dtype="uint8", shape=SHAPE, spacing_mm=(1, 1, 1), modality="ct")


# --- InputLimits ----------------------------------------------------------------------------------------------------


def test_limits_defaults():
    limits = InputLimits()
    assert limits.max_voxels == 512 * 512 * 1200
    assert limits.max_request_bytes == 2 * 1024**3
    assert limits.max_files == 4000
    assert limits.max_chunk_bytes == 4 * 1024**2
    assert limits.max_dimension == 8192


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_voxels": 0}, "max_voxels must be a positive integer, got 0"),
        ({"max_files": -1}, "max_files must be a positive integer, got -1"),
        ({"max_dimension": 2.5}, "max_dimension must be a positive integer, got 2.5"),
        ({"max_files": True}, "max_files must be a positive integer, got True"),
        ({"max_chunk_bytes": 10, "max_request_bytes": 5}, r"max_chunk_bytes \(10\) must not exceed"),
        ({"max_dimension": 100, "max_voxels": 50}, r"max_dimension \(100\) must not exceed max_voxels \(50\)"),
    ],
)
def test_limits_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InputLimits(**kwargs)


def test_limit_helpers_quote_the_limit():
    limits = InputLimits(max_files=3, max_chunk_bytes=10, max_request_bytes=100)
    limits.check_files(3)
    with pytest.raises(LimitExceededError, match="request has 4 files; the limit is 3"):
        limits.check_files(4)
    with pytest.raises(LimitExceededError, match="chunk has 11 bytes; the limit is 10 bytes"):
        limits.check_chunk_bytes(11)
    with pytest.raises(LimitExceededError, match="request has 101 bytes; the limit is 100 bytes"):
        limits.check_request_bytes(101)
    with pytest.raises(LimitExceededError, match=r"volume has 4294967296 voxels \(shape \(65536, 65536, 1\)\)"):
        InputLimits(max_dimension=2**16, max_voxels=2**20).check_shape((2**16, 2**16, 1))
