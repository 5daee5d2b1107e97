"""Deterministic UIDs for the objects radserve derives from a study: the same read gives the same UIDs.

An archive recognises a redelivered object by its SOP Instance UID, and groups objects into series by the Series
Instance UID. Reading the same study again with the same model (a retry, a re-sent study, a second bridge) must
therefore give the same UIDs, so that the archive replaces rather than duplicates; another model, another version
or other weights must give other UIDs. Every UID of an SR or SEG is derived, none is drawn at random (except for
NIfTI and raw input, which carry no identity, below).

Derivation (docs/decisions.md, "Deterministic UIDs")
---------------------------------------------------
``derive_uid(*parts)`` = ``"2.25." + str(int(u))``, where ``u`` is an RFC 9562 version 8 UUID whose other 122 bits
are the first bits of SHA-256 over the canonical key ``json.dumps([NAMESPACE, *parts], separators=(",", ":"),
ensure_ascii=True)``. "2.25." followed by the decimal value of a UUID is how DICOM builds a UID without an
organisational root (PS3.5 B.2, ISO/IEC 9834-8); the integer has at most 39 digits, so every UID has at most 44
characters (the limit is 64) and, being a decimal integer, no leading zero.

The parts, in order:

1. the source: StudyInstanceUID, SeriesInstanceUID and the sorted, de-duplicated SOPInstanceUIDs of the images
   that made the volume (a series read with one slice more is another input, hence other outputs);
2. the model: name, version and the SHA-256 of its weights file ("" when unknown, e.g. a Triton backend);
3. the output kind ("SR", "SEG") and the role ("series", "instance"); tracking UIDs use the kind "FINDING" and
   the finding's number, so the SR's measurement group and the SEG's segment of one finding share their
   Tracking UID; the algorithm's Device UID hashes the model alone.

Any change of the namespace string changes every UID: it is versioned ("v1") and must not change for a release.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from inference.io.volume import Volume

UUID_ROOT = "2.25."
NAMESPACE = "radserve/derived-uid/v1"
MAX_UID_CHARS = 64
_UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

# Output kinds a UID is derived for.
SR = "SR"
SEG = "SEG"
FINDING = "FINDING"


def derive_uid(*parts: str) -> str:
    """The UID of ``parts`` (strings): ``2.25.<decimal UUID>``, the UUID version 8 from SHA-256 of the key."""
    for part in parts:
        if not isinstance(part, str):
            raise TypeError(f"UID key parts must be strings, got {type(part).__name__}")
    key = json.dumps([NAMESPACE, *parts], separators=(",", ":"), ensure_ascii=True).encode("ascii")
    digest = bytearray(hashlib.sha256(key).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x80  # version 8 (RFC 9562 5.8: custom, here name-based on SHA-256)
    digest[8] = (digest[8] & 0x3F) | 0x80  # variant 10
    return UUID_ROOT + str(uuid.UUID(bytes=bytes(digest)).int)


def is_valid_uid(uid: str) -> bool:
    """A DICOM UID: dot-separated decimal components without leading zeros, at most 64 characters."""
    return isinstance(uid, str) and 0 < len(uid) <= MAX_UID_CHARS and _UID_PATTERN.match(uid) is not None


@dataclass(frozen=True)
class SourceKey:
    """What identifies a read's input: the study, the series and the instances that made the volume."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]  # sorted, unique

    @classmethod
    def of(cls, volume: Volume) -> SourceKey | None:
        """The volume's DICOM source; None for NIfTI and raw input, which carry no instance identity."""
        source = volume.source
        if source is None:
            return None
        instances = tuple(sorted({image.sop_instance_uid for image in source.images}))
        return cls(source.study_instance_uid, source.series_instance_uid, instances)

    def parts(self) -> tuple[str, ...]:
        return (self.study_instance_uid, self.series_instance_uid, *self.sop_instance_uids)


class DerivedUids:
    """The UIDs of one read's outputs, derived from its source and model (see the module docstring).

    ``source`` None (NIfTI, raw input): nothing identifies the input, so a random UUID stands in for it and the
    UIDs are new on every read, though still consistent between the SR and the SEG of that read.
    """

    def __init__(
        self, source: SourceKey | None, *, model_name: str, model_version: str, weights_sha256: str = ""
    ) -> None:
        self.source = source
        self.deterministic = source is not None
        source_parts: Sequence[str] = source.parts() if source is not None else ("random", str(uuid.uuid4()))
        self._parts = (*source_parts, model_name, model_version, weights_sha256)

    @classmethod
    def for_volume(
        cls, volume: Volume, *, model_name: str, model_version: str, weights_sha256: str = ""
    ) -> DerivedUids:
        return cls(
            SourceKey.of(volume), model_name=model_name, model_version=model_version, weights_sha256=weights_sha256
        )

    def series(self, kind: str) -> str:
        """SeriesInstanceUID of the ``kind`` ("SR", "SEG") object."""
        return derive_uid(*self._parts, kind, "series")

    def instance(self, kind: str) -> str:
        """SOPInstanceUID of the ``kind`` object."""
        return derive_uid(*self._parts, kind, "instance")

    def dimension_organization(self, kind: str) -> str:
        """DimensionOrganizationUID of the ``kind`` object's multi-frame dimensions (the SEG's)."""
        return derive_uid(*self._parts, kind, "dimension-organization")

    def tracking(self, number: int) -> str:
        """Tracking Unique Identifier of finding ``number`` (1-based), shared by the SR group and the SEG segment."""
        return derive_uid(*self._parts, FINDING, str(int(number)))

    def no_findings_tracking(self) -> str:
        """Tracking Unique Identifier of the SR's "no findings" group."""
        return derive_uid(*self._parts, FINDING, "none")


def device_uid(model_name: str, model_version: str, weights_sha256: str = "") -> str:
    """The Device UID of a model version (the algorithm as a device): the same for every read it makes."""
    return derive_uid("device", model_name, model_version, weights_sha256)
