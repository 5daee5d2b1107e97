"""The commands of the tools around the server: `radserve soak` (a load test), `radserve eval` (a model scored on a
labelled dataset), `radserve phantoms make` (such datasets) and `radserve bridge` (a DICOMweb archive in the loop).

Their parsers are declared here (the bridge's in :mod:`inference.bridge.cli`), so that building the `radserve` parser
imports none of their packages: a client-only install runs `radserve read` and `radserve bridge`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from inference.cli.common import add_server_flags, client_of


def register_soak(sub: Any) -> None:
    soak = sub.add_parser("soak", help="a bounded load test of a loopback server: no lost reads, no leak")
    add_server_flags(soak)
    soak.add_argument("--clients", type=int, default=4, help="concurrent clients")
    soak.add_argument("--duration-s", type=float, default=60.0, help="stop sending after this long")
    soak.add_argument("--max-reads", type=int, default=1000, help="stop after this many reads")
    soak.add_argument("--server-pid", type=int, default=None, help="pid of the server (restart and RSS checks)")
    soak.add_argument("--spawn", action="store_true", help="start a server on a free loopback port for the soak")
    soak.add_argument("--models", type=Path, default=Path("models"), help="model repository of a --spawn server")
    soak.add_argument("--max-rss-growth-mb", type=float, default=100.0, help="allowed RSS growth after warm-up")
    soak.add_argument("--warmup-s", type=float, default=None, help="time before the RSS baseline (a fifth of the run)")
    soak.add_argument("--seed", type=int, default=0)
    soak.set_defaults(handler=run_soak)


def register_bridge(sub: Any) -> None:
    from inference.bridge.cli import add_parser as add_bridge_parser

    add_bridge_parser(sub)
    sub.choices["bridge"].set_defaults(handler=run_bridge)


def register_eval(sub: Any) -> None:
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
    add_server_flags(evaluate)
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
    evaluate.set_defaults(handler=run_eval)


def register_phantoms(sub: Any) -> None:
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
    phantoms.set_defaults(handler=run_phantoms)


def run_soak(args: argparse.Namespace) -> int:
    """`radserve soak`: exit 0 when no read was lost and memory did not grow."""
    from inference.soak import run_from_args

    try:
        report = run_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0 if report.ok else 1


def run_bridge(args: argparse.Namespace) -> int:
    from inference.bridge.cli import main as bridge_main

    return bridge_main(args)


def run_eval(args: argparse.Namespace) -> int:
    from inference.evaluation.cli import main as eval_main

    return eval_main(args, client_of)


def run_phantoms(args: argparse.Namespace) -> int:
    from inference.phantoms.dataset import main as phantoms_main

    return phantoms_main(args)
