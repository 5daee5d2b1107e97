"""One exception hierarchy for the whole service.

Every error a read can meet is a :class:`RadserveError` subclass carrying the gRPC status it maps to.
The mapping to gRPC happens in exactly one place (``inference.api.interceptors``); nothing below the
API layer imports grpc. Messages name the element, file index or limit at fault and never carry patient
data (names, IDs, dates, UIDs).

Recoverable errors fail one request. :class:`EngineDeadError` is unrecoverable: the server flips its
health to NOT_SERVING.
"""

from __future__ import annotations


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


class ShuttingDownError(RadserveError):
    """The server is draining and takes no new reads; retriable on another replica."""

    code = "UNAVAILABLE"


class EngineDeadError(RadserveError):
    """Unrecoverable: the engine cannot serve any more reads. Health turns NOT_SERVING."""

    code = "INTERNAL"
