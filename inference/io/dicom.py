"""DICOM series -> :class:`Volume`, or an error that names what is wrong and where.

Policy (what a caller, or a successor changing this file, may rely on):

* Files are named by their 0-based position in the upload ("file 3"). Messages never carry patient data or UIDs;
  series are named by SeriesNumber and :func:`hash_uid`.
* Files must be DICOM Part 10: 128-byte preamble, ``DICM``, file meta information with a TransferSyntaxUID.
* Two passes. Every header is parsed first, stopping before the pixel data, and every check and limit runs
  before any pixel is decoded. Then only the chosen series is decoded, one file at a time, into a preallocated
  volume. Deflated data sets are inflated once, with a bound, to check their size before pydicom reads them.
* Non-image objects are skipped: no Pixel Data, float pixel data, or a non-image SOP class (SR, KO, PR, RT
  structure set / plan / dose, SEG, registration, waveform, encapsulated document). An instance that has Rows
  and Columns but no Pixel Data is an error, not a skip: it is usually a truncated file.
* One series per read, grouped by SeriesInstanceUID; several need ``series_instance_uid``: the UID, or the 12-digit
  :func:`hash_uid` that messages name the series by (messages never carry the UID itself).
* Slices are sorted by ImagePositionPatient projected on the slice normal (ImageOrientationPatient row direction
  x column direction), ascending, never by file order or InstanceNumber. The affine's third column is the mean
  step between consecutive sorted slices, so it points along +normal and the affine is right-handed.
* Tolerances: ImageOrientationPatient components agree within 1e-3 across a series (each direction unit length
  and the two orthogonal within 1e-2); PixelSpacing agrees within 0.1%; each step along the normal agrees with
  the median step within 1% or 0.01 mm, whichever is larger; positions closer than 0.01 mm are duplicates; a
  gap of n usual steps (within n tolerances) is reported as n - 1 missing slices.
* Gantry tilt and sheared stacks are rejected (UnsupportedError), not resampled: a stack whose axis leaves the
  slice normal by more than 0.1 degree (and more than 0.02 mm over the whole stack) is refused. Within that
  tolerance the measured step, shear included, is kept exactly in the affine.
* One image: slice step SliceThickness, 1 mm when absent. Without ImagePositionPatient (projection X-ray) the
  origin is 0, and without ImageOrientationPatient the directions are identity: coordinates are then mm on the
  image plane, not patient positions. PixelSpacing is preferred; ImagerPixelSpacing (detector plane, not
  corrected for magnification) is used for projection images with a warning.
* Voxels are stored values x RescaleSlope + RescaleIntercept as float32 (per frame for enhanced multi-frame).
  MONOCHROME1 is inverted over the stored-value range (2**BitsStored values) so that larger means brighter, as
  in MONOCHROME2. Only monochrome images are read; colour is UnsupportedError. PresentationLUTShape is not
  applied on top: the DX IOD pairs INVERSE with MONOCHROME1 and IDENTITY with MONOCHROME2, so it restates the
  photometric interpretation (archives such as dcm4chee trust the latter too, as some DX objects get the shape
  wrong). VOI LUTs and window settings are for display and are not applied: models take the values after the
  modality rescale and set their own window (the X-ray model a per-image percentile window).
* Native pixel data must have exactly Rows x Columns x frames x BitsAllocated/8 bytes (plus the one pad byte
  DICOM requires for odd lengths); anything else is a length mismatch (InvalidInputError).
* A transfer syntax with no decoder here is UnsupportedError naming the syntax; a decode failure is
  InvalidInputError. Zeros are never returned in place of pixels.
* JPEG 2000 codestreams have their framing checked before decoding (SOC/SIZ, image size, marker segment and
  tile-part lengths, EOC, no marker codes inside the coded data), because openjpeg decodes a damaged codestream
  into wrong pixels without an error. Bit errors inside the coded data stay undetectable (no checksum).
* pydicom's own value validation is off (``reading_validation_mode = IGNORE``) for the whole process: its
  warnings quote the offending value, which may be a patient's name, date or UID, and they reach the log.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_partial, read_preamble
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.uid import (
    JPEG2000,
    JPEG2000MC,
    UID,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    RTImageStorage,
    UncompressedTransferSyntaxes,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

from inference.errors import InvalidInputError, UnsupportedError, escape_text, quote
from inference.io.base import VolumeReader, payload_size
from inference.io.limits import (
    DEFAULT_LIMITS,
    MAX_ABS_VOXEL,
    MAX_COORDINATE_MM,
    SPACING_RANGE_MM,
    InflateBudget,
    InputLimits,
    check_geometry,
    check_rescale,
)
from inference.io.volume import SourceImage, SourceRefs, Volume

_log = logging.getLogger(__name__)

ORIENTATION_ATOL = 1e-3  # per IOP component, between images of one series
UNIT_VECTOR_ATOL = 1e-2  # IOP directions: | |v| - 1 | and |row . col|
PIXEL_SPACING_RTOL = 1e-3
STEP_RTOL = 0.01  # slice steps agree with the median step within 1% ...
STEP_ATOL_MM = 0.01  # ... or 0.01 mm, whichever is larger
DUPLICATE_ATOL_MM = 0.01
TILT_MAX_DEG = 0.1  # stack axis vs slice normal ...
LATERAL_ATOL_MM = 0.02  # ... or this much in-plane drift over the whole stack, whichever is larger
DEFAULT_STEP_MM = 1.0

_UNDEFINED_LENGTH = 0xFFFFFFFF
_PREAMBLE_BYTES = 128 + 4  # preamble and "DICM"
_GROUP_LENGTH_ELEMENT_BYTES = 12  # (0002,0000) UL, explicit VR little endian
_PIXEL_DATA = 0x7FE00010
_PIXEL_TAGS = {_PIXEL_DATA: "PixelData", 0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_LOSSY_SYNTAXES = (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless)
# JPEG 2000 Part 1 / Part 2 codestreams: their framing is checked before decoding (see _check_j2k_frame).
_J2K_SYNTAXES = (JPEG2000Lossless, JPEG2000, JPEG2000MCLossless, JPEG2000MC)
# pydicom's value validation warns *and logs* with the offending value quoted ("Invalid value for VR UI: '1.2...'"),
# so a malformed UID, name or date in an upload would reach the server log. This reader checks every value it uses
# itself, with messages that carry no patient data; pydicom's own checks are switched off for the process.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
# Transfer syntaxes newer than the installed pydicom's UID dictionary.
_SYNTAX_NAMES = {
    "1.2.840.10008.1.2.4.110": "JPEG XL Lossless",
    "1.2.840.10008.1.2.4.111": "JPEG XL JPEG Recompression",
    "1.2.840.10008.1.2.4.112": "JPEG XL",
}
# SOP class UID roots (the root itself or anything below it) of objects that carry no image to read.
_NON_IMAGE_SOP_ROOTS = (
    ("1.2.840.10008.5.1.4.1.1.88", "structured report or key object selection"),
    ("1.2.840.10008.5.1.4.1.1.11", "presentation state"),
    ("1.2.840.10008.5.1.4.1.1.481", "radiotherapy object"),  # except RT Image, see _non_image_kind
    ("1.2.840.10008.5.1.4.1.1.66", "segmentation, registration or raw data"),
    ("1.2.840.10008.5.1.4.1.1.9", "waveform"),
    ("1.2.840.10008.5.1.4.1.1.104", "encapsulated document"),
)


def hash_uid(uid: str) -> str:
    """A short, stable, non-reversible name for a UID in messages: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(str(uid).strip().rstrip("\0").encode("utf-8")).hexdigest()[:12]


