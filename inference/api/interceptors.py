"""Server interceptors. Exceptions become gRPC status codes here, and only here.

A RadserveError carries its status code and a message written for the client. Anything else is a bug:
the client gets INTERNAL with a generic message and the request id; the traceback goes to the log, with the
exception messages withheld (library messages quote values, which may be patient data).

Every call handled here gets a :class:`CallRecord` (in :data:`call_record_var`) that the inner layers fill in
(tenant, model, hashed study UID, stage timings). When the call ends, however it ends (answered, failed,
cancelled, past its deadline), each Read and ReadStreamed gets exactly one audit record on the ``radserve.audit``
logger and the record goes to the ``on_done`` hook (metrics). Neither carries patient data or tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from inference.errors import RadserveError, escape_text

logger = logging.getLogger(__name__)

# Set by the servicer once it knows the request id, read here for log lines.
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

audit_logger = logging.getLogger("radserve.audit")
AUDITED_METHODS = frozenset({"/radserve.v1.ReadingService/Read", "/radserve.v1.ReadingService/ReadStreamed"})
DEADLINE_SLACK_S = 0.25  # a call cancelled this close to its deadline is counted as DEADLINE_EXCEEDED
MAX_STATUS_MESSAGE_CHARS = 2000  # a status message, after escaping (a message quoting many values is cut here)


@dataclass
class CallRecord:
    """What one call did, for the audit log and the metrics: no patient data (the study UID only hashed)."""

    method: str
    request_id: str = "-"
    tenant: str = "-"
    model: str = ""  # set once the model is resolved (never the raw name a client sent)
    model_version: str = ""
    study_hash: str = ""  # hash_uid of the StudyInstanceUID, DICOM input only
    code: str = "UNKNOWN"  # grpc.StatusCode name
    duration_ms: float = 0.0
    timing_ms: dict[str, float] = field(default_factory=dict)  # stage timings of a successful read
    closed: bool = field(default=False, repr=False)  # audited and counted already

    def audit_fields(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "tenant": self.tenant,
            "model": self.model,
            "model_version": self.model_version,
            "study_hash": self.study_hash,
            "status": self.code,
            "duration_ms": round(self.duration_ms, 1),
        }


call_record_var: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar("call_record", default=None)


def _status_of(exc: BaseException) -> str:
    if isinstance(exc, RadserveError):
        return grpc.StatusCode[exc.code].name
    return grpc.StatusCode.INTERNAL.name


def _audit(record: CallRecord) -> None:
    fields = record.audit_fields()
    audit_logger.info(
        "read %s tenant=%s model=%s:%s study=%s status=%s duration_ms=%.1f",
        record.request_id,
        record.tenant,
        record.model or "-",
        record.model_version or "-",
        record.study_hash or "-",
        record.code,
        record.duration_ms,
        extra={"audit": fields},
    )


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    request_id = request_id_var.get()
    if isinstance(exc, RadserveError):
        code = grpc.StatusCode[exc.code]
        # Messages quote values from files and requests, escaped where they are written; escaped here again, so that
        # no message, whoever wrote it, can break a log line or carry a control character to a client.
        message = escape_text(exc.message, MAX_STATUS_MESSAGE_CHARS)
        log = logger.error if code == grpc.StatusCode.INTERNAL else logger.info
        log("request %s %s -> %s: %s", request_id, method, code.name, message)
        await context.abort(code, message)
    logger.error(
        "request %s %s failed with an unexpected error",
        request_id,
        method,
        extra={"traceback": redacted_traceback(exc).rstrip()},
    )
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id}); see the server log")


def redacted_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` and of the exceptions it chains, with every message but radserve's withheld.

    Library exceptions quote the values they fail on (pydicom: "Unable to convert '<birth date>' to 'DA' object"),
    and those values may be patient data. The stack and the exception types locate a bug without them.
    """
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    parts = []
    for position, error in enumerate(reversed(chain)):
        if position:
            parts.append("\nwhich led to:\n")
        parts.append("Traceback (most recent call last):\n")
        parts.extend(traceback.format_tb(error.__traceback__))
        kind = f"{type(error).__module__}.{type(error).__qualname__}"
        message = (
            escape_text(error.message, MAX_STATUS_MESSAGE_CHARS)
            if isinstance(error, RadserveError)
            else "<message withheld: may quote patient data>"
        )
        parts.append(f"{kind}: {message}\n")
    return "".join(parts)


