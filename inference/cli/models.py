"""`radserve models list|load|unload`: a server's models, each version's state, loading and unloading them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import grpc

from inference.cli.common import add_server_flags, client_of, rpc_error


def register(sub: Any) -> None:
    """`radserve models list|load|unload`."""
    models = sub.add_parser("models", help="inspect, load and unload the models of a server")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    listing = models_sub.add_parser("list", help="list models, each version's state, and the model per modality")
    add_server_flags(listing)
    load = models_sub.add_parser(
        "load",
        help="load (or reload) a model version, a model's versions, or a MONAI bundle on the server",
        description="DIR is a path on the SERVER's filesystem (made absolute when it exists here; a relative "
        "path that does not is taken relative to the server's model repository): a version directory with "
        "model.yaml, a model directory (each version below it), or a MONAI bundle directory. A bundle is code: "
        "load only bundles you trust.",
    )
    load.add_argument("dir", help="model, version or MONAI bundle directory")
    load.add_argument("--timeout-s", type=float, default=600.0, help="how long to wait for the load")
    add_server_flags(load)
    unload = models_sub.add_parser("unload", help="take a model version (or all its versions) out of service")
    unload.add_argument("model", help="NAME[:VERSION]; without a version, every version of NAME")
    add_server_flags(unload)
    models.set_defaults(handler=run_models)


def _print_models(models: Any) -> None:
    for m in models:
        print(f"{m.name:<24} {m.task or '-':<13} {'/'.join(m.modalities) or '-':<8} {m.device:<8}")
        for v in m.versions:
            default = "  (default)" if v.version == m.default_version and v.state == "READY" else ""
            sha = f"  weights {v.weights_sha256[:12]}" if v.weights_sha256 else ""
            reason = f"  {v.reason}" if v.reason else ""
            print(f"    {v.version:<12} {v.state:<10}{default}{sha}{reason}")


def run_models(args: argparse.Namespace) -> int:
    """`radserve models list|load|unload`."""
    client = client_of(args)
    try:
        if args.models_command == "load":
            path = Path(args.dir).expanduser()
            target = str(path.absolute()) if path.exists() else args.dir
            response = client.load_model(target, timeout_s=args.timeout_s)
            _print_models(response.models)
            return 0
        if args.models_command == "unload":
            name, _, version = args.model.partition(":")
            response = client.unload_model(name, version)
            print("unloaded " + ", ".join(response.unloaded))
            return 0
        response = client.list_models()
    except grpc.RpcError as exc:
        return rpc_error(exc)
    finally:
        client.close()
    _print_models(response.models)
    if response.default_models:
        print("by modality: " + ", ".join(f"{k} -> {v}" for k, v in sorted(response.default_models.items())))
    return 0