def read_dicom_series(
    files: Sequence[bytes | Path],
    *,
    series_instance_uid: str | None = None,
    limits: InputLimits = DEFAULT_LIMITS,
) -> Volume:
    """Read one image series from uploaded DICOM files (bytes or paths) into a :class:`Volume`.

    ``series_instance_uid`` chooses the series when the upload holds several. Raises InvalidInputError,
    UnsupportedError or LimitExceededError as the module docstring describes.
    """
    files = list(files)
    if not files:
        raise InvalidInputError("the upload holds no files")
    limits.check_files(len(files))
    limits.check_request_bytes(sum(payload_size(f) for f in files))

    budget = InflateBudget(limits)
    headers = [_read_header(index, src, limits, budget) for index, src in enumerate(files)]
    images: list[_Header] = []
    skipped: Counter[str] = Counter()
    for header in headers:
        reason = _skip_reason(header)
        if reason is None:
            images.append(header)
        else:
            skipped[reason] += 1
            _log.debug("file %d skipped: %s", header.index, reason)
    if not images:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items()))
        n_skipped = sum(skipped.values())
        raise InvalidInputError(
            f"the upload holds no images, only {n_skipped} non-image object{'s' if n_skipped != 1 else ''} ({kinds})"
        )

    series, label = _select_series(images, series_instance_uid)
    formats = [_pixel_format(h) for h in series]
    for h, fmt in zip(series, formats, strict=True):
        limits.check_shape((fmt.columns, fmt.rows, fmt.frames), what=h.where)
    _check_same_size(series, formats, label)
    frames = [frame for h, fmt in zip(series, formats, strict=True) for frame in _frames_of(h, fmt)]
    limits.check_shape((formats[0].columns, formats[0].rows, len(frames)), what=label)
    affine, order = _stack_geometry(frames, label)
    check_geometry(affine, (formats[0].columns, formats[0].rows, len(frames)), label, limits)
    for h, fmt in zip(series, formats, strict=True):
        _check_pixel_data(h, fmt)
    _check_rescaled_range(series, formats, frames)

    source = _source_refs(series, frames, order)
    first = next(h for h in series if h.index == frames[order[0]].file_index)
    modality = _required_str(first, "Modality")

    voxels = np.empty((formats[0].columns, formats[0].rows, len(frames)), dtype=np.float32)
    _decode_into(voxels, files, series, formats, frames, order)
    warnings = _warnings(series, frames)
    _log.debug(
        "DICOM %s: %d slices of %dx%d, spacing %s mm, transfer syntaxes %s; %d non-image objects skipped",
        modality,
        len(frames),
        formats[0].columns,
        formats[0].rows,
        "x".join(f"{s:.4g}" for s in np.linalg.norm(affine[:3, :3], axis=0)),
        sorted({_syntax_name(h.transfer_syntax) for h in series}),
        sum(skipped.values()),
    )
    return Volume(voxels=voxels, affine=affine, modality=modality, source=source, warnings=warnings)