def _aborted_code(context: grpc.aio.ServicerContext, record: CallRecord) -> str:
    code = context.code() if hasattr(context, "code") else None
    return code.name if isinstance(code, grpc.StatusCode) else record.code


def _cancelled_code(context: grpc.aio.ServicerContext) -> str:
    # gRPC cancels the handler when the client goes away or the deadline passes. The client's own deadline
    # timer fires first, so the server may see the cancellation a few ms before its deadline.
    remaining = context.time_remaining()
    expired = remaining is not None and remaining <= DEADLINE_SLACK_S
    return (grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED).name


def _wrap(
    behavior: Callable[..., Awaitable[Any]], method: str, on_done: Callable[[CallRecord], None] | None
) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        record = CallRecord(method)
        reset = call_record_var.set(record)
        start = time.perf_counter()
        try:
            response = await behavior(request, context)
            record.code = grpc.StatusCode.OK.name
            return response
        except grpc.aio.AbortError:
            record.code = _aborted_code(context, record)
            raise
        except asyncio.CancelledError:
            record.code = _cancelled_code(context)
            raise
        except Exception as exc:
            record.code = _status_of(exc)
            # Recorded before the abort: it sends the status to the client before it returns, and a client that
            # then reads the metrics or the audit log must find its call there.
            _close(record, start, on_done)
            await _abort_for(exc, context, method)
        finally:
            call_record_var.reset(reset)
            _close(record, start, on_done)

    return wrapper


def _wrap_stream(
    behavior: Callable[..., AsyncIterator[Any]], method: str, on_done: Callable[[CallRecord], None] | None
) -> Callable[..., AsyncIterator[Any]]:
    """As :func:`_wrap`, for a handler that answers with a stream (an async generator, e.g. ReadStreamed): an
    exception raised before or between its messages ends the call with its status; the call is recorded once,
    when the stream ends."""

    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        record = CallRecord(method)
        reset = call_record_var.set(record)
        start = time.perf_counter()
        try:
            async with contextlib.aclosing(behavior(request, context)) as responses:
                async for response in responses:
                    yield response
            record.code = grpc.StatusCode.OK.name
        except grpc.aio.AbortError:
            record.code = _aborted_code(context, record)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            # GeneratorExit: gRPC stopped taking messages (the client went away while one was being sent).
            record.code = _cancelled_code(context)
            raise
        except Exception as exc:
            record.code = _status_of(exc)
            _close(record, start, on_done)  # before the abort sends the status, as in _wrap
            await _abort_for(exc, context, method)
        finally:
            # A generator abandoned mid-stream is closed later from another context, where the reset cannot apply.
            with contextlib.suppress(ValueError):
                call_record_var.reset(reset)
            _close(record, start, on_done)

    return wrapper


def _close(record: CallRecord, start: float, on_done: Callable[[CallRecord], None] | None) -> None:
    """Complete ``record`` and hand it to the audit log and ``on_done``, once per call."""
    if record.closed:
        return
    record.closed = True
    record.duration_ms = (time.perf_counter() - start) * 1e3
    if record.request_id == "-":
        record.request_id = request_id_var.get()
    _finish(record, on_done)


def _finish(record: CallRecord, on_done: Callable[[CallRecord], None] | None) -> None:
    """Audit and metrics for a finished call; a failure here is logged, never raised into the call."""
    try:
        if record.method in AUDITED_METHODS:
            _audit(record)
        if on_done is not None:
            on_done(record)
    except Exception:
        logger.exception("request %s: recording the call failed", record.request_id)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions of the handlers (Read, ReadStreamed, ListModels...) to gRPC status codes.

    Place it first among the server's interceptors, so that it sees what the others raise. ``on_done``
    gets each finished call's :class:`CallRecord` (metrics).
    """

    def __init__(self, on_done: Callable[[CallRecord], None] | None = None) -> None:
        self._on_done = on_done

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap(handler.unary_unary, method, self._on_done),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap(handler.stream_unary, method, self._on_done),
                handler.request_deserializer,
                handler.response_serializer,
            )
        # Streamed answers written as async generators (ReadStreamed, reflection). A handler that writes with
        # context.write (health's Watch) is left as it is.
        if handler.stream_stream and inspect.isasyncgenfunction(handler.stream_stream):
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, method, self._on_done),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method, self._on_done),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return handler
