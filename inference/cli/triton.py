"""`radserve triton export|serve|venv`: a Triton model repository of the models, a local Triton, its environment."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    """`radserve triton export|serve|venv`."""
    triton = sub.add_parser("triton", help="export the models for, or run, a Triton Inference Server")
    triton_sub = triton.add_subparsers(dest="triton_command", required=True)
    export = triton_sub.add_parser(
        "export", help="write a Triton model repository (TorchScript + config.pbtxt), each export checked"
    )
    export.add_argument("--out", type=Path, required=True, help="the Triton model repository to write")
    export.add_argument("--models", type=Path, default=Path("models"), help="radserve model repository")
    export.add_argument(
        "--runtime",
        choices=["pytorch", "python"],
        default="pytorch",
        help="Triton backend: pytorch (libtorch, NVIDIA's container; default) or python (model.py + torch)",
    )
    export.add_argument("--instance-kind", choices=["gpu", "cpu"], default=None, help="default: gpu for pytorch")
    export.add_argument("--instances", type=int, default=1, help="model instances per device (default 1)")
    export.add_argument("--device", default="cpu", help="where to trace and check (default cpu)")
    export.add_argument("--model", action="append", default=[], help="export only this model (repeatable)")
    export.add_argument("--tolerance", type=float, default=1e-4, help="largest relative error allowed (fp32)")
    tserve = triton_sub.add_parser(
        "serve", help="export the models (cached) and run a local Triton Inference Server on them"
    )
    tserve.add_argument("--grpc-port", type=int, default=8001)
    tserve.add_argument("--http-port", type=int, default=8000, help="0 disables HTTP")
    tserve.add_argument("--metrics-port", type=int, default=8002, help="0 disables metrics")
    tserve.add_argument("--host", default="127.0.0.1", help="address Triton binds (default 127.0.0.1)")
    tserve.add_argument("--models", type=Path, default=Path("models"), help="radserve model repository")
    tserve.add_argument("--repository", type=Path, default=None, help="serve this exported repository as it is")
    tserve.add_argument("--model", action="append", default=[], help="serve only this model (repeatable)")
    tserve.add_argument("--venv", type=Path, default=None, help="Triton's virtual environment (default .venv-triton)")
    tserve.add_argument("--cache-dir", type=Path, default=None, help="exports cache (default ~/.cache/radserve)")
    tvenv = triton_sub.add_parser("venv", help="create or update Triton's virtual environment, print its path")
    tvenv.add_argument("--venv", type=Path, default=None, help="where (default .venv-triton in a checkout)")
    triton.set_defaults(handler=run_triton)


def run_triton(args: argparse.Namespace) -> int:
    """`radserve triton export|serve|venv`."""
    from inference.api.metrics import configure_logging

    configure_logging("INFO", "text")
    if args.triton_command == "export":
        from inference.triton.export import ExportError, export_repository

        try:
            exported = export_repository(
                args.models,
                args.out,
                runtime=args.runtime,
                instance_kind=args.instance_kind or ("gpu" if args.runtime == "pytorch" else "cpu"),
                instance_count=args.instances,
                device=args.device,
                only=args.model,
                tolerance=args.tolerance,
            )
        except (ExportError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        for e in exported:
            print(
                f"{e.name}:{e.version} -> {e.path} (Triton version {e.triton_version}, {e.num_outputs} outputs, "
                f"max relative error {e.max_relative_error:.2g}, {e.seconds:.1f} s)"
            )
        return 0
    if args.triton_command == "venv":
        from inference.triton.serve import ensure_environment

        try:
            environment = ensure_environment(args.venv)
        except (RuntimeError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(environment.venv)
        return 0
    from inference.triton.export import ExportError
    from inference.triton.serve import serve as serve_triton

    try:
        return serve_triton(
            args.models,
            repository=args.repository,
            host=args.host,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            metrics_port=args.metrics_port,
            only=args.model,
            venv=args.venv,
            cache_dir=args.cache_dir,
        )
    except (ExportError, RuntimeError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
