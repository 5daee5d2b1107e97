"""How a step of the bridge failed: retriable (the study goes back to the queue) or not (the study fails with its
status), from radserve's gRPC status or the archive's HTTP answer; and the message as the journal keeps it."""

from __future__ import annotations

import logging

import grpc

from inference.bridge.archive import ArchiveError
from inference.client import OutputIntegrityError

logger = logging.getLogger(__name__)

# gRPC statuses worth another attempt later; any other fails the study (README "Errors").
RETRIABLE_GRPC = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,  # a connection torn down mid-answer
    }
)
MESSAGE_MAX_CHARS = 500


class BridgeError(RuntimeError):
    """A failure of one study: ``status`` (a gRPC status name, ``HTTP 503``, ...), whether a retry may help."""

    def __init__(self, status: str, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retriable = retriable


def printable(text: str, limit: int = MESSAGE_MAX_CHARS) -> str:
    """A message from elsewhere (the server), made safe to print and store: control characters escaped, bounded."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def classify(exc: BaseException) -> BridgeError:
    """Any failure of a study as a :class:`BridgeError` (status, message, retriable)."""
    if isinstance(exc, BridgeError):
        return exc
    if isinstance(exc, ArchiveError):
        return BridgeError(exc.status, exc.message, retriable=exc.retriable)
    if isinstance(exc, OutputIntegrityError):
        return BridgeError(exc.code, f"radserve's answer was incomplete: {printable(str(exc))}", retriable=True)
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        code = exc.code()
        return BridgeError(code.name, printable(exc.details() or ""), retriable=code in RETRIABLE_GRPC)
    # A bug of the bridge or a library: no traceback in status, one in the log.
    logger.exception("unexpected failure")
    return BridgeError("INTERNAL", f"the bridge failed ({type(exc).__name__}); see its log", retriable=False)
