"""The pixel format of an image (size, bits, sign, photometric interpretation) and the checks on it.

Part of :mod:`inference.io.dicom`, whose docstring states the reading policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydicom.pixels import get_decoder
from pydicom.uid import UncompressedTransferSyntaxes

from inference.errors import InvalidInputError, UnsupportedError, quote
from inference.io.dicom.elements import _int, _syntax_name
from inference.io.limits import MAX_ABS_VOXEL

if TYPE_CHECKING:
    from inference.io.dicom.geometry import _Frame
    from inference.io.dicom.headers import _Header


_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


@dataclass(frozen=True)
class _PixelFormat:
    rows: int
    columns: int
    frames: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    monochrome1: bool
    enhanced: bool  # frames described by per-frame functional groups

    @property
    def native_bytes(self) -> int:
        return self.rows * self.columns * self.frames * self.bits_allocated // 8

    @property
    def stored_range(self) -> tuple[int, int]:
        if self.signed:
            return -(1 << (self.bits_stored - 1)), (1 << (self.bits_stored - 1)) - 1
        return 0, (1 << self.bits_stored) - 1


def _pixel_format(h: _Header) -> _PixelFormat:
    ds, where = h.ds, h.where
    samples = _int(ds, "SamplesPerPixel", where, required=True)
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    if not photometric:
        raise InvalidInputError(f"{where}: PhotometricInterpretation missing")
    if samples != 1 or photometric not in _MONOCHROME:
        raise UnsupportedError(
            f"{where}: PhotometricInterpretation {quote(photometric)} with SamplesPerPixel {samples} is not supported; "
            "only monochrome images (MONOCHROME1, MONOCHROME2) are read"
        )
    rows = _int(ds, "Rows", where, required=True)
    columns = _int(ds, "Columns", where, required=True)
    frames = _int(ds, "NumberOfFrames", where, required=False)
    for name, value in (("Rows", rows), ("Columns", columns), ("NumberOfFrames", frames)):
        if value is not None and value < 1:
            raise InvalidInputError(f"{where}: {name} is {value}; it must be at least 1")
    allocated = _int(ds, "BitsAllocated", where, required=True)
    stored = _int(ds, "BitsStored", where, required=True)
    high_bit = _int(ds, "HighBit", where, required=False)
    representation = _int(ds, "PixelRepresentation", where, required=True)
    if allocated not in (8, 16, 32):
        if allocated == 1 or (allocated > 0 and allocated % 8 == 0):
            raise UnsupportedError(f"{where}: BitsAllocated {allocated} is not supported (8, 16 or 32)")
        raise InvalidInputError(f"{where}: BitsAllocated {allocated} is not valid (1 or a multiple of 8)")
    if stored < 1:
        raise InvalidInputError(f"{where}: BitsStored is {stored}; it must be at least 1")
    if stored > allocated:
        raise InvalidInputError(f"{where}: BitsStored ({stored}) exceeds BitsAllocated ({allocated})")
    if high_bit is not None and high_bit != stored - 1:
        raise InvalidInputError(f"{where}: HighBit ({high_bit}) must be BitsStored - 1 ({stored - 1})")
    if representation not in (0, 1):
        raise InvalidInputError(f"{where}: PixelRepresentation is {representation}; it must be 0 or 1")
    return _PixelFormat(
        rows=rows,
        columns=columns,
        frames=frames or 1,
        bits_allocated=allocated,
        bits_stored=stored,
        signed=representation == 1,
        monochrome1=photometric == "MONOCHROME1",
        enhanced="PerFrameFunctionalGroupsSequence" in ds,
    )


def _check_same_size(series: list[_Header], formats: list[_PixelFormat], label: str) -> None:
    ref, ref_fmt = series[0], formats[0]
    for h, fmt in zip(series[1:], formats[1:], strict=True):
        if (fmt.rows, fmt.columns) != (ref_fmt.rows, ref_fmt.columns):
            raise InvalidInputError(
                f"Rows x Columns differ ({ref_fmt.rows}x{ref_fmt.columns} vs {fmt.rows}x{fmt.columns}) "
                f"between {ref.where} and {h.where} in {label}"
            )
    seen: dict[str, int] = {}
    for h in series:
        uid = h.sop_instance_uid
        if uid in seen:
            raise InvalidInputError(f"file {seen[uid]} and {h.where} are the same instance (same SOPInstanceUID)")
        seen[uid] = h.index


def _check_pixel_data(h: _Header, fmt: _PixelFormat) -> None:
    """Before decoding anything: a codec exists for the syntax, and native pixel data has the right length."""
    where, syntax = h.where, h.transfer_syntax
    if syntax in UncompressedTransferSyntaxes:
        if h.pixel_length is not None:
            _check_native_length(where, h.pixel_length, fmt)
        return
    if h.pixel_length is not None:
        raise InvalidInputError(
            f"{where}: PixelData of compressed transfer syntax {_syntax_name(syntax)} is not encapsulated"
        )
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise UnsupportedError(
            f"{where}: transfer syntax {_syntax_name(syntax)} ({quote(syntax)}) is not supported: no decoder exists "
            "for it"
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "none known"
        raise UnsupportedError(
            f"{where}: transfer syntax {_syntax_name(syntax)} ({quote(syntax)}) cannot be decoded: no codec is "
            f"installed (plugins that would decode it: {missing})"
        )


def _check_rescaled_range(series: list[_Header], formats: list[_PixelFormat], frames: list[_Frame]) -> None:
    """Stored values x RescaleSlope + RescaleIntercept stay within +-MAX_ABS_VOXEL (decided from the stored range,
    before decoding: no pass over the pixels)."""
    fmt_of = {h.index: fmt for h, fmt in zip(series, formats, strict=True)}
    for f in frames:
        low, high = fmt_of[f.file_index].stored_range
        reach = max(abs(low * f.slope + f.intercept), abs(high * f.slope + f.intercept))
        if reach > MAX_ABS_VOXEL:
            raise InvalidInputError(
                f"{f.where}: RescaleSlope {f.slope:g} and RescaleIntercept {f.intercept:g} map the stored values to "
                f"up to {reach:.4g}, outside the plausible +-{MAX_ABS_VOXEL:g}"
            )


def _check_native_length(where: str, length: int, fmt: _PixelFormat) -> None:
    """Native pixel data has the bytes Rows x Columns x frames x BitsAllocated/8 imply, plus the pad byte of an odd
    length; padding beyond that (pydicom's MR_small_padded.dcm), less than one more frame, is ignored as pydicom
    does. More is a length mismatch: a wrong NumberOfFrames, Rows or Columns, not padding."""
    expected = fmt.native_bytes
    if not expected <= length < expected + max(expected // fmt.frames, 2):
        raise InvalidInputError(
            f"{where}: PixelData length mismatch: {length} bytes, expected {expected} "
            f"(Rows {fmt.rows} x Columns {fmt.columns} x {fmt.frames} frames x {fmt.bits_allocated} bits)"
        )
