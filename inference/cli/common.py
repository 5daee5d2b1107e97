"""What the client commands share: the server flags, the client they make, how a gRPC error is printed."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import grpc

DEFAULT_SERVER = "127.0.0.1:50051"


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    """``--server``, TLS (``--ca``, ``--tls-cert``, ``--tls-key``) and ``--token``: how a command reaches a server."""
    parser.add_argument(
        "--server", default=DEFAULT_SERVER, help=f"HOST:PORT of a radserve server (default {DEFAULT_SERVER})"
    )
    parser.add_argument("--ca", type=Path, default=None, help="CA certificate (PEM) of the server: use TLS")
    parser.add_argument("--tls-cert", type=Path, default=None, help="client certificate (PEM), for mutual TLS")
    parser.add_argument("--tls-key", type=Path, default=None, help="client private key (PEM), for mutual TLS")
    parser.add_argument(
        "--token", default=None, help="bearer token of your tenant (default: the RADSERVE_TOKEN environment variable)"
    )


def client_of(args: argparse.Namespace) -> Any:
    """A :class:`~inference.client.ReadingClient` for the server flags of ``args``."""
    from inference.client import ReadingClient

    token = args.token if args.token is not None else os.environ.get("RADSERVE_TOKEN") or None
    return ReadingClient(args.server, ca=args.ca, cert=args.tls_cert, key=args.tls_key, token=token)


def rpc_error(exc: grpc.RpcError) -> int:
    """Print ``error: STATUS: details`` on stderr (the contract of DESIGN.md); the exit code, 1."""
    print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
    return 1
