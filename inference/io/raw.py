"""Raw voxel arrays -> :class:`Volume`, for clients that send numbers rather than files.

Policy:

* ``data`` holds the (X, Y, Z) array in C order (``numpy.ndarray.tobytes()`` of an array indexed
  ``[i, j, k]``), little-endian, of one of :data:`RAW_DTYPES`.
* Geometry is either a full 4x4 ``affine`` (16 numbers, row-major, voxel index -> LPS mm, last row 0 0 0 1) or
  ``spacing_mm`` (identity directions, origin 0); exactly one of the two.
* Shape, limits and the geometry (plausible spacing, origin and axes, the field of view; :mod:`inference.io.limits`)
  are checked before the byte count, and all before anything is allocated.
* NaN, infinite and implausibly large values in a float array are refused (InvalidInputError), as for NIfTI.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from inference.errors import InvalidInputError, quote
from inference.io.base import VolumeReader, check_modality, payload_size
from inference.io.limits import DEFAULT_LIMITS, InputLimits, check_geometry, check_voxel_values
from inference.io.volume import Volume

_log = logging.getLogger(__name__)

RAW_DTYPES = ("uint8", "int16", "uint16", "int32", "float32", "float64")


def read_raw(
    data: bytes,
    *,
    dtype: str,
    shape: Sequence[int],
    affine: Sequence[float] | None = None,
    spacing_mm: Sequence[float] | None = None,
    modality: str,
    limits: InputLimits = DEFAULT_LIMITS,
) -> Volume:
    """Wrap raw voxel bytes and the geometry the request states into a :class:`Volume`."""
    modality = check_modality(modality)
    limits.check_request_bytes(payload_size(data))
    np_dtype, dims, matrix = raw_layout(dtype, shape, affine, spacing_mm, limits)
    expected = math.prod(dims) * np_dtype.itemsize
    if len(data) != expected:
        raise InvalidInputError(
            f"raw data has {len(data)} bytes; shape {dims} of {dtype} needs {expected} "
            f"({math.prod(dims)} voxels x {np_dtype.itemsize} bytes)"
        )

    voxels = np.frombuffer(data, dtype=np_dtype).reshape(dims).astype(np.float32)
    if np_dtype.kind == "f":  # integers are finite and bounded by their type: skip that pass
        check_voxel_values(voxels, "raw volume")  # after the cast: float64 beyond float32's range is infinite
    _log.debug("raw %s volume: shape %s", dtype, dims)
    return Volume(voxels=voxels, affine=matrix, modality=modality)


def raw_layout(
    dtype: str,
    shape: Sequence[int],
    affine: Sequence[float] | None,
    spacing_mm: Sequence[float] | None,
    limits: InputLimits,
) -> tuple[np.dtype, tuple[int, int, int], np.ndarray]:
    """The array's description, checked before any byte is looked at: its little-endian dtype, (X, Y, Z) shape
    and voxel index -> LPS mm affine."""
    if dtype not in RAW_DTYPES:
        raise InvalidInputError(f"raw dtype {quote(dtype, 32)} is not supported; use one of {', '.join(RAW_DTYPES)}")
    np_dtype = np.dtype(dtype).newbyteorder("<")
    dims = _shape(shape)
    limits.check_shape(dims, what="raw volume")
    matrix = _affine(affine, spacing_mm)
    check_geometry(matrix, dims, "raw geometry", limits)
    return np_dtype, dims, matrix


@dataclass(frozen=True)
class RawReader(VolumeReader[bytes]):
    """:func:`read_raw` as a :class:`VolumeReader`: the request's description of the array, then its bytes."""

    dtype: str
    shape: tuple[int, int, int]
    modality: str
    affine: tuple[float, ...] | None = None
    spacing_mm: tuple[float, float, float] | None = None
    limits: InputLimits = DEFAULT_LIMITS

    def read(self, payload: bytes) -> Volume:
        return read_raw(
            payload,
            dtype=self.dtype,
            shape=self.shape,
            affine=self.affine,
            spacing_mm=self.spacing_mm,
            modality=self.modality,
            limits=self.limits,
        )


def _shape(shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        dims = tuple(shape)
        valid = len(dims) == 3 and all(not isinstance(s, bool) and float(s).is_integer() and int(s) >= 1 for s in dims)
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise InvalidInputError(f"raw shape {quote(shape, 64)} must be three positive integers (X, Y, Z)")
    return tuple(int(s) for s in dims)  # type: ignore[return-value]


def _affine(affine: Sequence[float] | None, spacing_mm: Sequence[float] | None) -> np.ndarray:
    if (affine is None) == (spacing_mm is None):
        raise InvalidInputError("raw geometry needs exactly one of affine (16 numbers) or spacing_mm (3 numbers)")
    if spacing_mm is not None:
        try:
            spacing = [float(s) for s in spacing_mm]
        except (TypeError, ValueError):
            spacing = []
        if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise InvalidInputError(
                f"raw spacing_mm {quote(list(spacing_mm), 64)} must be three positive finite numbers"
            )
        return np.diag([*spacing, 1.0])
    try:
        matrix = np.asarray([float(v) for v in affine], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise InvalidInputError("raw affine must be 16 numbers") from None
    if matrix.size != 16:
        raise InvalidInputError(f"raw affine has {matrix.size} numbers; it must have 16 (4x4, row-major)")
    matrix = matrix.reshape(4, 4)
    if not np.all(np.isfinite(matrix)):
        raise InvalidInputError("raw affine has NaN or infinite entries")
    if not np.allclose(matrix[3], [0.0, 0.0, 0.0, 1.0]):
        raise InvalidInputError(f"raw affine's last row is {matrix[3].tolist()}; it must be [0, 0, 0, 1]")
    if abs(np.linalg.det(matrix[:3, :3])) < 1e-9:
        raise InvalidInputError("raw affine is singular (its 3x3 part is not invertible)")
    return matrix
