"""Transport security and token authentication of the server.

* TLS from PEM files (``tls_cert`` + ``tls_key``); with ``tls_client_ca`` the server requires and verifies a
  client certificate (mutual TLS). Plaintext is the development default on a loopback host (with a WARNING);
  on any other host it needs ``insecure`` set explicitly, otherwise the server refuses to start.
* Bearer tokens per tenant, from a YAML file (``auth_tokens``, or ``RADSERVE_AUTH_TOKENS``)::

      archive: 6f1c...            # tenant: token (any model)
      research:                   # tenant with a model allow-list
        token: 9a3e...
        models: [lung_nodule_ct]
      ops:                        # an operator: may also load and unload models (LoadModel, UnloadModel)
        token: 51c0...
        role: operator

  A call to the ReadingService carries the metadata ``authorization: Bearer <token>``; a missing or unknown
  token gets UNAUTHENTICATED, a model the tenant may not use PERMISSION_DENIED (checked by the servicer
  through :data:`tenant_var`, once it knows the model). Health and reflection stay open for probes. Model
  management is an operator's act: only a tenant with ``role: operator`` may call LoadModel and UnloadModel, so a
  server without a tokens file has it off.

Tokens are compared in constant time and never logged or quoted in an error.
"""

from __future__ import annotations

import contextlib
import contextvars
import hmac
import inspect
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from inference.api.interceptors import call_record_var
from inference.config import ServerConfig
from inference.errors import RadserveError

logger = logging.getLogger(__name__)

PROTECTED_SERVICE_PREFIX = "/radserve.v1.ReadingService/"
OPERATOR = "operator"
ROLES = ("reader", OPERATOR)
_BEARER = "bearer "


class UnauthenticatedError(RadserveError):
    """No token, or a token no tenant holds."""

    code = "UNAUTHENTICATED"


class PermissionDeniedError(RadserveError):
    """The tenant may not use the model it asked for."""

    code = "PERMISSION_DENIED"


@dataclass(frozen=True)
class Tenant:
    name: str
    token: str = field(repr=False)  # never logged
    models: frozenset[str] | None = None  # None: every model
    role: str = "reader"  # reader | operator (may load and unload models, sees where they are loaded from)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a tenant name must be non-empty")
        if not self.token:
            raise ValueError(f"tenant {self.name!r}: the token must be a non-empty string")
        if self.role not in ROLES:
            raise ValueError(f"tenant {self.name!r}: role must be one of {ROLES}, got {self.role!r}")

    @property
    def is_operator(self) -> bool:
        return self.role == OPERATOR

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


# The authenticated tenant of the current call; None when the server runs without token auth.
tenant_var: contextvars.ContextVar[Tenant | None] = contextvars.ContextVar("tenant", default=None)


def check_model_allowed(model: str) -> None:
    """Raise PermissionDeniedError when the current call's tenant may not use ``model``."""
    tenant = tenant_var.get()
    if tenant is not None and not tenant.may_use(model):
        raise PermissionDeniedError(f"tenant {tenant.name!r} may not use model {model!r}")


class TokenTable:
    """Tenants by token; :meth:`authenticate` compares against every token in constant time."""

    def __init__(self, tenants: Sequence[Tenant]) -> None:
        if not tenants:
            raise ValueError("the tokens file names no tenant")
        tokens = [t.token for t in tenants]
        if len(set(tokens)) != len(tokens):
            raise ValueError("two tenants share a token; give each tenant its own")
        self.tenants = tuple(tenants)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "tokens file") -> TokenTable:
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: must be a mapping of tenant: token")
        tenants = []
        for name, entry in data.items():
            if isinstance(entry, str):
                tenants.append(Tenant(str(name), entry))
                continue
            if not isinstance(entry, Mapping) or not isinstance(entry.get("token"), str):
                raise ValueError(f"{source}: tenant {name!r} must map to a token or to {{token: ..., models: [...]}}")
            unknown = sorted(set(entry) - {"token", "models", "role"})
            if unknown:
                raise ValueError(
                    f"{source}: tenant {name!r} has unknown keys {unknown}; known are ['models', 'role', 'token']"
                )
            models = entry.get("models")
            if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
                raise ValueError(f"{source}: tenant {name!r}: models must be a list of model names")
            role = entry.get("role", "reader")
            tenants.append(
                Tenant(str(name), entry["token"], None if models is None else frozenset(models), role=str(role))
            )
        return cls(tenants)

    @classmethod
    def from_file(cls, path: Path) -> TokenTable:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ValueError(f"cannot read the tokens file {path}: {exc.strerror}") from None
        except yaml.YAMLError:
            # The parser's message may quote the file's text, i.e. a token: name the file only.
            raise ValueError(f"the tokens file {path} is not valid YAML") from None
        return cls.from_mapping(data or {}, str(path))

    def authenticate(self, token: str) -> Tenant | None:
        given = token.encode("utf-8")
        found = None
        for tenant in self.tenants:  # no early exit: the time does not depend on which tenant matched
            if hmac.compare_digest(given, tenant.token.encode("utf-8")):
                found = tenant
        return found


