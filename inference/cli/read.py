"""`radserve read` (a study through a server: findings as JSON or a table; SR, SEG, FHIR as files), `radserve demo`."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from inference.cli.common import add_server_flags, client_of, rpc_error


def register_read(sub: Any) -> None:
    read = sub.add_parser("read", help="read a study through a server and print the findings")
    read.add_argument("paths", nargs="+", type=Path, help="a folder of DICOM files, DICOM files, or a NIfTI file")
    add_server_flags(read)
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
    read.set_defaults(handler=read_study)


def register_demo(sub: Any) -> None:
    demo = sub.add_parser("demo", help="write a synthetic chest CT with planted nodules, read it, compare")
    add_server_flags(demo)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--out", type=Path, default=None, help="keep the synthetic DICOM series in this folder")
    demo.set_defaults(handler=run_demo)


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


def read_study(args: argparse.Namespace) -> int:
    """`radserve read`: the findings of a study, and its DICOM SR, SEG and FHIR Bundle when asked for."""
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
    elif kind == pb.DICOM_FILES:
        # One series' files (the usual upload): a model that reads progressively starts on its slabs while the
        # rest uploads. A wrong count costs only that head start: the server checks it and reads the whole study.
        header_fields["expected_instances"] = len(files)
    outputs += [pb.FHIR] * (args.fhir is not None)
    client = client_of(args)
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
        return rpc_error(exc)
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


def run_demo(args: argparse.Namespace) -> int:
    """`radserve demo`: a synthetic chest CT with planted nodules, read and compared with its truth."""
    import numpy as np

    from inference.phantoms import make_chest_ct, write_dicom_series

    rng = np.random.default_rng(args.seed)
    phantom = make_chest_ct(rng, shape=(256, 256, 120), n_nodules=3, nodule_diameters_mm=(9.0, 14.0, 22.0))
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        files = write_dicom_series(phantom, out, shuffle=rng)
        print(f"synthetic chest CT: {len(files)} slices, {len(phantom.lesions)} planted nodules, in {out}")
        client = client_of(args)
        start = time.perf_counter()
        try:
            response = client.read(files, timeout_s=600)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                print(f"error: UNAVAILABLE: no server at {args.server}; start one with `make serve`", file=sys.stderr)
                return 1
            return rpc_error(exc)
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