@dataclass(frozen=True)
class DicomSeriesReader(VolumeReader[Sequence[bytes | Path]]):
    """:func:`read_dicom_series` as a :class:`VolumeReader`."""

    series_instance_uid: str | None = None
    limits: InputLimits = DEFAULT_LIMITS

    def read(self, payload: Sequence[bytes | Path]) -> Volume:
        return read_dicom_series(payload, series_instance_uid=self.series_instance_uid, limits=self.limits)


# --- pass 1: headers --------------------------------------------------------------------------------------------


@dataclass
class _Header:
    """What the header pass learned about one uploaded file."""

    index: int
    ds: FileDataset  # everything before the pixel data
    transfer_syntax: UID
    pixel_tag: int | None  # the top-level pixel data element found, if any
    pixel_length: int | None  # its declared length; None when undefined (encapsulated)

    @property
    def where(self) -> str:
        return f"file {self.index}"

    @property
    def sop_class_uid(self) -> str:
        uid = self.ds.get("SOPClassUID") or self.ds.file_meta.get("MediaStorageSOPClassUID")
        return str(uid or "")

    @property
    def sop_instance_uid(self) -> str:
        return _required_str(self, "SOPInstanceUID")

    @property
    def series_uid(self) -> str:
        return _required_str(self, "SeriesInstanceUID")


class _PixelDataStop:
    """``stop_when`` callback for pydicom's reader: stop at the top-level pixel data and remember its header."""

    def __init__(self) -> None:
        self.tag: int | None = None
        self.vr: str | None = None
        self.length: int | None = None

    def __call__(self, tag: int, vr: str | None, length: int) -> bool:
        if int(tag) in _PIXEL_TAGS:
            self.tag, self.vr, self.length = int(tag), vr, length
            return True
        return False


class _ShortReadWatch:
    """A file proxy that notes a read cut short by the end of the file (some bytes, fewer than asked)."""

    def __init__(self, fp: BinaryIO) -> None:
        self._fp = fp
        self.short_read = False

    def read(self, size: int | None = -1) -> bytes:
        data = self._fp.read(size)
        if size is not None and size > 0 and 0 < len(data) < size:
            self.short_read = True
        return data

    def __getattr__(self, name: str) -> object:
        return getattr(self._fp, name)


@contextmanager
def _open(src: bytes | Path) -> Iterator[BinaryIO]:
    if isinstance(src, Path):
        with src.open("rb") as fp:
            yield fp
    elif isinstance(src, bytes | bytearray | memoryview):
        yield io.BytesIO(src)
    else:
        raise TypeError(f"DICOM files must be bytes or pathlib.Path, got {type(src).__name__}")


def _read_header(index: int, src: bytes | Path, limits: InputLimits, budget: InflateBudget | None = None) -> _Header:
    where = f"file {index}"
    with _open(src) as fp:
        size = fp.seek(0, io.SEEK_END)
        fp.seek(0)
        _check_file_meta_layout(where, fp, size)
        fp.seek(0)
        deflated = _check_deflated(where, fp, budget or InflateBudget(limits))
        fp.seek(0)
        stop = _PixelDataStop()
        watch = _ShortReadWatch(fp)
        try:
            ds = read_partial(watch, stop_when=stop, force=False)  # type: ignore[arg-type]
        except InvalidDicomError:
            raise InvalidInputError(
                f"{where} is not a DICOM file (no 'DICM' prefix after a 128-byte preamble)"
            ) from None
        except Exception as exc:  # pydicom raises many types on garbage; the message may quote values
            raise InvalidInputError(
                f"{where} could not be parsed as DICOM: malformed or truncated data ({type(exc).__name__})"
            ) from exc
        pixel_start = fp.tell()

    group_length = ds.file_meta.get("FileMetaInformationGroupLength")
    if isinstance(group_length, int) and size < _PREAMBLE_BYTES + _GROUP_LENGTH_ELEMENT_BYTES + group_length:
        raise InvalidInputError(f"{where} is truncated inside its file meta information")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if not syntax:
        raise InvalidInputError(f"{where}: TransferSyntaxUID missing from the file meta information")
    if len(ds) == 0:
        raise InvalidInputError(f"{where} has no data set after its file meta information (empty or truncated)")
    for container, tag in [(ds.file_meta, t) for t in list(ds.file_meta.keys())] + [(ds, t) for t in list(ds.keys())]:
        try:
            raw = container.get_item(tag)
            if (
                isinstance(raw, RawDataElement)
                and raw.value is not None
                and raw.length != _UNDEFINED_LENGTH
                and len(raw.value) < raw.length
            ):
                raise InvalidInputError(
                    f"{where} is truncated: element ({tag.group:04X},{tag.element:04X}) has {len(raw.value)} of "
                    f"{raw.length} bytes"
                )
            container[tag]  # convert it now: pydicom converts on first access, and a malformed value raises there
        except InvalidInputError:
            raise
        except Exception as exc:  # an unknown VR, a value its VR cannot hold: the element, not a bug
            raise InvalidInputError(
                f"{where}: element ({tag.group:04X},{tag.element:04X}) could not be parsed ({type(exc).__name__})"
            ) from None
    if stop.tag is None and watch.short_read:
        # pydicom ends the data set quietly when fewer bytes than an element header remain.
        raise InvalidInputError(f"{where} is truncated: it ends inside a data element, at byte {size}")
    length = None if stop.length in (None, _UNDEFINED_LENGTH) else stop.length
    if stop.tag is not None and length is not None and not deflated:
        element_header = 12 if stop.vr in EXPLICIT_VR_LENGTH_32 else 8
        remaining = max(size - pixel_start - element_header, 0)
        if length > remaining:
            raise InvalidInputError(
                f"{where} is truncated: {_PIXEL_TAGS[stop.tag]} declares {length} bytes but {remaining} follow"
            )
    return _Header(
        index=index,
        ds=ds,
        transfer_syntax=UID(str(syntax)),
        pixel_tag=stop.tag,
        pixel_length=length,
    )


