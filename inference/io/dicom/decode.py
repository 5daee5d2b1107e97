"""Pass 2: decoding the chosen series, one file at a time, into the preallocated volume.

Part of :mod:`inference.io.dicom`, whose docstring states the reading policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom import dcmread
from pydicom.uid import UncompressedTransferSyntaxes

from inference.errors import InvalidInputError, escape_text
from inference.io.dicom.headers import _open
from inference.io.dicom.jpeg2000 import _J2K_SYNTAXES, _check_j2k_frames
from inference.io.dicom.pixel_format import _check_native_length

if TYPE_CHECKING:
    from inference.io.dicom.geometry import _Frame
    from inference.io.dicom.headers import _Header
    from inference.io.dicom.pixel_format import _PixelFormat


def _decode(h: _Header, src: bytes | Path, fmt: _PixelFormat) -> np.ndarray:
    """The stored pixel values of one file as (frames, rows, columns)."""
    where = h.where
    with _open(src) as fp:
        try:
            ds = dcmread(fp, force=False)
        except Exception as exc:
            raise InvalidInputError(f"{where} could not be parsed as DICOM ({type(exc).__name__})") from exc
    if "PixelData" not in ds:
        raise InvalidInputError(f"{where} is truncated inside its pixel data")
    try:
        pixel_data = ds.PixelData
    except Exception as exc:  # converted on first access: an unknown VR on the element raises here
        raise InvalidInputError(f"{where}: PixelData could not be parsed ({type(exc).__name__})") from None
    if h.transfer_syntax in UncompressedTransferSyntaxes:
        _check_native_length(where, len(pixel_data), fmt)
    elif h.transfer_syntax in _J2K_SYNTAXES:
        _check_j2k_frames(where, pixel_data, fmt)
    try:
        stored = np.asarray(ds.pixel_array)
    except Exception as exc:
        detail = escape_text(" ".join(str(exc).split()), 300)
        raise InvalidInputError(f"{where}: pixel data could not be decoded ({detail})") from exc
    expected = (fmt.frames, fmt.rows, fmt.columns)
    if stored.shape != expected:
        if stored.shape == expected[1:] and fmt.frames == 1:
            return stored[np.newaxis]
        raise InvalidInputError(f"{where}: decoded pixel data has shape {stored.shape}, expected {expected}")
    return stored


def _decode_into(
    voxels: np.ndarray,
    files: list[bytes | Path],
    series: list[_Header],
    formats: list[_PixelFormat],
    frames: list[_Frame],
    order: list[int],
    decoded: Mapping[int, np.ndarray] | None = None,
) -> None:
    """Decode the series one file at a time into ``voxels[:, :, k]``, rescaled, in slice order; a single-frame
    file in ``decoded`` (its rescaled voxels, (columns, rows, 1)) is copied, not decoded again."""
    slot = {(frames[i].file_index, frames[i].frame_number): k for k, i in enumerate(order)}
    by_key = {(f.file_index, f.frame_number): f for f in frames}
    decoded = decoded or {}
    for h, fmt in zip(series, formats, strict=True):
        done = decoded.get(h.index)
        if (
            done is not None
            and fmt.frames == 1
            and not fmt.enhanced
            and done.shape == (voxels.shape[0], voxels.shape[1], 1)
        ):
            voxels[:, :, slot[(h.index, None)]] = done[:, :, 0]
            continue
        stored = _decode(h, files[h.index], fmt)
        low, high = fmt.stored_range
        for n in range(fmt.frames):
            key = (h.index, n + 1 if fmt.enhanced else None)
            frame = by_key[key]
            plane = stored[n].astype(np.float64)
            if fmt.monochrome1:
                plane = (low + high) - plane
            voxels[:, :, slot[key]] = (plane * frame.slope + frame.intercept).T
