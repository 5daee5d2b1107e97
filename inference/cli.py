"""The `radserve` command line: serve, read, models, demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

DEFAULT_SERVER = "127.0.0.1:50051"


def _add_server_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server", default=DEFAULT_SERVER, help=f"HOST:PORT of a radserve server (default {DEFAULT_SERVER})"
    )
    parser.add_argument("--ca", type=Path, default=None, help="CA certificate (PEM) of the server: use TLS")
    parser.add_argument("--tls-cert", type=Path, default=None, help="client certificate (PEM), for mutual TLS")
    parser.add_argument("--tls-key", type=Path, default=None, help="client private key (PEM), for mutual TLS")
    parser.add_argument(
        "--token", default=None, help="bearer token of your tenant (default: the RADSERVE_TOKEN environment variable)"
    )


def _client(args: argparse.Namespace) -> Any:
    from inference.client import ReadingClient

    token = args.token if args.token is not None else os.environ.get("RADSERVE_TOKEN") or None
    return ReadingClient(args.server, ca=args.ca, cert=args.tls_cert, key=args.tls_key, token=token)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radserve", description="AI reading service for CT, MRI and X-ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 50051; 0 picks a free one)")
    serve.add_argument("--models", type=Path, default=None, help="model repository (default ./models)")
    serve.add_argument("--device", default=None, help="auto|cpu|cuda (default auto)")
    serve.add_argument(
        "--backend",
        default=None,
        choices=["torch", "triton"],
        help="where networks run: in this process (torch, default) or on a Triton Inference Server (triton)",
    )
    serve.add_argument(
        "--triton-url", default=None, help="HOST:PORT of Triton's gRPC endpoint (default 127.0.0.1:8001)"
    )
    serve.add_argument("--config", type=Path, default=None, help="YAML file with server settings")
    serve.add_argument("--grace-s", type=float, default=None, help="drain time on SIGTERM (default 30)")
    serve.add_argument("--log-level", default=None, help="DEBUG|INFO|WARNING|ERROR")
    serve.add_argument("--log-format", default=None, choices=["text", "json"], help="log lines (default text)")
    serve.add_argument("--tls-cert", type=Path, default=None, help="server certificate (PEM): serve TLS")
    serve.add_argument("--tls-key", type=Path, default=None, help="server private key (PEM)")
    serve.add_argument("--tls-client-ca", type=Path, default=None, help="CA of client certificates: mutual TLS")
    serve.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow plaintext gRPC on a non-loopback host (e.g. behind a TLS-terminating proxy)",
    )
    serve.add_argument("--auth-tokens", type=Path, default=None, help="YAML file of tenant: token (bearer auth)")
    serve.add_argument("--max-in-flight", type=int, default=None, help="reads in flight before UNAVAILABLE (64)")
    serve.add_argument(
        "--max-reads-per-client",
        type=int,
        default=None,
        help="reads one tenant (or, without tokens, one IP address) may have in progress (128)",
    )
    serve.add_argument(
        "--memory-budget-gb",
        type=float,
        default=None,
        help="admit reads by their estimated peak memory within this budget (default: half the machine's memory)",
    )
    serve.add_argument(
        "--decode-workers",
        type=int,
        default=None,
        help="processes decoding DICOM and NIfTI uploads, replaced when a decode hangs (2; 0: decode in threads)",
    )
    serve.add_argument(
        "--decode-timeout-s", type=float, default=None, help="a decode running longer is stopped (default 120)"
    )
    serve.add_argument(
        "--upload-first-chunk-timeout-s",
        type=float,
        default=None,
        help="a Read whose first payload chunk has not arrived by then gets DEADLINE_EXCEEDED (default 30)",
    )
    serve.add_argument(
        "--upload-min-bytes-per-s",
        type=float,
        default=None,
        help="slowest average upload accepted after the first 30 s (default 16384)",
    )
    serve.add_argument("--metrics-port", type=int, default=None, help="Prometheus metrics port (9464; 0: off)")
    serve.add_argument(
        "--health-port", type=int, default=None, help="plaintext port with gRPC health only, for probes (0: none)"
    )
    serve.add_argument(
        "--model-poll-interval-s",
        type=float,
        default=None,
        help="poll the model repository for new, changed and removed versions this often (default 10; 0: off)",
    )
    serve.add_argument(
        "--default-model",
        action="append",
        default=None,
        metavar="MODALITY=NAME",
        help="model for studies of MODALITY whose read names none (repeatable; defaults: CT=lung_nodule_ct, "
        "MR=brain_lesion_mr, CR=chest_xray, DX=chest_xray)",
    )
    serve.add_argument(
        "--oom-cpu-fallback",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run a work item that exhausts GPU memory on the CPU (default on)",
    )
    serve.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile every model's network, warmed up before SERVING (CUDA only; default off, or per model: "
        "compile: true in model.yaml)",
    )

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
    read.add_argument(
        "--series",
        default="",
        metavar="UID",
        help="the series to read when the files hold several: its SeriesInstanceUID, or the 12-digit hash the error "
        "lists it by",
    )
    read.add_argument(
        "--fhir", type=Path, default=None, help="write the FHIR R4 Bundle (DiagnosticReport, Observations) here"
    )

    models = sub.add_parser("models", help="inspect, load and unload the models of a server")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    listing = models_sub.add_parser("list", help="list models, each version's state, and the model per modality")
    listing.add_argument(
        "--format", choices=["table", "json"], default="table", help="json: one object (shadow versions' agreement)"
    )
    _add_server_flag(listing)
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
    _add_server_flag(load)
    unload = models_sub.add_parser("unload", help="take a model version (or all its versions) out of service")
    unload.add_argument("model", help="NAME[:VERSION]; without a version, every version of NAME")
    _add_server_flag(unload)
    shadow = models_sub.add_parser(
        "shadow",
        help="also read a fraction of a model's live reads with another loaded version; compare, never return",
    )
    shadow.add_argument("model", help="NAME:VERSION, a READY version not in default routing")
    shadow.add_argument("--fraction", type=float, default=1.0, help="share of the live reads, 0-1 (0 ends it)")
    _add_server_flag(shadow)
    promote = models_sub.add_parser(
        "promote", help="give a version default routing, unless the promotion guard refuses (it says why)"
    )
    promote.add_argument("model", help="NAME:VERSION")
    promote.add_argument("--force", action="store_true", help="promote whatever the guard says (audited)")
    promote.add_argument("--timeout-s", type=float, default=600.0, help="how long to wait (the guard may evaluate)")
    _add_server_flag(promote)
    rollback = models_sub.add_parser(
        "rollback", help="take a model's version in default routing out of it; the previous version serves again"
    )
    rollback.add_argument("model", help="NAME")
    _add_server_flag(rollback)

    health = sub.add_parser("health", help="exit 0 when the server's gRPC health is SERVING (for probes)")
    _add_server_flag(health)

    demo = sub.add_parser("demo", help="write a synthetic chest CT with planted nodules, read it, compare")
    _add_server_flag(demo)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--out", type=Path, default=None, help="keep the synthetic DICOM series in this folder")

    soak = sub.add_parser("soak", help="a bounded load test of a loopback server: no lost reads, no leak")
    _add_server_flag(soak)
    soak.add_argument("--clients", type=int, default=4, help="concurrent clients")
    soak.add_argument("--duration-s", type=float, default=60.0, help="stop sending after this long")
    soak.add_argument("--max-reads", type=int, default=1000, help="stop after this many reads")
    soak.add_argument("--server-pid", type=int, default=None, help="pid of the server (restart and RSS checks)")
    soak.add_argument("--spawn", action="store_true", help="start a server on a free loopback port for the soak")
    soak.add_argument("--models", type=Path, default=Path("models"), help="model repository of a --spawn server")
    soak.add_argument("--max-rss-growth-mb", type=float, default=100.0, help="allowed RSS growth after warm-up")
    soak.add_argument("--seed", type=int, default=0)

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

    from inference.bridge.cli import add_parser as add_bridge_parser

    add_bridge_parser(sub)

    # `radserve eval` (a client of the API: inference/evaluation/) and `radserve phantoms make` (the labelled datasets
    # it reads). Declared here, so that building the parser imports neither package.
    evaluate = sub.add_parser(
        "eval",
        help="read a labelled dataset through a server and score the findings against its truth",
        description="DATASET is a folder with one folder per study: its DICOM files (or one NIfTI file) and a "
        'truth.json of the lesions ({"findings": [{"label", "center_mm", "diameter_mm"}]}), optionally a '
        "NIfTI mask for Dice (README, 'Evaluate a model').",
    )
    evaluate.add_argument("dataset", type=Path, help="the labelled dataset")
    _add_server_flag(evaluate)
    evaluate.add_argument("--model", required=True, help="NAME[:VERSION] (without a version: the server's newest)")
    evaluate.add_argument(
        "--compare",
        default=None,
        metavar="NAME:VERSION",
        help="a baseline version read on the same studies: paired differences, --model minus it",
    )
    evaluate.add_argument("--out", type=Path, default=None, help="write eval.json and froc.png into this folder")
    evaluate.add_argument("--concurrency", type=int, default=2, help="studies read at once (default 2)")
    evaluate.add_argument("--timeout-s", type=float, default=600.0, help="deadline of each read")
    evaluate.add_argument("--resamples", type=int, default=2000, help="bootstrap draws of --compare's intervals")
    phantoms = sub.add_parser("phantoms", help="write synthetic studies with planted ground truth")
    phantoms_sub = phantoms.add_subparsers(dest="phantoms_command", required=True)
    make = phantoms_sub.add_parser(
        "make",
        help="write a labelled dataset for `radserve eval`: per study its DICOM files and truth.json (MR: a mask)",
    )
    make.add_argument("--modality", required=True, type=str.upper, choices=["CT", "MR", "DX"])
    make.add_argument("--count", required=True, type=int, help="studies to write")
    make.add_argument("--out", required=True, type=Path, help="the dataset folder (new or empty)")
    make.add_argument("--seed", type=int, default=0, help="the set's seed: the same seed writes the same files")
    make.add_argument(
        "--shape",
        default=None,
        help="a fixed size, COLUMNSxROWSxSLICES for CT and MR, ROWSxCOLUMNS for DX (default: the phantoms' ranges)",
    )
    make.add_argument(
        "--bias-amplitude",
        type=float,
        default=None,
        help="MR: the bias field's typical relative deviation, e.g. 0.35 (default: drawn, 5-20 %%)",
    )
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
            # Projection X-ray (a 2-D center on the image plane): the pixel is [column, row], `center_px`.
            key = "center_px" if len(f.center_mm) == 2 else "center_voxel"
            item[key] = [round(v, 2) for v in f.center_voxel]
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
    planar = any(len(f["center_mm"]) == 2 for f in result["findings"])
    center = "center_mm (image plane)" if planar else "center_mm (LPS)"
    lines.append(f"{'#':>2}  {'label':<10} {'score':>6}  {center:<30} {'diameter_mm':>11}")
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
    from inference.client import OutputIntegrityError, collect_files

    try:
        files, kind = collect_files(args.paths)
    except ValueError as exc:
        print(f"error: INVALID_ARGUMENT: {exc}", file=sys.stderr)
        return 2
    from inference.api.gen.radserve.v1 import reading_pb2 as pb

    name, _, version = args.model.partition(":")
    outputs = [pb.FINDINGS] + [pb.DICOM_SR] * (args.sr is not None) + [pb.DICOM_SEG] * (args.seg is not None)
    header_fields: dict[str, Any] = {}
    if args.series:
        header_fields["series_instance_uid"] = args.series
    outputs += [pb.FHIR] * (args.fhir is not None)
    client = _client(args)
    # DICOM outputs come through ReadStreamed, in checked chunks, so that a SEG of any size arrives.
    read = client.read_streamed if args.sr is not None or args.seg is not None else client.read
    try:
        response = read(
            files,
            payload_kind=kind,
            model=name,
            model_version=version,
            priority=pb.STAT if args.stat else pb.ROUTINE,
            modality=args.modality,
            outputs=outputs,
            timeout_s=args.timeout_s,
            progress=_Progress(sum(f.stat().st_size for f in files)),
            **header_fields,
        )
    except grpc.RpcError as exc:
        return _error(exc)
    except OutputIntegrityError as exc:
        print(f"error: {exc.code}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    for path, data, what in ((args.sr, response.dicom_sr, "DICOM SR"), (args.seg, response.dicom_seg, "DICOM SEG")):
        if path is not None and data:
            path.write_bytes(data)
            print(f"wrote {what} to {path}", file=sys.stderr)
        elif path is not None:
            why = [w for w in response.warnings if what.split()[-1] in w] or ["the server sent none"]
            print(f"no {what} written to {path}: {'; '.join(why)}", file=sys.stderr)
    if args.fhir is not None and response.fhir_bundle:
        args.fhir.write_text(response.fhir_bundle, encoding="utf-8")
        print(f"wrote FHIR Bundle to {args.fhir}", file=sys.stderr)
    result = response_to_json(response)
    print(json.dumps(result, indent=2) if args.format == "json" else _table(result))
    return 0


def _print_models(models: Any) -> None:
    for m in models:
        print(f"{m.name:<24} {m.task or '-':<13} {'/'.join(m.modalities) or '-':<8} {m.device:<8}")
        for v in m.versions:
            default = "  (default)" if v.version == m.default_version and v.state == "READY" else ""
            sha = f"  weights {v.weights_sha256[:12]}" if v.weights_sha256 else ""
            reason = f"  {v.reason}" if v.reason else ""
            routing = f"  {v.promotion}" if v.promotion and v.promotion != "auto" else ""
            shadow = ""
            if v.HasField("shadow"):
                s = v.shadow
                shadow = (
                    f"  shadow {s.fraction:.0%}: {s.reads_compared} reads, live found {s.live_found_share:.2f}, "
                    f"shadow found {s.shadow_found_share:.2f}, shift {s.mean_center_shift_mm:.1f} mm"
                )
            print(f"    {v.version:<12} {v.state:<10}{default}{routing}{shadow}{sha}{reason}")


def models_to_json(response: Any) -> dict[str, Any]:
    """`radserve models list --format json`: every model and version, shadow versions with their agreement."""
    models = []
    for m in response.models:
        versions = []
        for v in m.versions:
            item: dict[str, Any] = {"version": v.version, "state": v.state, "promotion": v.promotion}
            item.update({k: getattr(v, k) for k in ("reason", "source", "weights_sha256") if getattr(v, k)})
            if v.HasField("shadow"):
                s = v.shadow
                item["shadow"] = {
                    "fraction": s.fraction,
                    "reads_compared": s.reads_compared,
                    "reads_skipped": s.reads_skipped,
                    "reads_failed": s.reads_failed,
                    "live_findings": s.live_findings,
                    "shadow_findings": s.shadow_findings,
                    "matched": s.matched,
                    "live_found_share": round(s.live_found_share, 4),
                    "shadow_found_share": round(s.shadow_found_share, 4),
                    "mean_center_shift_mm": round(s.mean_center_shift_mm, 3),
                }
            versions.append(item)
        models.append(
            {
                "name": m.name,
                "task": m.task,
                "modalities": list(m.modalities),
                "labels": list(m.labels),
                "device": m.device,
                "default_version": m.default_version,
                "versions": versions,
            }
        )
    return {"models": models, "default_models": dict(sorted(response.default_models.items()))}


def _model_ref(text: str, *, version: bool = True) -> tuple[str, str]:
    name, _, ver = text.partition(":")
    if not name or (version and not ver) or (not version and ver):
        raise ValueError(f"expected {'NAME:VERSION' if version else 'NAME'}, got {text!r}")
    return name, ver


def _models(args: argparse.Namespace) -> int:
    try:
        if args.models_command in ("shadow", "promote"):
            _model_ref(args.model)
        elif args.models_command == "rollback":
            _model_ref(args.model, version=False)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    client = _client(args)
    try:
        if args.models_command == "shadow":
            response = client.shadow_model(*_model_ref(args.model), fraction=args.fraction)
            _print_models(response.models)
            return 0
        if args.models_command == "promote":
            name, version = _model_ref(args.model)
            response = client.promote_model(name, version, force=args.force, timeout_s=args.timeout_s)
            for reason in response.overridden:
                print(f"warning: forced past the guard: {reason}", file=sys.stderr)
            print(f"promoted {args.model} (default routing; was {name}:{response.previous_version or '-'})")
            return 0
        if args.models_command == "rollback":
            response = client.rollback_model(args.model)
            back, now = response.rolled_back_version, response.serving_version
            print(f"rolled back {args.model}:{back}; {args.model}:{now} has default routing")
            return 0
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
        return _error(exc)
    finally:
        client.close()
    if args.format == "json":
        print(json.dumps(models_to_json(response), indent=2))
        return 0
    _print_models(response.models)
    if response.default_models:
        print("by modality: " + ", ".join(f"{k} -> {v}" for k, v in sorted(response.default_models.items())))
    return 0


def _demo(args: argparse.Namespace) -> int:
    import numpy as np

    from inference.phantoms import make_chest_ct, write_dicom_series

    rng = np.random.default_rng(args.seed)
    phantom = make_chest_ct(rng, shape=(256, 256, 120), n_nodules=3, nodule_diameters_mm=(9.0, 14.0, 22.0))
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        files = write_dicom_series(phantom, out, shuffle=rng)
        print(f"synthetic chest CT: {len(files)} slices, {len(phantom.lesions)} planted nodules, in {out}")
        client = _client(args)
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


def _triton(args: argparse.Namespace) -> int:
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


def _check_can_start(config: Any) -> None:
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        try:
            from inference.api.server import serve
            from inference.config import load_config
        except ModuleNotFoundError as exc:  # a client-only install (pip install radserve[client])
            print(
                f"error: `radserve serve` needs the server's dependencies (missing: {exc.name}); "
                "install them with: pip install 'radserve[server]'",
                file=sys.stderr,
            )
            return 2

        cli = {
            "host": args.host,
            "port": args.port,
            "models": args.models,
            "device": args.device,
            "backend": args.backend,
            "triton_url": args.triton_url,
            "grace_s": args.grace_s,
            "log_level": args.log_level,
            "log_format": args.log_format,
            "tls_cert": args.tls_cert,
            "tls_key": args.tls_key,
            "tls_client_ca": args.tls_client_ca,
            "insecure": args.insecure,
            "auth_tokens": args.auth_tokens,
            "max_in_flight": args.max_in_flight,
            "max_reads_per_client": args.max_reads_per_client,
            "memory_budget_gb": args.memory_budget_gb,
            "decode_workers": args.decode_workers,
            "decode_timeout_s": args.decode_timeout_s,
            "upload_first_chunk_timeout_s": args.upload_first_chunk_timeout_s,
            "upload_min_bytes_per_s": args.upload_min_bytes_per_s,
            "metrics_port": args.metrics_port,
            "health_port": args.health_port,
            "oom_cpu_fallback": args.oom_cpu_fallback,
            "compile": args.compile,
            "model_poll_interval_s": args.model_poll_interval_s,
            "default_models": ",".join(args.default_model) if args.default_model else None,
        }
        from inference.api.metrics import configure_logging
        from inference.api.security import load_security
        from inference.api.server import StartupError, exit_leaving_stuck_threads

        try:
            config = load_config(cli, config_file=args.config)
            security = load_security(config)
            _check_can_start(config)
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
    if args.command == "read":
        return _read(args)
    if args.command == "models":
        return _models(args)
    if args.command == "demo":
        return _demo(args)
    if args.command == "soak":
        from inference.soak import run_from_args

        try:
            report = run_from_args(args)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(report.summary())
        return 0 if report.ok else 1
    if args.command == "triton":
        return _triton(args)
    if args.command == "bridge":
        from inference.bridge.cli import main as bridge_main

        return bridge_main(args)
    if args.command == "eval":
        from inference.evaluation.cli import main as eval_main

        return eval_main(args, _client)
    if args.command == "phantoms":
        from inference.phantoms.dataset import main as phantoms_main

        return phantoms_main(args)
    if args.command == "health":
        from grpc_health.v1 import health_pb2

        from inference.client import channel_credentials
        from inference.serverproc import health_status

        status = health_status(args.server, credentials=channel_credentials(args.ca, args.tls_cert, args.tls_key))
        print(health_pb2.HealthCheckResponse.ServingStatus.Name(status) if status is not None else "UNREACHABLE")
        return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
