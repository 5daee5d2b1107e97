"""`radserve eval DATASET --server HOST:PORT --model NAME[:VERSION] [--compare NAME:VERSION] [--out DIR]`.

The command's flags are declared in inference/cli/tools.py, so that building the `radserve` parser imports nothing
of this package; this module runs the command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from inference.evaluation.dataset import DatasetError, Study, load_dataset


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
