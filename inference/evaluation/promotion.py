"""The evaluation step of the promotion guard (``radserve models promote``): both versions read the labelled dataset
configured for the model on the server (``promotion_eval_datasets``) through the server, scored by ``radserve eval``'s
rules, and the candidate compared with the version in default routing, all labels pooled.

A client of the API like the rest of inference.evaluation: the dataset is read where the command runs (it names a
path the server was configured with, so run ``promote`` where that path is readable, e.g. on the server's host); one
that cannot be read here is itself a reason to refuse, as a guard that cannot look must not say yes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from inference.evaluation.dataset import DatasetError, load_dataset
from inference.evaluation.metrics import EvalReport


@dataclass(frozen=True)
class PooledScore:
    """One version on the dataset, all labels pooled."""

    studies: int
    lesions: int
    hits: int
    false_positives: int

    @classmethod
    def of(cls, report: EvalReport) -> PooledScore:
        return cls(
            studies=len(report.studies),
            lesions=sum(len(r.lesions) for r in report.studies),
            hits=sum(n is not None for r in report.studies for n in r.match.lesion_finding),
            false_positives=sum(n is None for r in report.studies for n in r.match.finding_lesion),
        )

    @property
    def sensitivity(self) -> float:
        return self.hits / self.lesions if self.lesions else math.nan

    @property
    def fp_per_study(self) -> float:
        return self.false_positives / self.studies if self.studies else math.nan


def regression_reasons(
    live: PooledScore,
    candidate: PooledScore,
    *,
    max_sensitivity_drop: float,
    max_fp_per_study_increase: float,
    dataset: str,
) -> list[str]:
    """Why the candidate's score forbids promotion against the live version's on the same studies ([] if none)."""
    reasons = []
    drop = live.sensitivity - candidate.sensitivity
    if live.lesions and drop > max_sensitivity_drop + 1e-12:
        reasons.append(
            f"evaluation on {dataset}: sensitivity {candidate.sensitivity:.3f} ({candidate.hits}/{candidate.lesions}) "
            f"against {live.sensitivity:.3f} for the version serving, a drop of {drop:.3f} beyond the tolerance "
            f"{max_sensitivity_drop}"
        )
    rise = candidate.fp_per_study - live.fp_per_study
    if live.studies and rise > max_fp_per_study_increase + 1e-12:
        reasons.append(
            f"evaluation on {dataset}: {candidate.fp_per_study:.2f} false positives per study against "
            f"{live.fp_per_study:.2f} for the version serving, a rise of {rise:.2f} beyond the tolerance "
            f"{max_fp_per_study_increase}"
        )
    return reasons


def evaluation_reasons(client: Any, name: str, version: str, check: Any, progress: Any = None) -> list[str]:
    """The guard's evaluation of ``name:version`` against ``check.live_version`` on ``check.eval_dataset`` (a
    PromoteModel ``check_only`` answer), read through ``client``; [] when no dataset is configured."""
    from inference.evaluation.reader import evaluate_on_server

    if not check.eval_dataset or not check.live_version:
        return []
    try:
        dataset = load_dataset(check.eval_dataset)
    except DatasetError as exc:
        return [
            f"the evaluation dataset configured for {name} cannot be read where promote runs ({exc}); run it where "
            "that path is readable"
        ]
    live, candidate = (
        PooledScore.of(evaluate_on_server(dataset, client, f"{name}:{v}", progress=progress))
        for v in (check.live_version, version)
    )
    return regression_reasons(
        live,
        candidate,
        max_sensitivity_drop=check.max_sensitivity_drop,
        max_fp_per_study_increase=check.max_fp_per_study_increase,
        dataset=check.eval_dataset,
    )
