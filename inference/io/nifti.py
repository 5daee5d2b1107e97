"""NIfTI-1 / NIfTI-2 (``.nii``, ``.nii.gz``) -> :class:`Volume`.

Policy:

* Single-file NIfTI only (magic ``n+1`` / ``n+2``); a header/image pair (``ni1``) is UnsupportedError.
* gzip is detected by its magic bytes, not by a file name, and inflated with a bound: the header is read and
  checked first, then at most the bytes it implies; the rest of the stream (at most MAX_EXTENSION_BYTES) is read
  and discarded so that gzip's CRC-32 is checked: a damaged stream is InvalidInputError, never wrong voxels.
* Every check runs on the header before voxel data is read or allocated: dim[0] in 1..7, every used dim >= 1,
  dims beyond the third all 1 (a 4-D image with one volume is read as 3-D), voxel count and per-axis size within
  :class:`InputLimits`, and enough bytes after vox_offset for all voxels (fewer is a truncated file).
* Orientation: the sform when sform_code > 0, else the qform when qform_code > 0, converted from NIfTI's RAS to
  LPS (``diag(-1, -1, 1, 1) @ affine``). With both codes 0 the axes are taken as RAS-aligned with pixdim spacing
  (NIfTI "method 1") and the volume carries a warning.
* Voxels are float32 after scl_slope / scl_inter (when the slope is valid, as NIfTI defines; both within the
  plausible rescale range of :mod:`inference.io.limits`).
* The geometry (spacing, origin, axes, field of view) is checked against the plausible ranges and limits of
  :mod:`inference.io.limits` before any voxel is read, and the gzip stream inflates within the read's
  ``max_inflated_bytes``.
* NaN, infinite and implausibly large voxel values are refused (InvalidInputError): replacing them with 0, as
  this reader once did, hands the model an image it was never trained on and hides a broken export.
* The modality cannot be known from a NIfTI file; the request states it (default CT).
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from inference.errors import InvalidInputError, LimitExceededError, UnsupportedError, escape_text
from inference.io.base import VolumeReader, check_modality, payload_size
from inference.io.limits import (
    DEFAULT_LIMITS,
    InflateBudget,
    InputLimits,
    check_geometry,
    check_rescale,
    check_voxel_values,
)
from inference.io.volume import LPS_TO_RAS, Volume

_log = logging.getLogger(__name__)

_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI1_HEADER_BYTES = 348
_NIFTI2_HEADER_BYTES = 540
HEADER_READ_BYTES = _NIFTI2_HEADER_BYTES + 4  # NIfTI-2 header plus the extension flag
# Header extensions sit between the header and vox_offset; more than this is not a plausible image file.
MAX_EXTENSION_BYTES = 64 * 1024**2
_INFLATE_CHUNK_BYTES = 1024**2


def read_nifti(data: bytes | Path, *, modality: str = "CT", limits: InputLimits = DEFAULT_LIMITS) -> Volume:
    """Read a ``.nii`` or ``.nii.gz`` payload (bytes or a path) into a :class:`Volume` in LPS."""
    modality = check_modality(modality)
    limits.check_request_bytes(payload_size(data))
    raw = data.read_bytes() if isinstance(data, Path) else data
    if bytes(raw[:2]) == _GZIP_MAGIC:
        budget = InflateBudget(limits)
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as stream:
            head = _read_up_to(stream, HEADER_READ_BYTES)
            header, layout, affine, orientation_warning = nifti_header(head, limits)
            budget.spend(layout.end, "the NIfTI gzip stream's header and voxels")
            buffer = head
            buffer += _read_up_to(stream, layout.end - len(head))
            if len(buffer) >= layout.end:
                budget.spend(_check_gzip_end(stream, budget.left), "the NIfTI gzip stream")
    else:
        buffer = raw
        header, layout, affine, orientation_warning = nifti_header(bytes(raw[:HEADER_READ_BYTES]), limits)
    if len(buffer) < layout.end:
        raise InvalidInputError(
            f"NIfTI data is truncated: the header implies {layout.n_voxels} voxels of {layout.dtype.name} "
            f"({layout.end - layout.offset} bytes) after offset {layout.offset}, but only "
            f"{max(len(buffer) - layout.offset, 0)} bytes follow"
        )

    slope, inter = nifti_scaling(header)
    stored = np.frombuffer(buffer, dtype=layout.dtype, count=layout.n_voxels, offset=layout.offset)
    voxels = scaled_float32(stored.reshape(layout.shape, order="F"), slope, inter)
    warnings = [orientation_warning] if orientation_warning else []
    if layout.dtype.kind == "f" or slope is not None:  # integers without scaling are bounded by their type
        check_voxel_values(voxels, "NIfTI image")
    _log.debug("NIfTI-%d: shape %s, %s", layout.version, layout.shape, layout.dtype.name)
    return Volume(voxels=voxels, affine=affine, modality=modality, warnings=tuple(warnings))


def nifti_header(head: bytes, limits: InputLimits) -> tuple[nib.Nifti1Header, NiftiLayout, np.ndarray, str | None]:
    """The first bytes of a (inflated) NIfTI file, checked: its header, voxel layout, LPS affine and orientation
    warning (every check of the module docstring that needs no voxel). ``head`` holds HEADER_READ_BYTES bytes, or
    all the file has."""
    header = _parse_header(head)
    layout = _check_layout(header, limits)
    affine, orientation_warning = _affine_lps(header, layout, limits)
    return header, layout, affine, orientation_warning


def nifti_scaling(header: nib.Nifti1Header) -> tuple[float | None, float | None]:
    """``(scl_slope, scl_inter)``, checked; ``(None, None)`` when NIfTI says "no scaling" (slope 0 or NaN)."""
    try:
        slope, inter = header.get_slope_inter()
    except Exception as exc:  # nibabel: a valid slope with an invalid intercept
        raise InvalidInputError(f"NIfTI scl_slope / scl_inter are invalid ({escape_text(exc, 120)})") from exc
    if slope is not None:
        check_rescale(float(slope), float(inter or 0.0), "NIfTI scl_slope/scl_inter:")
    return slope, inter


def scaled_float32(stored: np.ndarray, slope: float | None, inter: float | None) -> np.ndarray:
    """Stored voxels as float32 after the scaling (element by element: a slab converts as the whole image does)."""
    voxels = stored.astype(np.float32)
    if slope is not None and (slope, inter) != (1.0, 0.0):
        voxels *= np.float32(slope)
        voxels += np.float32(inter or 0.0)
    return voxels


@dataclass(frozen=True)
class NiftiReader(VolumeReader[bytes | Path]):
    """:func:`read_nifti` as a :class:`VolumeReader`."""

    modality: str = "CT"
    limits: InputLimits = DEFAULT_LIMITS

    def read(self, payload: bytes | Path) -> Volume:
        return read_nifti(payload, modality=self.modality, limits=self.limits)


@dataclass(frozen=True)
class NiftiLayout:
    version: int
    shape: tuple[int, int, int]
    n_voxels: int
    dtype: np.dtype
    offset: int  # vox_offset

    @property
    def end(self) -> int:
        return self.offset + self.n_voxels * self.dtype.itemsize


def _read_up_to(stream: gzip.GzipFile, n_bytes: int) -> bytearray:
    """Up to ``n_bytes`` from a gzip stream, in chunks, so memory follows the data actually present."""
    out = bytearray()
    try:
        while len(out) < n_bytes:
            chunk = stream.read(min(_INFLATE_CHUNK_BYTES, n_bytes - len(out)))
            if not chunk:
                break
            out += chunk
    except (OSError, EOFError, zlib.error) as exc:
        raise InvalidInputError(f"NIfTI gzip stream is corrupt or truncated ({escape_text(exc, 120)})") from exc
    return out


def _check_gzip_end(stream: gzip.GzipFile, budget_left: int) -> int:
    """Read on to the end of the gzip stream, so that its CRC-32 and length are checked.

    Stopping after the bytes the header implies would skip that check, and a damaged deflate stream usually
    inflates without an error into wrong voxels (32 of 40 single-bit flips in a test .nii.gz did). A NIfTI file
    has nothing after its voxels; more than MAX_EXTENSION_BYTES there is refused, not inflated, and so is more than
    ``budget_left`` (the read's inflate budget). Returns the bytes inflated after the voxels.
    """
    trailing = 0
    limit = min(MAX_EXTENSION_BYTES, budget_left)
    try:
        while trailing <= limit and (chunk := stream.read(_INFLATE_CHUNK_BYTES)):
            trailing += len(chunk)  # counted, not kept
    except (OSError, EOFError, zlib.error) as exc:
        raise InvalidInputError(f"NIfTI gzip stream is corrupt or truncated ({escape_text(exc, 120)})") from exc
    if trailing > budget_left:
        return trailing  # the caller's budget refuses it
    if trailing > MAX_EXTENSION_BYTES:
        raise InvalidInputError(
            f"NIfTI gzip stream continues for more than {MAX_EXTENSION_BYTES} bytes after the voxels its header implies"
        )
    return trailing


def _parse_header(head: bytes) -> nib.Nifti1Header:
    if len(head) < 4:
        raise InvalidInputError(f"not a NIfTI file: {len(head)} bytes, shorter than any NIfTI header")
    # The byte order comes from sizeof_hdr, not from dim[0] as nibabel guesses it: dim[0] is what we check.
    for endianness in ("<", ">"):
        sizeof_hdr = struct.unpack(f"{endianness}i", head[:4])[0]
        if sizeof_hdr in (_NIFTI1_HEADER_BYTES, _NIFTI2_HEADER_BYTES):
            break
    else:
        raise InvalidInputError("not a NIfTI file: sizeof_hdr is neither 348 (NIfTI-1) nor 540 (NIfTI-2)")
    if sizeof_hdr == _NIFTI1_HEADER_BYTES:
        klass, size, magic = nib.Nifti1Header, _NIFTI1_HEADER_BYTES, b"n+1"
    else:
        klass, size, magic = nib.Nifti2Header, _NIFTI2_HEADER_BYTES, b"n+2"
    if len(head) < size:
        raise InvalidInputError(f"NIfTI file is truncated: {len(head)} bytes, shorter than its {size}-byte header")
    try:
        header = klass.from_fileobj(io.BytesIO(head[:size]), endianness=endianness, check=False)
    except Exception as exc:
        raise InvalidInputError(f"NIfTI header could not be parsed ({type(exc).__name__})") from exc
    found = bytes(header["magic"]).rstrip(b"\0")
    if found != magic:
        if found in (b"ni1", b"ni2"):
            raise UnsupportedError("NIfTI header/image pairs (.hdr + .img) are not supported; send a single .nii")
        raise InvalidInputError(f"NIfTI magic is {found!r}, expected {magic!r} (Analyze 7.5 is not supported)")
    return header


def _check_layout(header: nib.Nifti1Header, limits: InputLimits) -> NiftiLayout:
    version = 2 if isinstance(header, nib.Nifti2Header) else 1
    dim = [int(d) for d in header["dim"]]
    if not 1 <= dim[0] <= 7:
        raise InvalidInputError(f"NIfTI dim[0] is {dim[0]}; it must be 1..7")
    used = dim[1 : dim[0] + 1]
    for axis, size in enumerate(used, start=1):
        if size < 1:
            raise InvalidInputError(f"NIfTI dim[{axis}] is {size}; every used dimension must be >= 1")
    if any(size != 1 for size in used[3:]):
        raise UnsupportedError(
            f"NIfTI image has shape {tuple(used)}; only 3-D images (or 4-D with a single volume) are read"
        )
    shape = tuple([*used, 1, 1, 1][:3])
    limits.check_shape(shape, what="NIfTI image")
    try:
        dtype = np.dtype(header.get_data_dtype())
    except Exception:
        raise UnsupportedError(f"NIfTI datatype code {int(header['datatype'])} is not supported") from None
    if dtype.kind not in "uif" or dtype.fields is not None or dtype.itemsize > 8:
        raise UnsupportedError(f"NIfTI datatype {header.get_value_label('datatype')} is not supported")
    header_bytes = _NIFTI2_HEADER_BYTES if version == 2 else _NIFTI1_HEADER_BYTES
    vox_offset = float(header["vox_offset"])
    if not math.isfinite(vox_offset) or not vox_offset.is_integer() or vox_offset < header_bytes + 4:
        raise InvalidInputError(
            f"NIfTI vox_offset is {vox_offset:g}; a single-file NIfTI-{version} needs an integer >= {header_bytes + 4}"
        )
    if vox_offset > header_bytes + 4 + MAX_EXTENSION_BYTES:
        raise LimitExceededError(
            f"NIfTI vox_offset is {vox_offset:.0f}; header extensions above {MAX_EXTENSION_BYTES} bytes are refused"
        )
    return NiftiLayout(
        version=version,
        shape=shape,  # type: ignore[arg-type]
        n_voxels=math.prod(shape),
        dtype=dtype,
        offset=int(vox_offset),
    )


def _affine_lps(header: nib.Nifti1Header, layout: NiftiLayout, limits: InputLimits) -> tuple[np.ndarray, str | None]:
    warning = None
    try:
        if int(header["sform_code"]) > 0:
            source, affine = "sform", header.get_sform()
        elif int(header["qform_code"]) > 0:
            source, affine = "qform", header.get_qform()
        else:
            source = "pixdim"
            zooms = [float(z) for z in header["pixdim"][1:4]]
            if not all(math.isfinite(z) and z > 0 for z in zooms):
                raise InvalidInputError(
                    f"NIfTI pixdim[1:4] {[float(f'{z:.4g}') for z in zooms]} must be positive when no sform or qform "
                    "is set"
                )
            affine = np.diag([*zooms, 1.0])
            warning = "NIfTI has no sform or qform (both codes 0): axes assumed RAS-aligned with pixdim spacing"
    except InvalidInputError:
        raise
    except Exception as exc:  # e.g. a qform quaternion with b^2 + c^2 + d^2 > 1
        raise InvalidInputError(f"NIfTI orientation could not be computed ({escape_text(exc, 120)})") from exc
    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InvalidInputError(f"NIfTI {source} is not finite and invertible")
    affine = LPS_TO_RAS @ affine  # the flip is its own inverse: RAS -> LPS
    check_geometry(affine, layout.shape, f"NIfTI {source}", limits)
    return affine, warning
