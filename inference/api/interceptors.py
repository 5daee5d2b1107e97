"""Server interceptors. Exceptions become gRPC status codes here, and only here.

A RadserveError carries its status code and a message written for the client. Anything else is a bug:
the client gets INTERNAL with a generic message and the request id; the traceback goes to the log.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from inference.errors import RadserveError

logger = logging.getLogger(__name__)

# Set by the servicer once it knows the request id, read here for log lines.
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    request_id = request_id_var.get()
    if isinstance(exc, RadserveError):
        code = grpc.StatusCode[exc.code]
        log = logger.error if code == grpc.StatusCode.INTERNAL else logger.info
        log("request %s %s -> %s: %s", request_id, method, code.name, exc.message)
        await context.abort(code, exc.message)
    logger.error("request %s %s failed with an unexpected error", request_id, method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id}); see the server log")


def _wrap(behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort_for(exc, context, method)

    return wrapper


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions of unary-response handlers (Read, ListModels...) to gRPC status codes."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or (handler.request_streaming and handler.response_streaming):
            return handler
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap(handler.unary_unary, method), handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap(handler.stream_unary, method), handler.request_deserializer, handler.response_serializer
            )
        return handler
