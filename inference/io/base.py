"""The reader interface: one uploaded payload in, one :class:`Volume` (or a :class:`RadserveError`) out."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Generic, TypeVar

from inference.errors import InvalidInputError, quote
from inference.io.volume import Volume

PayloadT = TypeVar("PayloadT")

_MODALITY = re.compile(r"[A-Z0-9_]([A-Z0-9_ ]{0,14}[A-Z0-9_])?")


class VolumeReader(ABC, Generic[PayloadT]):
    """Turns one request payload into a :class:`Volume`.

    ``read`` raises :class:`~inference.errors.InvalidInputError` for malformed input,
    :class:`~inference.errors.UnsupportedError` for valid input radserve cannot handle and
    :class:`~inference.errors.LimitExceededError` when a configured limit would be exceeded, always before
    decoding or allocating what the limit guards. It never returns a partially filled volume.

    ``single_payload``: ``read`` takes one payload (a NIfTI file, a raw array), not a list of them (DICOM files).
    Readers are frozen dataclasses of their settings, so that a decode worker process can be sent one.
    """

    single_payload: ClassVar[bool] = True

    @abstractmethod
    def read(self, payload: PayloadT) -> Volume:
        raise NotImplementedError(f"{type(self).__name__} must implement read()")


def check_modality(modality: str) -> str:
    """Validate a request-stated modality as a DICOM Modality code (CS: up to 16 of A-Z, 0-9, space, _)."""
    if not isinstance(modality, str) or not _MODALITY.fullmatch(modality):
        raise InvalidInputError(
            f"modality {quote(modality, 32)} is not a DICOM Modality code such as 'CT', 'MR', 'CR' or 'DX'"
        )
    return modality


def payload_size(payload: bytes | Path) -> int:
    """Size in bytes of an in-memory or on-disk payload, without reading it."""
    if isinstance(payload, Path):
        return payload.stat().st_size
    if isinstance(payload, bytes | bytearray):
        return len(payload)
    if isinstance(payload, memoryview):
        return payload.nbytes
    raise TypeError(f"payload must be bytes or pathlib.Path, got {type(payload).__name__}")
