"""One exception hierarchy for the whole service.

Every error a read can meet is a :class:`RadserveError` subclass carrying the gRPC status it maps to.
The mapping to gRPC happens in exactly one place (``inference.api.interceptors``); nothing below the
API layer imports grpc. Messages name the element, file index or limit at fault and never carry patient
data (names, IDs, dates, UIDs).

Recoverable errors fail one request. :class:`EngineDeadError` is unrecoverable: the server flips its
health to NOT_SERVING.
"""

from __future__ import annotations

import re

# C0 and C1 control characters, DEL, and the Unicode line and paragraph separators: what could end a log line or
# rewrite a terminal. escape_text writes them (and any other non-ASCII character) as Python escapes.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_VALUE_CHARS = 64


def escape_text(text: str, max_chars: int | None = None) -> str:
    """``text`` as one line of printable ASCII: control characters and non-ASCII written as escapes (``\\n``,
    ``\\x00``, ``\\xe9``, ``\\u2028``), cut to ``max_chars`` characters (then ``...``) when given.

    Every value taken from an uploaded file or a request that reaches a status message or the log goes through
    this (or :func:`quote`), so no file can forge a log line, hide text from a terminal or flood a message.
    """
    escaped = str(text).encode("ascii", "backslashreplace").decode("ascii")
    escaped = _CONTROL.sub(lambda m: repr(m.group())[1:-1], escaped)
    if max_chars is not None and len(escaped) > max_chars:
        escaped = escaped[:max_chars] + "..."
    return escaped


def quote(value: object, max_chars: int = MAX_VALUE_CHARS) -> str:
    """A value from a file or a request, for a message: escaped as :func:`escape_text`, cut, in single quotes."""
    return "'" + escape_text(str(value), max_chars) + "'"


class RadserveError(Exception):
    """Root of all radserve errors. ``code`` is the name of a ``grpc.StatusCode`` member."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInputError(RadserveError):
    """Malformed input: a bad DICOM element, inconsistent series, bad NIfTI header..."""

    code = "INVALID_ARGUMENT"


class UnsupportedError(RadserveError):
    """Valid input that radserve cannot handle, e.g. a transfer syntax with no codec."""

    code = "UNIMPLEMENTED"


class LimitExceededError(RadserveError):
    """A configured limit (voxels, bytes, files, chunk size) would be exceeded."""

    code = "RESOURCE_EXHAUSTED"


class ModelNotFoundError(RadserveError):
    """The requested model or version is not in the repository."""

    code = "NOT_FOUND"


class ModalityMismatchError(RadserveError):
    """The study's modality is not one the model accepts."""

    code = "FAILED_PRECONDITION"


class OverloadedError(RadserveError):
    """Admission control refused the read; retriable."""

    code = "UNAVAILABLE"


class BackendUnavailableError(RadserveError):
    """The model backend (e.g. a Triton server) cannot be reached or is not ready; retriable."""

    code = "UNAVAILABLE"


class DeadlineExceededError(RadserveError):
    code = "DEADLINE_EXCEEDED"


class InputTooSmallError(RadserveError):
    """A valid study smaller than the model can read (one slice, a tiny image): the model's declared minimum."""

    code = "FAILED_PRECONDITION"


class PromotionRefusedError(RadserveError):
    """A model version may not take (or give up) default routing: the promotion guard's reasons, or no version to
    roll back to (``radserve models promote``, ``rollback``)."""

    code = "FAILED_PRECONDITION"


class ShuttingDownError(RadserveError):
    """The server is draining and takes no new reads; retriable on another replica."""

    code = "UNAVAILABLE"


class EngineDeadError(RadserveError):
    """Unrecoverable: the engine cannot serve any more reads. Health turns NOT_SERVING."""

    code = "INTERNAL"
