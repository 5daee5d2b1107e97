"""Evaluate a model on a labelled dataset: the format, matching, metrics, FROC, paired comparison and reports.

A client of the API like ``inference.client`` and the archive bridge: studies are read through a server over gRPC;
nothing here imports torch, MONAI or the server's packages (tests/evaluation/test_eval_server.py).

    dataset = load_dataset("mr_heldout/")
    report = evaluate_on_server(dataset, ReadingClient("127.0.0.1:50051"), "brain_lesion_mr:2")
    report.metrics("lesion")["sensitivity"]

or, with findings obtained elsewhere, ``evaluate(dataset, findings_by_study)``; ``compare(report_a, report_b)`` gives
the paired differences of two versions on the same studies.

The names below are imported when first used, so that e.g. the dataset format (``load_dataset``, ``DatasetError``)
comes without numpy and the evaluation's numerics.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_WHERE = {
    "Comparison": "paired",
    "compare": "paired",
    "mcnemar_exact": "paired",
    "Dataset": "dataset",
    "DatasetError": "dataset",
    "Study": "dataset",
    "TruthLesion": "dataset",
    "load_dataset": "dataset",
    "write_truth": "dataset",
    "FROC_RATES": "froc",
    "cpm": "froc",
    "froc_curve": "froc",
    "froc_points": "froc",
    "HIT_RADIUS_FLOOR_MM": "matching",
    "Finding": "matching",
    "match_findings": "matching",
    "SIZE_BUCKETS": "metrics",
    "EvalReport": "metrics",
    "StudyResult": "metrics",
    "evaluate": "metrics",
    "size_bucket": "metrics",
    "evaluate_on_server": "reader",
}

__all__ = [
    "FROC_RATES",
    "HIT_RADIUS_FLOOR_MM",
    "SIZE_BUCKETS",
    "Comparison",
    "Dataset",
    "DatasetError",
    "EvalReport",
    "Finding",
    "Study",
    "StudyResult",
    "TruthLesion",
    "compare",
    "cpm",
    "evaluate",
    "evaluate_on_server",
    "froc_curve",
    "froc_points",
    "load_dataset",
    "match_findings",
    "mcnemar_exact",
    "size_bucket",
    "write_truth",
]

if TYPE_CHECKING:
    from inference.evaluation.dataset import Dataset, DatasetError, Study, TruthLesion, load_dataset, write_truth
    from inference.evaluation.froc import FROC_RATES, cpm, froc_curve, froc_points
    from inference.evaluation.matching import HIT_RADIUS_FLOOR_MM, Finding, match_findings
    from inference.evaluation.metrics import SIZE_BUCKETS, EvalReport, StudyResult, evaluate, size_bucket
    from inference.evaluation.paired import Comparison, compare, mcnemar_exact
    from inference.evaluation.reader import evaluate_on_server


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