_META_LONG_VRS = (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UC", b"UR", b"UT", b"UN", b"SQ")


def _check_file_meta_layout(where: str, fp: BinaryIO, size: int) -> None:
    """Walk the file meta information (group 0002, always explicit VR little endian) before pydicom reads it.

    A sequence or an undefined length there is malformed (PS3.10 7.1 has neither), and pydicom's reading of one
    ends in an error path that pretty-prints the half-read group: a 3.5 KB file found by the fuzzer took 3.2 GB and
    7 s to be refused (fuzz/crashes/oom-sequence-in-file-meta). Elements past the file's end are truncation.
    """
    if size < _PREAMBLE_BYTES or (fp.seek(128), fp.read(4))[1] != b"DICM":
        return  # not Part 10: the header read says so
    pos = _PREAMBLE_BYTES
    while pos + 8 <= size:
        fp.seek(pos)
        head = fp.read(12)
        group, element = int.from_bytes(head[0:2], "little"), int.from_bytes(head[2:4], "little")
        if group != 0x0002:
            return
        vr = head[4:6]
        if vr in _META_LONG_VRS:
            if len(head) < 12:
                break
            length, header = int.from_bytes(head[8:12], "little"), 12
        else:
            length, header = int.from_bytes(head[6:8], "little"), 8
        if vr == b"SQ" or length == _UNDEFINED_LENGTH or not (vr.isalpha() and vr.isupper()):
            raise InvalidInputError(
                f"{where}: the file meta information is malformed: element (0002,{element:04X}) has VR "
                f"{quote(vr.decode('latin-1'), 4)} and length {length}"
            )
        pos += header + length
    if pos > size:
        raise InvalidInputError(f"{where} is truncated inside its file meta information")


def _check_deflated(where: str, fp: BinaryIO, budget: InflateBudget) -> bool:
    """Whether the file is Deflated Explicit VR Little Endian; if so, check its inflated size first.

    pydicom inflates a deflated data set in one unbounded call, so a small upload could inflate to many GB.
    This streams the inflation in bounded steps, keeping nothing, and refuses more than the read's inflate budget
    (``max_inflated_bytes`` for all the files of a read together). It stops at the end of the deflate stream:
    bytes after it (pydicom pads an odd-length stream with one) are left, and every step must consume input or
    produce output, so the loop ends after at most input + output bytes / step.
    """
    try:
        read_preamble(fp, False)
        meta = read_dataset(fp, False, True, stop_when=lambda tag, vr, length: tag.group != 0x0002)
        syntax = meta.get("TransferSyntaxUID")
    except Exception:  # not our job here: the full header read reports what is wrong
        return False
    if syntax != DeflatedExplicitVRLittleEndian:
        return False
    limit = budget.left
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = 0
    try:
        while inflated <= limit and not inflater.eof and (chunk := fp.read(1 << 20)):
            while inflated <= limit and chunk and not inflater.eof:
                produced = len(inflater.decompress(chunk, 1 << 22))
                tail = inflater.unconsumed_tail
                if not produced and len(tail) == len(chunk):
                    raise InvalidInputError(f"{where}: deflated data set could not be inflated (no progress)")
                inflated += produced
                chunk = tail
    except zlib.error as exc:
        raise InvalidInputError(f"{where}: deflated data set could not be inflated ({escape_text(exc, 80)})") from exc
    budget.spend(inflated, f"the deflated data sets of the upload (up to {where})")
    return True


def _non_image_kind(sop_class_uid: str) -> str | None:
    if sop_class_uid == RTImageStorage:
        return None
    for root, kind in _NON_IMAGE_SOP_ROOTS:
        if sop_class_uid == root or sop_class_uid.startswith(root + "."):
            return kind
    return None


def _is_image_storage(sop_class_uid: str) -> bool:
    """Whether the SOP class is a registered image storage class (CT Image Storage, DX Image Storage, ...)."""
    return bool(sop_class_uid) and "Image Storage" in UID(sop_class_uid).name


def _skip_reason(h: _Header) -> str | None:
    """Why a file is not an image to read, or None if it is one."""
    kind = _non_image_kind(h.sop_class_uid)
    if kind is not None:
        return kind
    if h.pixel_tag is None:
        if _is_image_storage(h.sop_class_uid) or ("Rows" in h.ds and "Columns" in h.ds):
            raise InvalidInputError(
                f"{h.where}: PixelData missing from an image ({_sop_name(h.sop_class_uid)}); the file may be truncated"
            )
        return "object without pixel data"
    if h.pixel_tag != _PIXEL_DATA:
        return "image with float pixel data"
    return None


def _select_series(images: list[_Header], series_instance_uid: str | None) -> tuple[list[_Header], str]:
    groups: dict[str, list[_Header]] = {}
    for h in images:
        groups.setdefault(h.series_uid, []).append(h)

    def label(uid: str) -> str:
        number = groups[uid][0].ds.get("SeriesNumber")
        return f"series {escape_text(number, 16) if number not in (None, '') else '?'}"

    def listing() -> str:
        def key(uid: str) -> tuple[float, str]:
            number = groups[uid][0].ds.get("SeriesNumber")
            try:
                return float(number), hash_uid(uid)
            except (TypeError, ValueError):
                return math.inf, hash_uid(uid)

        return "; ".join(
            f"{label(uid)} ({hash_uid(uid)}, {len(groups[uid])} image{'s' if len(groups[uid]) != 1 else ''})"
            for uid in sorted(groups, key=key)
        )

    if series_instance_uid is not None:
        wanted = str(series_instance_uid).strip()
        by_hash = [uid for uid in groups if hash_uid(uid) == wanted.lower()]
        if wanted not in groups and len(by_hash) == 1:
            wanted = by_hash[0]  # the 12-digit hash this reader's messages name a series by
        if wanted not in groups:
            raise InvalidInputError(
                f"the requested series ({hash_uid(wanted)}) has no images in the upload; it holds {listing()}"
            )
        return groups[wanted], label(wanted)
    if len(groups) > 1:
        raise InvalidInputError(
            f"the upload holds {len(groups)} image series and none was chosen (set series_instance_uid to one's UID "
            f"or to the hash shown here; radserve read --series): {listing()}"
        )
    uid = next(iter(groups))
    return groups[uid], label(uid)


# --- pixel format -------------------------------------------------------------------------------------------------


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


# --- geometry -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Frame:
    """Geometry and rescale of one 2-D image: a single-frame instance or one frame of a multi-frame one."""

    file_index: int
    frame_number: int | None  # 1-based within an enhanced multi-frame instance
    position: tuple[float, float, float] | None  # ImagePositionPatient
    orientation: tuple[float, ...] | None  # ImageOrientationPatient, directions normalised
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    spacing_element: str
    thickness_mm: float | None
    slope: float
    intercept: float

    @property
    def where(self) -> str:
        if self.frame_number is None:
            return f"file {self.file_index}"
        return f"file {self.file_index} frame {self.frame_number}"


def _frames_of(h: _Header, fmt: _PixelFormat) -> list[_Frame]:
    ds, where = h.ds, h.where
    if fmt.enhanced:
        return _enhanced_frames(h, fmt)
    if fmt.frames > 1:
        raise UnsupportedError(
            f"{where}: multi-frame {_sop_name(h.sop_class_uid)} with {fmt.frames} frames has no per-frame "
            "functional groups; only enhanced multi-frame images are read"
        )
    position = _position(ds, where, "ImagePositionPatient")
    spacing, element = _pixel_spacing(ds, where, "", allow_imager=position is None)
    slope, intercept = _rescale(ds, where, "")
    return [
        _Frame(
            file_index=h.index,
            frame_number=None,
            position=position,
            orientation=_orientation(ds, where, "ImageOrientationPatient"),
            pixel_spacing=spacing,
            spacing_element=element,
            thickness_mm=_thickness(ds, where, "SliceThickness"),
            slope=slope,
            intercept=intercept,
        )
    ]


def _enhanced_frames(h: _Header, fmt: _PixelFormat) -> list[_Frame]:
    ds = h.ds
    try:
        per_frame = ds.PerFrameFunctionalGroupsSequence
        shared_seq = ds.get("SharedFunctionalGroupsSequence")
    except Exception as exc:
        raise InvalidInputError(f"{h.where}: functional group sequences could not be parsed") from exc
    shared = shared_seq[0] if shared_seq else Dataset()
    if len(per_frame) != fmt.frames:
        raise InvalidInputError(
            f"{h.where}: PerFrameFunctionalGroupsSequence has {len(per_frame)} items for {fmt.frames} frames"
        )
    frames = []
    for number, item in enumerate(per_frame, start=1):
        where = f"{h.where} frame {number}"

        def macro(sequence: str, item: Dataset = item, where: str = where) -> Dataset:
            for group in (item, shared):
                seq = _get(group, sequence, where, sequence)
                if seq:
                    if len(seq) != 1:
                        raise InvalidInputError(f"{where}: {sequence} must have exactly one item, has {len(seq)}")
                    return seq[0]
            return Dataset()

        position = _position(macro("PlanePositionSequence"), where, "PlanePositionSequence > ImagePositionPatient")
        measures = macro("PixelMeasuresSequence")
        spacing, element = _pixel_spacing(measures, where, "PixelMeasuresSequence > ", allow_imager=False)
        slope, intercept = _rescale(
            macro("PixelValueTransformationSequence"), where, "PixelValueTransformationSequence > "
        )
        frames.append(
            _Frame(
                file_index=h.index,
                frame_number=number,
                position=position,
                orientation=_orientation(
                    macro("PlaneOrientationSequence"), where, "PlaneOrientationSequence > ImageOrientationPatient"
                ),
                pixel_spacing=spacing,
                spacing_element=element,
                thickness_mm=_thickness(measures, where, "PixelMeasuresSequence > SliceThickness"),
                slope=slope,
                intercept=intercept,
            )
        )
    return frames


def _stack_geometry(frames: list[_Frame], label: str) -> tuple[np.ndarray, list[int]]:
    """The voxel -> LPS affine of the sorted stack, and the frame indices in slice order."""
    if len(frames) == 1:
        return _single_image_affine(frames[0]), [0]
    ref = frames[0]
    for f in frames:
        for name, value in (("ImagePositionPatient", f.position), ("ImageOrientationPatient", f.orientation)):
            if value is None:
                raise InvalidInputError(
                    f"{f.where}: {name} missing; it is needed to stack the {len(frames)} images of {label}"
                )
    for f in frames[1:]:
        deviation = float(np.max(np.abs(np.subtract(f.orientation, ref.orientation))))
        if deviation > ORIENTATION_ATOL:
            raise InvalidInputError(
                f"ImageOrientationPatient differs between {ref.where} and {f.where} in {label} (by up to "
                f"{deviation:.3g}; tolerance {ORIENTATION_ATOL}): a series must be one stack of parallel slices"
            )
        if not np.allclose(f.pixel_spacing, ref.pixel_spacing, rtol=PIXEL_SPACING_RTOL, atol=0.0):
            raise InvalidInputError(
                f"PixelSpacing differs ({_fmt(ref.pixel_spacing)} vs {_fmt(f.pixel_spacing)} mm) between "
                f"{ref.where} and {f.where} in {label}"
            )
    row_dir, col_dir, normal = _directions(ref.orientation)
    positions = np.array([f.position for f in frames], dtype=np.float64)
    along = positions @ normal
    order = [int(i) for i in np.argsort(along, kind="stable")]
    along_sorted = along[order]
    steps = np.diff(along_sorted)

    duplicates = np.flatnonzero(steps < DUPLICATE_ATOL_MM)
    if duplicates.size:
        k = int(duplicates[0])
        raise InvalidInputError(
            f"duplicate slice positions in {label}: {frames[order[k]].where} and {frames[order[k + 1]].where} are "
            f"both at {along_sorted[k]:.2f} mm along the slice normal ({duplicates.size} duplicates; multi-echo, "
            "multi-phase or multi-stack series are not read)"
        )
    usual = float(np.sort(steps)[(len(steps) - 1) // 2])  # lower median: a step that occurs
    tol = max(STEP_ATOL_MM, STEP_RTOL * usual)
    gaps: list[tuple[int, int]] = []
    for k, step in enumerate(steps):
        if abs(step - usual) <= tol:
            continue
        multiple = round(step / usual)
        if multiple >= 2 and abs(step - multiple * usual) <= multiple * tol:
            gaps.append((k, multiple))
            continue
        raise InvalidInputError(
            f"slice spacing varies ({usual:.4g} mm vs {step:.4g} mm) in {label}, between "
            f"{frames[order[k]].where} and {frames[order[k + 1]].where}; steps must agree within "
            f"{STEP_RTOL:.0%} or {STEP_ATOL_MM} mm"
        )
    if gaps:
        k, multiple = gaps[0]
        missing = sum(m - 1 for _, m in gaps)
        raise InvalidInputError(
            f"{missing} slice{'s' if missing != 1 else ''} missing in {label}: the gap between "
            f"{frames[order[k]].where} and {frames[order[k + 1]].where} is {steps[k]:.4g} mm, {multiple} times the "
            f"usual {usual:.4g} mm step" + (f" ({len(gaps)} such gaps)" if len(gaps) > 1 else "")
        )

    total = positions[order[-1]] - positions[order[0]]
    axial = float(total @ normal)
    lateral = float(np.linalg.norm(total - axial * normal))
    lateral_tol = max(LATERAL_ATOL_MM, math.tan(math.radians(TILT_MAX_DEG)) * axial)
    if lateral > lateral_tol:
        raise UnsupportedError(
            f"{label} is a tilted or sheared stack: slices advance {math.degrees(math.atan2(lateral, axial)):.2f} "
            f"degrees off their normal (gantry tilt?); tilted stacks are not resampled (tolerance {TILT_MAX_DEG} "
            "degrees)"
        )
    step = total / (len(frames) - 1)
    residual = positions[order] - (positions[order[0]] + np.outer(np.arange(len(frames)), step))
    residual -= np.outer(residual @ normal, normal)  # along the normal the spacing check above applies
    off_axis = np.linalg.norm(residual, axis=1)
    worst = int(np.argmax(off_axis))
    if off_axis[worst] > lateral_tol:
        raise InvalidInputError(
            f"slice positions in {label} do not lie on one axis: {frames[order[worst]].where} is "
            f"{off_axis[worst]:.2f} mm off it in the slice plane"
        )

    row_spacing, col_spacing = ref.pixel_spacing
    affine = np.eye(4)
    affine[:3, 0] = row_dir * col_spacing
    affine[:3, 1] = col_dir * row_spacing
    affine[:3, 2] = step
    affine[:3, 3] = positions[order[0]]
    return affine, order


def _single_image_affine(f: _Frame) -> np.ndarray:
    orientation = f.orientation if f.orientation is not None else (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    row_dir, col_dir, normal = _directions(orientation)
    step = DEFAULT_STEP_MM
    if f.position is not None and f.thickness_mm is not None:
        step = f.thickness_mm
    row_spacing, col_spacing = f.pixel_spacing
    affine = np.eye(4)
    affine[:3, 0] = row_dir * col_spacing
    affine[:3, 1] = col_dir * row_spacing
    affine[:3, 2] = normal * step
    affine[:3, 3] = f.position if f.position is not None else (0.0, 0.0, 0.0)
    return affine


def _directions(orientation: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    row_dir = np.asarray(orientation[:3], dtype=np.float64)
    col_dir = np.asarray(orientation[3:], dtype=np.float64)
    normal = np.cross(row_dir, col_dir)
    return row_dir, col_dir, normal / np.linalg.norm(normal)


# --- element access -----------------------------------------------------------------------------------------------


def _get(container: Dataset, keyword: str, where: str, path: str) -> object:
    try:
        return container.get(keyword)
    except Exception as exc:  # pydicom converts lazily; a malformed value raises here
        raise InvalidInputError(f"{where}: {path or keyword} could not be parsed") from exc


def _int(ds: Dataset, keyword: str, where: str, *, required: bool) -> int | None:
    value = _get(ds, keyword, where, keyword)
    if value is None or value == "":
        if required:
            raise InvalidInputError(f"{where}: {keyword} missing")
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
        if not number.is_integer():
            raise ValueError
    except (TypeError, ValueError):
        raise InvalidInputError(f"{where}: {keyword} {quote(value, 32)} is not an integer") from None
    return int(number)


def _floats(container: Dataset, keyword: str, count: int, where: str, path: str) -> tuple[float, ...] | None:
    value = _get(container, keyword, where, path)
    if value is None or value == "":
        return None
    values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    if not values:
        return None
    if len(values) != count:
        raise InvalidInputError(f"{where}: {path} has {len(values)} values, expected {count}")
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{where}: {path} is not numeric") from None


def _position(container: Dataset, where: str, path: str) -> tuple[float, float, float] | None:
    values = _floats(container, "ImagePositionPatient", 3, where, path)
    if values is not None and not all(math.isfinite(v) and abs(v) <= MAX_COORDINATE_MM for v in values):
        raise InvalidInputError(
            f"{where}: {path} {_fmt(values)} is not finite or outside the plausible +-{MAX_COORDINATE_MM:g} mm"
        )
    return values  # type: ignore[return-value]


def _orientation(container: Dataset, where: str, path: str) -> tuple[float, ...] | None:
    values = _floats(container, "ImageOrientationPatient", 6, where, path)
    if values is None:
        return None
    v = np.asarray(values)
    row, col = v[:3], v[3:]
    if (
        not np.all(np.isfinite(v))
        or abs(np.linalg.norm(row) - 1) > UNIT_VECTOR_ATOL
        or abs(np.linalg.norm(col) - 1) > UNIT_VECTOR_ATOL
        or abs(float(row @ col)) > UNIT_VECTOR_ATOL
    ):
        raise InvalidInputError(f"{where}: {path} {_fmt(values)} is not two orthogonal unit vectors")
    return tuple(float(x) for x in np.concatenate([row / np.linalg.norm(row), col / np.linalg.norm(col)]))


def _pixel_spacing(
    container: Dataset, where: str, prefix: str, *, allow_imager: bool
) -> tuple[tuple[float, float], str]:
    element = "PixelSpacing"
    values = _floats(container, element, 2, where, prefix + element)
    if values is None and allow_imager:
        element = "ImagerPixelSpacing"
        values = _floats(container, element, 2, where, prefix + element)
    if values is None:
        also = " (and ImagerPixelSpacing)" if allow_imager else ""
        raise InvalidInputError(f"{where}: {prefix}PixelSpacing{also} missing")
    low, high = SPACING_RANGE_MM
    if not all(math.isfinite(v) and low <= v <= high for v in values):
        raise InvalidInputError(
            f"{where}: {prefix}{element} {_fmt(values)} must be two numbers in the plausible range {low:g}-{high:g} mm"
        )
    return (values[0], values[1]), element


def _thickness(container: Dataset, where: str, path: str) -> float | None:
    values = _floats(container, "SliceThickness", 1, where, path)
    low, high = SPACING_RANGE_MM
    if values is None or not (math.isfinite(values[0]) and low <= values[0] <= high):
        return None  # only used for one-slice volumes, where 1 mm is a harmless default
    return values[0]


def _rescale(container: Dataset, where: str, prefix: str) -> tuple[float, float]:
    slope = _floats(container, "RescaleSlope", 1, where, prefix + "RescaleSlope")
    intercept = _floats(container, "RescaleIntercept", 1, where, prefix + "RescaleIntercept")
    s = slope[0] if slope is not None else 1.0
    b = intercept[0] if intercept is not None else 0.0
    check_rescale(s, b, f"{where}: {prefix}RescaleSlope/RescaleIntercept:")
    return s, b


def _required_str(h: _Header, keyword: str) -> str:
    value = str(_get(h.ds, keyword, h.where, keyword) or "").strip()
    if not value:
        raise InvalidInputError(f"{h.where}: {keyword} missing")
    return value


# --- pass 2: pixels -----------------------------------------------------------------------------------------------


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


def _decode_into(
    voxels: np.ndarray,
    files: list[bytes | Path],
    series: list[_Header],
    formats: list[_PixelFormat],
    frames: list[_Frame],
    order: list[int],
) -> None:
    """Decode the series one file at a time into ``voxels[:, :, k]``, rescaled, in slice order."""
    slot = {(frames[i].file_index, frames[i].frame_number): k for k, i in enumerate(order)}
    by_key = {(f.file_index, f.frame_number): f for f in frames}
    for h, fmt in zip(series, formats, strict=True):
        stored = _decode(h, files[h.index], fmt)
        low, high = fmt.stored_range
        for n in range(fmt.frames):
            key = (h.index, n + 1 if fmt.enhanced else None)
            frame = by_key[key]
            plane = stored[n].astype(np.float64)
            if fmt.monochrome1:
                plane = (low + high) - plane
            voxels[:, :, slot[key]] = (plane * frame.slope + frame.intercept).T


def _source_refs(series: list[_Header], frames: list[_Frame], order: list[int]) -> SourceRefs:
    by_index = {h.index: h for h in series}
    first = by_index[frames[order[0]].file_index]
    return SourceRefs(
        study_instance_uid=_required_str(first, "StudyInstanceUID"),
        series_instance_uid=first.series_uid,
        frame_of_reference_uid=str(first.ds.get("FrameOfReferenceUID") or "").strip() or None,
        images=tuple(
            SourceImage(
                sop_instance_uid=by_index[frames[i].file_index].sop_instance_uid,
                sop_class_uid=by_index[frames[i].file_index].sop_class_uid,
                slice_index=k,
                frame_number=frames[i].frame_number,
            )
            for k, i in enumerate(order)
        ),
        header=_plain_header(first.ds),
    )


# --- small helpers ------------------------------------------------------------------------------------------------


def _warnings(series: list[_Header], frames: list[_Frame]) -> tuple[str, ...]:
    out = []
    if any(f.spacing_element == "ImagerPixelSpacing" for f in frames):
        out.append("pixel spacing is ImagerPixelSpacing (at the detector, not corrected for magnification)")
    lossy = [
        h
        for h in series
        if str(h.ds.get("LossyImageCompression", "")).strip() == "01" or h.transfer_syntax in _LOSSY_SYNTAXES
    ]
    if lossy:
        out.append(f"{len(lossy)} of {len(series)} source images were lossy compressed")
    return tuple(out)


def _plain_header(ds: FileDataset) -> Dataset:
    """The header as a plain Dataset, without a reference to the uploaded file's buffer."""
    header = Dataset(ds)
    header.file_meta = ds.file_meta
    return header


def _syntax_name(syntax: UID) -> str:
    name = _SYNTAX_NAMES.get(str(syntax)) or syntax.name
    return name if name != str(syntax) else f"unknown syntax {quote(syntax)}"


def _sop_name(sop_class_uid: str) -> str:
    if not sop_class_uid:
        return "unknown SOP class"
    name = UID(sop_class_uid).name
    return name if name != sop_class_uid else f"SOP class {quote(sop_class_uid)}"


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"
