"""Pass 1: each file's header, read up to its pixel data, with the file meta, deflate and non-image checks;
the series a read chooses.

Part of :mod:`inference.io.dicom`, whose docstring states the reading policy.
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import config as pydicom_config
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_partial, read_preamble
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, RTImageStorage
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

from inference.errors import InvalidInputError, escape_text, quote
from inference.io.dicom.elements import _required_str, _sop_name, hash_uid
from inference.io.limits import InflateBudget, InputLimits

_UNDEFINED_LENGTH = 0xFFFFFFFF
_PREAMBLE_BYTES = 128 + 4  # preamble and "DICM"
_GROUP_LENGTH_ELEMENT_BYTES = 12  # (0002,0000) UL, explicit VR little endian
_PIXEL_DATA = 0x7FE00010
_PIXEL_TAGS = {_PIXEL_DATA: "PixelData", 0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}
# pydicom's value validation warns *and logs* with the offending value quoted ("Invalid value for VR UI: '1.2...'"),
# so a malformed UID, name or date in an upload would reach the server log. This reader checks every value it uses
# itself, with messages that carry no patient data; pydicom's own checks are switched off for the process.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
# SOP class UID roots (the root itself or anything below it) of objects that carry no image to read.
_NON_IMAGE_SOP_ROOTS = (
    ("1.2.840.10008.5.1.4.1.1.88", "structured report or key object selection"),
    ("1.2.840.10008.5.1.4.1.1.11", "presentation state"),
    ("1.2.840.10008.5.1.4.1.1.481", "radiotherapy object"),  # except RT Image, see _non_image_kind
    ("1.2.840.10008.5.1.4.1.1.66", "segmentation, registration or raw data"),
    ("1.2.840.10008.5.1.4.1.1.9", "waveform"),
    ("1.2.840.10008.5.1.4.1.1.104", "encapsulated document"),
)


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
