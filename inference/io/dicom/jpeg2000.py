"""JPEG 2000 framing checks: openjpeg decodes a damaged codestream into wrong pixels without an error.

Part of :mod:`inference.io.dicom`, whose docstring states the reading policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from pydicom.encaps import generate_frames
from pydicom.uid import JPEG2000, JPEG2000MC, JPEG2000Lossless, JPEG2000MCLossless

from inference.errors import InvalidInputError

if TYPE_CHECKING:
    from inference.io.dicom.pixel_format import _PixelFormat


# JPEG 2000 Part 1 / Part 2 codestreams: their framing is checked before decoding (see _check_j2k_frame).
_J2K_SYNTAXES = (JPEG2000Lossless, JPEG2000, JPEG2000MCLossless, JPEG2000MC)


def _check_j2k_frames(where: str, pixel_data: bytes, fmt: _PixelFormat) -> None:
    """Check the framing of every JPEG 2000 codestream before decoding: openjpeg decodes damaged codestreams
    without an error, returning wrong pixels (a run of bytes overwritten in the coded data changed 600 pixels of
    a 64x64 test image, silently)."""
    try:
        frames = list(generate_frames(pixel_data, number_of_frames=fmt.frames))
    except Exception as exc:  # malformed item tags or lengths in the encapsulation
        raise InvalidInputError(
            f"{where}: encapsulated pixel data could not be split into {fmt.frames} frame(s) ({type(exc).__name__})"
        ) from None
    if len(frames) != fmt.frames:
        raise InvalidInputError(f"{where}: encapsulated pixel data holds {len(frames)} frames, expected {fmt.frames}")
    for number, frame in enumerate(frames, start=1):
        problem = _j2k_framing_problem(frame, fmt)
        if problem is not None:
            frame_where = where if fmt.frames == 1 else f"{where} frame {number}"
            raise InvalidInputError(
                f"{frame_where}: pixel data could not be decoded (corrupt JPEG 2000 codestream: {problem})"
            )


_J2K_SOC, _J2K_SIZ, _J2K_COD, _J2K_SOT, _J2K_SOP, _J2K_EPH, _J2K_SOD, _J2K_EOC = (
    0xFF4F, 0xFF51, 0xFF52, 0xFF90, 0xFF91, 0xFF92, 0xFF93, 0xFFD9,
)  # fmt: skip


def _j2k_framing_problem(frame: bytes, fmt: _PixelFormat) -> str | None:
    """What is wrong with the framing of one JPEG 2000 codestream (ISO 15444-1 Annex A), or None.

    Checked: SOC then SIZ, whose image size matches Rows x Columns; every marker segment fits; each tile-part's
    length (Psot) ends exactly at the next SOT or at the final EOC; and inside the coded data of each tile-part no
    marker code (0xFF followed by a byte above 0x8F) occurs other than SOP/EPH where COD enables them: the
    standard's bit stuffing makes that impossible in intact data, and it is what overwritten or spliced bytes
    usually leave. A codestream wrapped in a JP2 file (not allowed in DICOM, but seen) is left to the decoder.
    Bit errors inside the coded data are not detectable: JPEG 2000 carries no checksum.
    """
    data = memoryview(frame)
    if bytes(data[:2]) != b"\xff\x4f":
        return None if bytes(data[4:8]) == b"jP  " else "it does not start with an SOC marker"
    end = len(data)
    while end > 0 and data[end - 1] == 0:  # even-length padding of the fragment
        end -= 1
    if end >= 3 and data[end - 1] == 0xFF and int.from_bytes(data[end - 3 : end - 1], "big") == _J2K_EOC:
        end -= 1  # padded with 0xFF instead (pydicom's examples_jpeg2k.dcm)
    if end < 4 or int.from_bytes(data[end - 2 : end], "big") != _J2K_EOC:
        return "it does not end with an EOC marker (truncated?)"
    eoc = end - 2

    def u16(pos: int) -> int:
        return int.from_bytes(data[pos : pos + 2], "big")

    def u32(pos: int) -> int:
        return int.from_bytes(data[pos : pos + 4], "big")

    if eoc < 42 or u16(2) != _J2K_SIZ:
        return "SIZ does not follow SOC"
    width, height = u32(8) - u32(16), u32(12) - u32(20)
    if (width, height) != (fmt.columns, fmt.rows):
        return f"its image is {width}x{height} (columns x rows), the header says {fmt.columns}x{fmt.rows}"
    sop_allowed = eph_allowed = False

    def skip_segments(pos: int, limit: int, stop: int, where: str) -> int | str:
        """Walk marker segments from ``pos`` up to marker ``stop``; its position, or what is wrong."""
        nonlocal sop_allowed, eph_allowed
        while True:
            if pos + 2 > limit:
                return f"{where} runs past its end without a {'SOT' if stop == _J2K_SOT else 'SOD'} marker"
            marker = u16(pos)
            if marker == stop:
                return pos
            if marker >> 8 != 0xFF or marker in (_J2K_SOC, _J2K_SOT, _J2K_SOD, _J2K_EOC, _J2K_SOP, _J2K_EPH):
                return f"unexpected bytes 0x{marker:04X} at byte {pos} of the {where}"
            length = u16(pos + 2)
            if length < 2 or pos + 2 + length > limit:
                return f"marker 0x{marker:04X} at byte {pos} declares {length} bytes, past the end of the {where}"
            if marker == _J2K_COD and length >= 3:
                sop_allowed |= bool(data[pos + 4] & 0x02)
                eph_allowed |= bool(data[pos + 4] & 0x04)
            pos += 2 + length

    pos = skip_segments(2, eoc, _J2K_SOT, "main header")
    if isinstance(pos, str):
        return pos
    tile_part = 0
    while pos < eoc:
        if u16(pos) != _J2K_SOT or pos + 12 > eoc or u16(pos + 2) != 10:
            return f"tile-part {tile_part} does not start with a valid SOT marker (byte {pos})"
        psot = u32(pos + 6)
        tile_end = eoc if psot == 0 else pos + psot
        if tile_end > eoc or tile_end < pos + 14:
            return f"tile-part {tile_part} declares {psot} bytes (Psot) but {eoc - pos} remain before EOC"
        sod = skip_segments(pos + 12, tile_end, _J2K_SOD, f"tile-part {tile_part} header")
        if isinstance(sod, str):
            return sod
        body = np.frombuffer(data, dtype=np.uint8, count=tile_end - sod - 2, offset=sod + 2)
        hits = np.flatnonzero((body[:-1] == 0xFF) & (body[1:] > 0x8F))
        for hit in hits:
            marker = 0xFF00 | int(body[hit + 1])
            if (marker == _J2K_SOP and sop_allowed) or (marker == _J2K_EPH and eph_allowed):
                continue
            return (
                f"marker code 0x{marker:04X} inside the coded data of tile-part {tile_part} (byte {sod + 2 + hit}), "
                "where intact data cannot hold one"
            )
        pos = tile_end
        tile_part += 1
    return None
