"""`radserve serve` (the gRPC server) and `radserve health` (a probe of one).

The serve flags are derived from the settings' dataclasses (:func:`inference.config.cli_settings`: field metadata
says which settings have a flag, with its help), so a new setting gets its flag where it is declared, and the flags
are passed to :func:`inference.config.load_config` by the same table. Building them imports the server's
configuration, so they are added only when the command is `serve` (a client-only install never builds them).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from inference.cli.common import add_server_flags

SERVER_DEPENDENCIES_MISSING = (
    "error: `radserve serve` needs the server's dependencies (missing: {name}); "
    "install them with: pip install 'radserve[server]'"
)


def register_serve(sub: Any, *, serve_flags: bool = True) -> None:
    """`radserve serve`, its flags only when ``serve_flags`` (they import the server's configuration)."""
    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.set_defaults(handler=run_serve)
    if serve_flags:
        add_serve_flags(serve)


def register_health(sub: Any) -> None:
    health = sub.add_parser("health", help="exit 0 when the server's gRPC health is SERVING (for probes)")
    add_server_flags(health)
    health.set_defaults(handler=run_health)


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """``--config`` and one flag per setting of :func:`inference.config.cli_settings`, each defaulting to None (not
    given: the YAML file, the environment or the dataclass default decide)."""
    from inference.config import cli_settings

    parser.add_argument("--config", type=Path, default=None, help="YAML file with server settings")
    for setting in cli_settings():
        options = dict(setting.options)
        action = options.pop("action", None)
        if action == "store_true":
            parser.add_argument(setting.flag, dest=setting.key, action="store_true", default=None, **options)
        elif action == "append":
            parser.add_argument(setting.flag, dest=setting.key, action="append", default=None, **options)
        elif setting.kind is bool:
            parser.add_argument(
                setting.flag, dest=setting.key, action=argparse.BooleanOptionalAction, default=None, **options
            )
        else:
            kind = Path if issubclass(setting.kind, Path) else setting.kind
            parser.add_argument(setting.flag, dest=setting.key, type=kind, default=None, **options)


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The serve flags given, as :func:`inference.config.load_config`'s ``cli`` mapping (None: not given)."""
    from inference.config import cli_settings

    values = {}
    for setting in cli_settings():
        value = getattr(args, setting.key)
        values[setting.key] = ",".join(value) if isinstance(value, list) else value
    return values


def run_serve(args: argparse.Namespace) -> int:
    """Start the server with defaults < ``--config`` YAML < environment < flags; exit 2 with one ``error:`` line when
    it cannot start."""
    try:
        from inference.api.metrics import configure_logging
        from inference.api.security import load_security
        from inference.api.server import StartupError, exit_leaving_stuck_threads, serve
        from inference.config import load_config
    except ModuleNotFoundError as exc:  # a client-only install (pip install radserve[client])
        print(SERVER_DEPENDENCIES_MISSING.format(name=exc.name), file=sys.stderr)
        return 2

    try:
        config = load_config(flag_values(args), config_file=args.config)
        security = load_security(config)
        check_can_start(config)
    except (ValueError, OSError, StartupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    try:
        code = asyncio.run(serve(config, security))
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    return exit_leaving_stuck_threads(code)


def run_health(args: argparse.Namespace) -> int:
    """`radserve health`: print the server's health status; exit 0 when SERVING."""
    from grpc_health.v1 import health_pb2

    from inference.client import channel_credentials
    from inference.serverproc import health_status

    status = health_status(args.server, credentials=channel_credentials(args.ca, args.tls_cert, args.tls_key))
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(status) if status is not None else "UNREACHABLE")
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


def check_can_start(config: Any) -> None:
    """What would stop the server once it has started logging, said first, as one line: a missing model directory,
    a port something else listens on."""
    import socket

    from inference.api.server import StartupError

    if not config.models.is_dir():
        raise StartupError(f"the model directory {str(config.models)!r} does not exist or is not a directory")
    for name, port in (
        ("port", config.port),
        ("metrics port", config.metrics_port),
        ("health port", config.health_port),
    ):
        if not port:
            continue
        try:
            infos = socket.getaddrinfo(config.host.strip("[]"), port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise StartupError(f"cannot resolve the host {config.host!r}: {exc.strerror}") from None
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a listener, not TIME_WAIT, means in use
            try:
                probe.bind(address)
            except OSError as exc:
                raise StartupError(
                    f"cannot listen on {config.host}:{port} (the {name}): {exc.strerror}; is another server running?"
                ) from None