def bearer_token(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry, or None."""
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str) and value[: len(_BEARER)].lower() == _BEARER:
            return value[len(_BEARER) :].strip()
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every ReadingService call; sets :data:`tenant_var` for the handler.

    It raises UnauthenticatedError inside the handler, so the ErrorInterceptor (placed before this one)
    turns it into the status and the audit record counts it.
    """

    def __init__(self, tokens: TokenTable) -> None:
        self._tokens = tokens

    def _authenticate(self, context: grpc.aio.ServicerContext) -> Tenant:
        token = bearer_token(context.invocation_metadata())
        if not token:
            raise UnauthenticatedError("missing credentials: send the metadata 'authorization: Bearer <token>'")
        tenant = self._tokens.authenticate(token)
        if tenant is None:
            raise UnauthenticatedError("invalid token")
        return tenant

    def _guard(self, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            tenant = self._authenticate(context)
            record = call_record_var.get()
            if record is not None:
                record.tenant = tenant.name
            reset = tenant_var.set(tenant)
            try:
                return await behavior(request, context)
            finally:
                tenant_var.reset(reset)

        return wrapper

    def _guard_stream(self, behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
        """As :meth:`_guard`, for a handler that answers with a stream (ReadStreamed): authenticated before its
        first message."""

        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            tenant = self._authenticate(context)
            record = call_record_var.get()
            if record is not None:
                record.tenant = tenant.name
            reset = tenant_var.set(tenant)
            try:
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        yield response
            finally:
                with contextlib.suppress(ValueError):  # closed from another context after the client went away
                    tenant_var.reset(reset)

        return wrapper

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(PROTECTED_SERVICE_PREFIX):
            return handler
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._guard(handler.unary_unary), handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._guard(handler.stream_unary), handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_stream and inspect.isasyncgenfunction(handler.stream_stream):
            return grpc.stream_stream_rpc_method_handler(
                self._guard_stream(handler.stream_stream), handler.request_deserializer, handler.response_serializer
            )
        raise RuntimeError(f"AuthInterceptor cannot guard the method {handler_call_details.method}")


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_pem(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} file {path}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"the {what} file {path} is not PEM")
    return data


@dataclass(frozen=True)
class Security:
    """What the server needs for transport security and authentication, loaded once at start-up."""

    credentials: grpc.ServerCredentials | None = None  # None: plaintext
    tokens: TokenTable | None = None  # None: no token authentication
    mutual_tls: bool = False


def load_security(config: ServerConfig) -> Security:
    """Read the certificates and the tokens file; refuse plaintext on a non-loopback host without ``insecure``.

    Raises ValueError with a message for the operator (never quoting a key or a token).
    """
    credentials = None
    if config.tls_cert:
        key = _read_pem(config.tls_key, "TLS key")
        cert = _read_pem(config.tls_cert, "TLS certificate")
        client_ca = _read_pem(config.tls_client_ca, "TLS client CA") if config.tls_client_ca else None
        credentials = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )
    elif not is_loopback(config.host) and not config.insecure:
        raise ValueError(
            f"refusing to serve plaintext gRPC on the non-loopback host {config.host!r}: pass --tls-cert and "
            "--tls-key (and --tls-client-ca for mutual TLS), or --insecure to accept plaintext explicitly "
            "(e.g. behind a TLS-terminating proxy)"
        )
    tokens = TokenTable.from_file(Path(config.auth_tokens)) if config.auth_tokens else None
    return Security(credentials, tokens, mutual_tls=bool(config.tls_client_ca))
