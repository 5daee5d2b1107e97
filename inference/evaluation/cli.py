"""`radserve eval DATASET --server HOST:PORT --model NAME[:VERSION] [--compare NAME:VERSION] [--out DIR]`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from inference.evaluation.dataset import DatasetError, Study, load_dataset


def add_parser(sub: Any, add_server_flags: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    """The `eval` subcommand; ``add_server_flags`` adds --server and the TLS and token flags `read` has."""
    parser = sub.add_parser(
        "eval",
        help="read a labelled dataset through a server and score the findings against its truth",
        description="DATASET is a folder with one folder per study: its DICOM files (or one NIfTI file) and a "
        'truth.json of the lesions ({"findings": [{"label", "center_mm", "diameter_mm"}]}), optionally a '
        "NIfTI mask for Dice (README, 'Evaluate a model').",
    )
    parser.add_argument("dataset", type=Path, help="the labelled dataset")
    add_server_flags(parser)
    parser.add_argument("--model", required=True, help="NAME[:VERSION] (without a version: the server's newest)")
    parser.add_argument(
        "--compare",
        default=None,
        metavar="NAME:VERSION",
        help="a second version read on the same studies: paired differences",
    )
    parser.add_argument("--out", type=Path, default=None, help="write eval.json and froc.png into this folder")
    parser.add_argument("--concurrency", type=int, default=2, help="studies read at once (default 2)")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="deadline of each read")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap draws of --compare's intervals")
    return parser


def main(args: argparse.Namespace, client_factory: Callable[[argparse.Namespace], Any]) -> int:
    from inference.evaluation.paired import compare
    from inference.evaluation.reader import EvalReadError, ModelRef, StudyReading, read_dataset, report_from_readings
    from inference.evaluation.report import format_comparison, format_report, write_froc_png, write_json

    try:
        models = [ModelRef.parse(args.model)] + ([ModelRef.parse(args.compare)] if args.compare else [])
        if args.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {args.concurrency}")
        dataset = load_dataset(args.dataset)
        if args.out is not None and args.out.exists() and not args.out.is_dir():
            raise ValueError(f"--out {args.out} exists and is not a folder")
    except (DatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def progress(done: int, total: int, study: Study, readings: Sequence[StudyReading]) -> None:
        parts = ", ".join(
            f"{m}: {len(r.findings)} findings in {r.seconds:.1f} s" for m, r in zip(models, readings, strict=True)
        )
        print(
            f"[{done:>{len(str(total))}}/{total}] {study.name} ({len(study.lesions)} lesions) {parts}", file=sys.stderr
        )

    client = client_factory(args)
    try:
        print(
            f"reading {len(dataset)} studies with {' and '.join(map(str, models))} through {args.server}",
            file=sys.stderr,
        )
        readings = read_dataset(
            dataset, client, models, concurrency=args.concurrency, timeout_s=args.timeout_s, progress=progress
        )
        reports = [report_from_readings(dataset, r, m) for r, m in zip(readings, models, strict=True)]
    except EvalReadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (DatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()

    # The --compare version is the baseline a, the --model version b: differences read "the model against it".
    comparison = compare(reports[1], reports[0], resamples=args.resamples) if len(reports) == 2 else None
    if args.out is not None:  # the files first: a closed pipe on stdout must not lose them
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "eval.json", reports[0], reports[1:], comparison)
        write_froc_png(args.out / "froc.png", reports)
        print(f"wrote {args.out / 'eval.json'} and {args.out / 'froc.png'}", file=sys.stderr)
    print("\n\n".join(format_report(r) for r in reports))
    if comparison is not None:
        print("\n" + format_comparison(comparison))
    return 0
