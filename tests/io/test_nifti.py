"""read_nifti: RAS -> LPS geometry checked by hand, and every malformed header refused before reading data."""

from __future__ import annotations

import gzip
import io
import struct
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from inference.errors import InvalidInputError, LimitExceededError, UnsupportedError
from inference.io import InputLimits, NiftiReader, read_nifti

SHAPE = (6, 5, 4)
MARK = (4, 1, 2)
# A rotated, anisotropic RAS affine: columns are the i, j, k steps in mm, the last column the origin.
_angle = np.deg2rad(20.0)
RAS_AFFINE = np.array(
    [
        [0.9 * np.cos(_angle), -1.1 * np.sin(_angle), 0.0, 12.0],
        [0.9 * np.sin(_angle), 1.1 * np.cos(_angle), 0.0, -7.5],
        [0.0, 0.0, 2.5, 30.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def volume_data(dtype: type = np.int16) -> np.ndarray:
    data = np.arange(np.prod(SHAPE), dtype=dtype).reshape(SHAPE) % 50
    data[MARK] = 1000
    return data


def nifti_bytes(
    data: np.ndarray,
    affine: np.ndarray = RAS_AFFINE,
    *,
    version: int = 1,
    sform_code: int = 2,
    qform_code: int = 0,
    endianness: str | None = None,
) -> bytes:
    klass = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    header = (nib.Nifti1Header if version == 1 else nib.Nifti2Header)(endianness=endianness)
    header.set_data_dtype(data.dtype)
    img = klass(data, affine, header=header)
    img.set_sform(affine, code=sform_code)
    img.set_qform(affine, code=qform_code)
    return img.to_bytes()


def patched(raw: bytes, **fields: object) -> bytes:
    """The same file with header fields overwritten (dim, vox_offset, magic, ...)."""
    version_2 = 540 in (struct.unpack("<i", raw[:4])[0], struct.unpack(">i", raw[:4])[0])
    klass, size = (nib.Nifti2Header, 540) if version_2 else (nib.Nifti1Header, 348)
    endianness = "<" if struct.unpack("<i", raw[:4])[0] == size else ">"
    header = klass.from_fileobj(io.BytesIO(raw[:size]), endianness=endianness, check=False)
    for key, value in fields.items():
        header[key] = value
    return header.binaryblock + raw[size:]


def lps_of(ras_affine: np.ndarray, ijk: tuple[int, int, int]) -> np.ndarray:
    """By hand: NIfTI world (RAS) of a voxel, with x and y negated."""
    x, y, z = (ras_affine @ [*ijk, 1.0])[:3]
    return np.array([-x, -y, z])


# --- geometry and values ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "gz", "endianness"),
    [(1, False, None), (1, True, None), (2, False, None), (2, True, None), (1, False, ">")],
)
def test_sform_to_lps_and_values(version, gz, endianness):
    data = volume_data()
    raw = nifti_bytes(data, version=version, endianness=endianness)
    volume = read_nifti(gzip.compress(raw) if gz else raw)

    assert volume.shape == SHAPE
    assert volume.voxels.dtype == np.float32
    np.testing.assert_array_equal(volume.voxels, data.astype(np.float32))
    np.testing.assert_allclose(volume.affine, np.diag([-1.0, -1.0, 1.0, 1.0]) @ RAS_AFFINE, atol=1e-6)
    np.testing.assert_allclose(volume.voxel_to_lps(MARK)[0], lps_of(RAS_AFFINE, MARK), atol=1e-5)
    assert volume.modality == "CT"
    assert volume.source is None
    assert volume.warnings == ()


def test_qform_is_used_when_sform_code_is_zero():
    other = RAS_AFFINE.copy()
    other[:3, 3] += 100.0  # an sform that must be ignored
    raw = nifti_bytes(volume_data(), RAS_AFFINE, sform_code=0, qform_code=1)
    klass = nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:348]), check=False)
    klass.set_sform(other, code=0)
    volume = read_nifti(klass.binaryblock + raw[348:])
    np.testing.assert_allclose(volume.voxel_to_lps(MARK)[0], lps_of(RAS_AFFINE, MARK), atol=1e-4)


def test_sform_wins_over_qform():
    qform = np.diag([3.0, 3.0, 3.0, 1.0])
    raw = nifti_bytes(volume_data(), RAS_AFFINE, sform_code=1, qform_code=1)
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:348]), check=False)
    header.set_qform(qform, code=1)
    volume = read_nifti(header.binaryblock + raw[348:])
    np.testing.assert_allclose(volume.voxel_to_lps(MARK)[0], lps_of(RAS_AFFINE, MARK), atol=1e-5)


def test_no_orientation_uses_pixdim_and_warns():
    raw = nifti_bytes(volume_data(), np.diag([0.5, 0.7, 3.0, 1.0]), sform_code=0, qform_code=0)
    volume = read_nifti(raw)
    np.testing.assert_allclose(volume.affine, np.diag([-0.5, -0.7, 3.0, 1.0]), atol=1e-6)
    assert any("no sform or qform" in w for w in volume.warnings)


def test_scaling_is_applied():
    raw = nifti_bytes(volume_data())
    volume = read_nifti(patched(raw, scl_slope=2.0, scl_inter=-5.0))
    np.testing.assert_array_equal(volume.voxels, volume_data().astype(np.float32) * 2 - 5)


def test_nan_and_inf_are_refused():
    data = volume_data(np.float32)
    data[0, 0, 0] = np.nan
    data[1, 2, 3] = np.inf
    data[2, 2, 2] = -np.inf
    with pytest.raises(InvalidInputError, match="NIfTI image has 3 NaN or infinite voxel values"):
        read_nifti(nifti_bytes(data))


