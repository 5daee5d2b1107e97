"""Element access with messages that name the element and file but never its value; small text helpers.

Part of :mod:`inference.io.dicom`, whose docstring states the reading policy.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset, FileDataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from inference.errors import InvalidInputError, quote
from inference.io.limits import MAX_COORDINATE_MM, SPACING_RANGE_MM, check_rescale

if TYPE_CHECKING:
    from inference.io.dicom.headers import _Header


UNIT_VECTOR_ATOL = 1e-2  # IOP directions: | |v| - 1 | and |row . col|
# Transfer syntaxes newer than the installed pydicom's UID dictionary.
_SYNTAX_NAMES = {
    "1.2.840.10008.1.2.4.110": "JPEG XL Lossless",
    "1.2.840.10008.1.2.4.111": "JPEG XL JPEG Recompression",
    "1.2.840.10008.1.2.4.112": "JPEG XL",
}


def hash_uid(uid: str) -> str:
    """A short, stable, non-reversible name for a UID in messages: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(str(uid).strip().rstrip("\0").encode("utf-8")).hexdigest()[:12]


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
