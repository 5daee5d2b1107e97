"""`radserve models list|load|unload|shadow|promote|rollback`: a server's models, each version's state, loading and
unloading them, shadowing a version on live reads, promoting it past the guard and rolling back."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import grpc

from inference.cli.common import add_server_flags, client_of, rpc_error


def register(sub: Any) -> None:
    """`radserve models list|load|unload`."""
    models = sub.add_parser("models", help="inspect, load and unload the models of a server")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    listing = models_sub.add_parser("list", help="list models, each version's state, and the model per modality")
    listing.add_argument(
        "--format", choices=["table", "json"], default="table", help="json: one object (shadow versions' agreement)"
    )
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
    shadow = models_sub.add_parser(
        "shadow", help="also read a fraction of a model's live reads with another loaded version; compare, never return"
    )
    shadow.add_argument("model", help="NAME:VERSION, a READY version not in default routing")
    shadow.add_argument("--fraction", type=float, default=1.0, help="share of the live reads, 0-1 (0 ends it)")
    add_server_flags(shadow)
    promote = models_sub.add_parser(
        "promote", help="give a version default routing, unless the promotion guard refuses (it says why)"
    )
    promote.add_argument("model", help="NAME:VERSION")
    promote.add_argument("--force", action="store_true", help="promote whatever the guard says (audited)")
    promote.add_argument("--timeout-s", type=float, default=600.0, help="how long to wait for each call")
    add_server_flags(promote)
    rollback = models_sub.add_parser(
        "rollback", help="take a model's version in default routing out of it; the previous version serves again"
    )
    rollback.add_argument("model", help="NAME")
    add_server_flags(rollback)
    models.set_defaults(handler=run_models)


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


SHADOW_FIELDS = ("fraction", "reads_compared", "reads_skipped", "reads_failed", "live_findings", "shadow_findings")
SHARE_FIELDS = ("matched", "live_found_share", "shadow_found_share", "mean_center_shift_mm")


def models_to_json(response: Any) -> dict[str, Any]:
    """`radserve models list --format json`: every model and version, shadow versions with their agreement."""
    models = []
    for m in response.models:
        versions = []
        for v in m.versions:
            item: dict[str, Any] = {"version": v.version, "state": v.state, "promotion": v.promotion}
            item.update({k: getattr(v, k) for k in ("reason", "source", "weights_sha256") if getattr(v, k)})
            if v.HasField("shadow"):
                item["shadow"] = {k: getattr(v.shadow, k) for k in SHADOW_FIELDS}
                item["shadow"].update({k: round(getattr(v.shadow, k), 4) for k in SHARE_FIELDS})
            versions.append(item)
        fields = {"name": m.name, "task": m.task, "modalities": list(m.modalities), "labels": list(m.labels)}
        models.append({**fields, "device": m.device, "default_version": m.default_version, "versions": versions})
    return {"models": models, "default_models": dict(sorted(response.default_models.items()))}


def _model_ref(text: str, *, with_version: bool) -> tuple[str, str]:
    name, _, version = text.partition(":")
    if not name or bool(version) != with_version:
        raise ValueError(f"expected {'NAME:VERSION' if with_version else 'NAME'}, got {text!r}")
    return name, version


def _promote(client: Any, args: argparse.Namespace) -> int:
    """The guard: the server's (shadow agreement) and, when the server names an evaluation dataset for the model,
    ``radserve eval``'s comparison of both versions on it, whose reasons go to the server with the promotion."""
    from inference.evaluation.promotion import evaluation_reasons

    name, version = _model_ref(args.model, with_version=True)
    check = client.promote_model(name, version, check_only=True, timeout_s=args.timeout_s)
    found = []
    if check.eval_dataset:
        print(f"evaluating {name}:{check.live_version} and {args.model} on {check.eval_dataset}", file=sys.stderr)
        found = evaluation_reasons(client, name, version, check)
    response = client.promote_model(name, version, force=args.force, client_reasons=found, timeout_s=args.timeout_s)
    for reason in response.overridden:
        print(f"warning: forced past the guard: {reason}", file=sys.stderr)
    print(f"promoted {args.model} (default routing; was {name}:{response.previous_version or '-'})")
    return 0


def run_models(args: argparse.Namespace) -> int:
    """`radserve models list|load|unload|shadow|promote|rollback`."""
    try:
        if args.models_command in ("shadow", "promote", "rollback"):
            _model_ref(args.model, with_version=args.models_command != "rollback")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    client = client_of(args)
    try:
        if args.models_command == "shadow":
            name, version = _model_ref(args.model, with_version=True)
            _print_models(client.shadow_model(name, version, fraction=args.fraction).models)
            return 0
        if args.models_command == "promote":
            return _promote(client, args)
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
        return rpc_error(exc)
    finally:
        client.close()
    if args.format == "json":
        print(json.dumps(models_to_json(response), indent=2))
        return 0
    _print_models(response.models)
    if response.default_models:
        print("by modality: " + ", ".join(f"{k} -> {v}" for k, v in sorted(response.default_models.items())))
    return 0