def test_singleton_fourth_dimension_and_2d_images():
    four_d = read_nifti(nifti_bytes(volume_data()[..., np.newaxis]))
    assert four_d.shape == SHAPE
    two_d = read_nifti(nifti_bytes(volume_data()[:, :, 0]))
    assert two_d.shape == (SHAPE[0], SHAPE[1], 1)


def test_path_payload_modality_and_reader(tmp_path: Path):
    path = tmp_path / "image.nii.gz"  # the name is irrelevant: gzip is detected by its magic bytes
    path.write_bytes(gzip.compress(nifti_bytes(volume_data())))
    volume = NiftiReader(modality="MR").read(path)
    assert volume.modality == "MR"
    assert volume.shape == SHAPE
    with pytest.raises(InvalidInputError, match="modality 'computed tomography' is not a DICOM Modality"):
        read_nifti(path, modality="computed tomography")


# --- malformed headers --------------------------------------------------------------------------------------------


def _dims(*dims: int) -> list[int]:
    return [*dims, *([1] * (8 - len(dims)))]


@pytest.mark.parametrize("dim0", [0, 8, -1])
def test_bad_dim0(dim0):
    raw = patched(nifti_bytes(volume_data()), dim=_dims(dim0, *SHAPE))
    with pytest.raises(InvalidInputError, match=rf"NIfTI dim\[0\] is {dim0}; it must be 1..7"):
        read_nifti(raw)


@pytest.mark.parametrize("size", [0, -3])
def test_dimension_not_positive(size):
    raw = patched(nifti_bytes(volume_data()), dim=_dims(3, 6, size, 4))
    with pytest.raises(InvalidInputError, match=rf"NIfTI dim\[2\] is {size}; every used dimension must be >= 1"):
        read_nifti(raw)


def test_several_volumes_are_unsupported():
    data = np.zeros((*SHAPE, 3), dtype=np.int16)
    with pytest.raises(UnsupportedError, match=r"shape \(6, 5, 4, 3\); only 3-D images"):
        read_nifti(nifti_bytes(data))


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_data(gz):
    raw = nifti_bytes(volume_data())[:-10]
    with pytest.raises(InvalidInputError, match=r"NIfTI data is truncated: the header implies 120 voxels of int16"):
        read_nifti(gzip.compress(raw) if gz else raw)


def test_truncated_gzip_stream():
    with pytest.raises(InvalidInputError, match="gzip stream is corrupt or truncated"):
        read_nifti(gzip.compress(nifti_bytes(volume_data()))[:-30])


def test_header_claiming_2_to_the_31_voxels_is_refused_before_allocating():
    claim = _dims(3, 2048, 2048, 512)  # 2**31 int16 voxels (4 GiB); the file holds 240 bytes of data
    raw = patched(nifti_bytes(volume_data()), dim=claim)
    with pytest.raises(LimitExceededError, match=r"NIfTI image has 2147483648 voxels"):
        read_nifti(raw)
    with pytest.raises(LimitExceededError, match=r"NIfTI image has 2147483648 voxels"):
        read_nifti(gzip.compress(raw))
    # Even when the limits allow it, the missing data is found from the header, not by allocating 4 GiB.
    generous = InputLimits(max_voxels=2**32, max_dimension=4096, max_inflated_bytes=2**33)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInputError, match="NIfTI data is truncated"):
            read_nifti(gzip.compress(raw), limits=generous)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024**2


def test_not_nifti():
    with pytest.raises(InvalidInputError, match="not a NIfTI file"):
        read_nifti(b"P5\n640 480\n255\n" + bytes(400))
    with pytest.raises(InvalidInputError, match="not a NIfTI file"):
        read_nifti(b"")


def test_header_image_pair_is_unsupported():
    with pytest.raises(UnsupportedError, match="header/image pairs"):
        read_nifti(patched(nifti_bytes(volume_data()), magic=b"ni1"))


def test_bad_magic():
    with pytest.raises(InvalidInputError, match="NIfTI magic is b'xx1'"):
        read_nifti(patched(nifti_bytes(volume_data()), magic=b"xx1"))


def test_vox_offset_inside_the_header():
    with pytest.raises(InvalidInputError, match="vox_offset is 100"):
        read_nifti(patched(nifti_bytes(volume_data()), vox_offset=100))


def test_complex_data_is_unsupported():
    with pytest.raises(UnsupportedError, match="NIfTI datatype complex64 is not supported"):
        read_nifti(nifti_bytes(np.zeros(SHAPE, dtype=np.complex64)))


def test_unknown_datatype_code():
    with pytest.raises(UnsupportedError, match="NIfTI datatype code 999 is not supported"):
        read_nifti(patched(nifti_bytes(volume_data()), datatype=999))


def test_invalid_quaternion():
    raw = nifti_bytes(volume_data(), sform_code=0, qform_code=1)
    with pytest.raises(InvalidInputError, match="NIfTI orientation could not be computed"):
        read_nifti(patched(raw, quatern_b=0.9, quatern_c=0.9))


def test_singular_sform():
    with pytest.raises(InvalidInputError, match="NIfTI sform is not finite and invertible"):
        read_nifti(patched(nifti_bytes(volume_data()), srow_z=[0.0, 0.0, 0.0, 1.0]))


def test_request_byte_limit():
    with pytest.raises(LimitExceededError, match="the limit is 200 bytes"):
        read_nifti(nifti_bytes(volume_data()), limits=InputLimits(max_request_bytes=200, max_chunk_bytes=100))
