"""The `radserve` command line: one module per group of commands, each registering its parsers with a handler.

| command | module |
|---|---|
| `serve`, `health` | :mod:`inference.cli.serve` (serve flags derived from :class:`~inference.config.ServerConfig`) |
| `read`, `demo` | :mod:`inference.cli.read` |
| `models list|load|unload` | :mod:`inference.cli.models` |
| `triton export|serve|venv` | :mod:`inference.cli.triton` |
| `soak`, `bridge`, `eval`, `phantoms make` | :mod:`inference.cli.tools` |

Building the parser imports no radserve package beyond these modules and the bridge's parser (a client-only install
runs `radserve read` and `radserve bridge`); each handler imports what its command needs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from inference.cli import models, read, serve, tools, triton
from inference.cli.read import response_to_json

__all__ = ["build_parser", "main", "response_to_json"]

# The command table: each row adds one command's parser, with its handler (``args.handler``), in this order.
COMMANDS: dict[str, Callable[[Any], None]] = {
    "serve": serve.register_serve,
    "read": read.register_read,
    "models": models.register,
    "health": serve.register_health,
    "demo": read.register_demo,
    "soak": tools.register_soak,
    "triton": triton.register,
    "bridge": tools.register_bridge,
    "eval": tools.register_eval,
    "phantoms": tools.register_phantoms,
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `radserve` parser; the serve flags only when ``argv`` runs `serve` (they import the server's settings)."""
    parser = argparse.ArgumentParser(prog="radserve", description="AI reading service for CT, MRI and X-ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command, register in COMMANDS.items():
        if command == "serve":
            serve.register_serve(sub, serve_flags=bool(argv) and argv[0] == "serve")
        else:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `radserve` command; its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser(argv)
    except ModuleNotFoundError as exc:  # `serve` on a client-only install (pip install radserve[client])
        print(serve.SERVER_DEPENDENCIES_MISSING.format(name=exc.name), file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    return args.handler(args)
