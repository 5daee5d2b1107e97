"""The `radserve` command line: serve, read, models, demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

DEFAULT_SERVER = "127.0.0.1:50051"


def _add_server_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=DEFAULT_SERVER, help="HOST:PORT of a radserve server")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radserve", description="AI reading service for CT, MRI and X-ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 50051; 0 picks a free one)")
    serve.add_argument("--models", type=Path, default=None, help="model repository (default ./models)")
    serve.add_argument("--device", default=None, help="auto|cpu|cuda (default auto)")
    serve.add_argument("--backend", default=None, choices=["torch"], help="model backend (default torch)")
    serve.add_argument("--config", type=Path, default=None, help="YAML file with server settings")
    serve.add_argument("--grace-s", type=float, default=None, help="drain time on SIGTERM (default 30)")
    serve.add_argument("--log-level", default=None, help="DEBUG|INFO|WARNING|ERROR")

    read = sub.add_parser("read", help="read a study through a server and print the findings")
    read.add_argument("paths", nargs="+", type=Path, help="a folder of DICOM files, DICOM files, or a NIfTI file")
    _add_server_flag(read)
    read.add_argument("--model", default="", help="NAME[:VERSION]; default: chosen by modality")
    read.add_argument("--format", choices=["json", "table"], default="table")
    read.add_argument("--modality", default="", help="modality of a NIfTI study (default CT)")
    read.add_argument("--stat", action="store_true", help="STAT priority (before ROUTINE work)")
    read.add_argument("--timeout-s", type=float, default=600.0, help="deadline of the read")
    read.add_argument("--sr", type=Path, default=None, help="write the DICOM SR measurement report (TID 1500) here")
    read.add_argument("--seg", type=Path, default=None, help="write the DICOM Segmentation here")

    models = sub.add_parser("models", help="inspect the models of a server")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    listing = models_sub.add_parser("list", help="list loaded models and versions")
    _add_server_flag(listing)

    health = sub.add_parser("health", help="exit 0 when the server's gRPC health is SERVING (for probes)")
    _add_server_flag(health)

    demo = sub.add_parser("demo", help="write a synthetic chest CT with planted nodules, read it, compare")
    _add_server_flag(demo)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--out", type=Path, default=None, help="keep the synthetic DICOM series in this folder")
    return parser


def _error(exc: grpc.RpcError) -> int:
    print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
    return 1


def response_to_json(response: Any) -> dict[str, Any]:
    """The `read --format json` contract (DESIGN.md)."""
    findings = []
    for f in response.findings:
        item: dict[str, Any] = {
            "label": f.label,
            "score": round(f.score, 4),
            "center_mm": [round(v, 3) for v in f.center_mm],
            "bbox_mm": [round(v, 3) for v in f.bbox_mm],
            "diameter_mm": round(f.diameter_mm, 3),
        }
        if f.HasField("volume_ml"):
            item["volume_ml"] = round(f.volume_ml, 4)
        if f.sop_instance_uid:
            item["sop_instance_uid"] = f.sop_instance_uid
        if f.center_voxel:
            item["center_voxel"] = [round(v, 2) for v in f.center_voxel]
        findings.append(item)
    return {
        "request_id": response.request_id,
        "model": response.model,
        "model_version": response.model_version,
        "device": response.device,
        "findings": findings,
        "warnings": list(response.warnings),
        "timing_ms": {k: round(v, 1) for k, v in sorted(response.timing_ms.items())},
    }


def _table(result: dict[str, Any]) -> str:
    lines = [f"model {result['model']}:{result['model_version']} on {result['device']}"]
    lines.append(f"{'#':>2}  {'label':<10} {'score':>6}  {'center_mm (LPS)':<30} {'diameter_mm':>11}")
    for i, f in enumerate(result["findings"], 1):
        center = ", ".join(f"{v:.1f}" for v in f["center_mm"])
        lines.append(
            f"{i:>2}  {f['label']:<10} {f['score']:>6.3f}  [{center}]{'':<{28 - len(center)}} {f['diameter_mm']:>11.1f}"
        )
    if not result["findings"]:
        lines.append("    no findings")
    lines += [f"warning: {w}" for w in result["warnings"]]
    lines.append("timing_ms: " + ", ".join(f"{k} {v:.0f}" for k, v in result["timing_ms"].items()))
    return "\n".join(lines)


class _Progress:
    """Upload progress on stderr, only when it is a terminal."""

    def __init__(self, total_bytes: int) -> None:
        self.total = max(total_bytes, 1)
        self.sent = 0
        self.enabled = sys.stderr.isatty()

    def __call__(self, n: int) -> None:
        self.sent += n
        if self.enabled:
            print(f"\ruploading {self.sent / 1e6:.1f}/{self.total / 1e6:.1f} MB", end="", file=sys.stderr)
            if self.sent >= self.total:
                print(" - waiting for findings", file=sys.stderr)


def _read(args: argparse.Namespace) -> int:
    from inference.client import ReadingClient, collect_files

    try:
        files, kind = collect_files(args.paths)
    except ValueError as exc:
        print(f"error: INVALID_ARGUMENT: {exc}", file=sys.stderr)
        return 2
    from inference.api.gen.radserve.v1 import reading_pb2 as pb

    name, _, version = args.model.partition(":")
    outputs = [pb.FINDINGS] + [pb.DICOM_SR] * (args.sr is not None) + [pb.DICOM_SEG] * (args.seg is not None)
    client = ReadingClient(args.server)
    try:
        response = client.read(
            files,
            payload_kind=kind,
            model=name,
            model_version=version,
            priority=pb.STAT if args.stat else pb.ROUTINE,
            modality=args.modality,
            outputs=outputs,
            timeout_s=args.timeout_s,
            progress=_Progress(sum(f.stat().st_size for f in files)),
        )
    except grpc.RpcError as exc:
        return _error(exc)
    finally:
        client.close()
    for path, data, what in ((args.sr, response.dicom_sr, "DICOM SR"), (args.seg, response.dicom_seg, "DICOM SEG")):
        if path is not None and data:
            path.write_bytes(data)
            print(f"wrote {what} to {path}", file=sys.stderr)
    result = response_to_json(response)
    print(json.dumps(result, indent=2) if args.format == "json" else _table(result))
    return 0


def _models(args: argparse.Namespace) -> int:
    from inference.client import ReadingClient

    client = ReadingClient(args.server)
    try:
        response = client.list_models()
    except grpc.RpcError as exc:
        return _error(exc)
    finally:
        client.close()
    for m in response.models:
        versions = ", ".join(f"{v.version} ({v.state})" for v in m.versions)
        print(f"{m.name:<20} {m.task:<13} {'/'.join(m.modalities):<8} {m.device:<8} versions: {versions}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import numpy as np

    from inference.client import ReadingClient
    from inference.phantoms import make_chest_ct, write_dicom_series

    rng = np.random.default_rng(args.seed)
    phantom = make_chest_ct(rng, shape=(256, 256, 120), n_nodules=3, nodule_diameters_mm=(9.0, 14.0, 22.0))
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        files = write_dicom_series(phantom, out, shuffle=rng)
        print(f"synthetic chest CT: {len(files)} slices, {len(phantom.lesions)} planted nodules, in {out}")
        client = ReadingClient(args.server)
        start = time.perf_counter()
        try:
            response = client.read(files, timeout_s=600)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                print(f"error: UNAVAILABLE: no server at {args.server}; start one with `make serve`", file=sys.stderr)
                return 1
            return _error(exc)
        finally:
            client.close()
    elapsed_s = time.perf_counter() - start
    result = response_to_json(response)
    print(_table(result))
    print(f"\nplanted truth (LPS mm), read in {elapsed_s:.1f} s:")
    centers = np.array([f["center_mm"] for f in result["findings"]]).reshape(-1, 3)
    for lesion in phantom.lesions:
        truth = np.array(lesion.center_mm)
        dist = np.linalg.norm(centers - truth, axis=1).min() if len(centers) else float("inf")
        status = f"found, {dist:.1f} mm off" if dist <= 3.0 else "MISSED"
        coords = ", ".join(f"{v:.1f}" for v in truth)
        print(f"    {lesion.label:<10} [{coords}]  diameter {lesion.diameter_mm:.1f} mm  -> {status}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from inference.api.server import serve
        from inference.config import load_config

        cli = {
            "host": args.host,
            "port": args.port,
            "models": args.models,
            "device": args.device,
            "backend": args.backend,
            "grace_s": args.grace_s,
            "log_level": args.log_level,
        }
        try:
            config = load_config(cli, config_file=args.config)
        except (ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        logging.basicConfig(
            level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
        )
        return asyncio.run(serve(config))
    if args.command == "read":
        return _read(args)
    if args.command == "models":
        return _models(args)
    if args.command == "demo":
        return _demo(args)
    if args.command == "health":
        from grpc_health.v1 import health_pb2

        from inference.serverproc import health_status

        status = health_status(args.server)
        print(health_pb2.HealthCheckResponse.ServingStatus.Name(status) if status is not None else "UNREACHABLE")
        return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
