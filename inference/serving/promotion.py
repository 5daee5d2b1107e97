"""The promotion guard: whether a model version may take default routing (``radserve models promote``).

A version not marked ``promote: auto`` in its model.yaml serves only reads naming it until promoted. Promotion is
refused, with every reason, when

* its shadow agreement (inference.serving.shadow) rests on fewer than ``min_shadow_reads`` compared reads, or is
  below ``min_agreement`` (the lower of "share of live findings it also found" and "share of its findings live also
  has"); ``min_shadow_reads: 0`` lifts the shadow requirement;
* an evaluation dataset is configured for the model (``eval_datasets``, model name -> a labelled dataset on the
  server, the format of ``radserve eval``) and the candidate, read on it next to the version in default routing,
  loses more than ``max_sensitivity_drop`` of sensitivity or gains more than ``max_fp_per_study_increase`` false
  positives per study (all labels pooled; the scoring is ``radserve eval``'s, inference.evaluation).

``--force`` promotes whatever the guard says, and the audit log records it with the reasons overridden.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.config import PromotionPolicy
from inference.serving.shadow import Agreement

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalScore:
    """One version on the evaluation dataset, all labels pooled."""

    studies: int
    lesions: int
    hits: int
    false_positives: int

    @property
    def sensitivity(self) -> float:
        return self.hits / self.lesions if self.lesions else math.nan

    @property
    def fp_per_study(self) -> float:
        return self.false_positives / self.studies if self.studies else math.nan

    def as_dict(self) -> dict[str, Any]:
        return {
            "studies": self.studies,
            "lesions": self.lesions,
            "hits": self.hits,
            "false_positives": self.false_positives,
            "sensitivity": self.sensitivity,
            "fp_per_study": self.fp_per_study,
        }


def shadow_reasons(agreement: Agreement | None, policy: PromotionPolicy, key: str) -> list[str]:
    """Why the shadow agreement of ``key`` ("name:version") forbids promotion ([] when it allows it)."""
    if policy.min_shadow_reads == 0:
        return []
    reads = agreement.reads_compared if agreement is not None else 0
    if reads < policy.min_shadow_reads:
        how = "it is not shadowed" if agreement is None else f"only {reads} read(s) compared so far"
        return [
            f"shadow agreement needs at least {policy.min_shadow_reads} compared reads and {how} "
            f"(radserve models shadow {key})"
        ]
    if agreement.agreement < policy.min_agreement:
        return [
            f"shadow agreement {agreement.agreement:.3f} over {reads} reads is below the floor {policy.min_agreement} "
            f"(live findings it also found {agreement.live_found_share:.3f}, its findings live also has "
            f"{agreement.shadow_found_share:.3f}, mean center shift {agreement.mean_center_shift_mm:.1f} mm)"
        ]
    return []


def eval_reasons(live: EvalScore, candidate: EvalScore, policy: PromotionPolicy, dataset: str) -> list[str]:
    """Why the candidate's evaluation forbids promotion against the live version's on the same dataset."""
    reasons = []
    drop = live.sensitivity - candidate.sensitivity
    if live.lesions and drop > policy.max_sensitivity_drop + 1e-12:
        reasons.append(
            f"evaluation on {dataset}: sensitivity {candidate.sensitivity:.3f} ({candidate.hits}/{candidate.lesions}) "
            f"against {live.sensitivity:.3f} for the version serving, a drop of {drop:.3f} beyond the tolerance "
            f"{policy.max_sensitivity_drop}"
        )
    rise = candidate.fp_per_study - live.fp_per_study
    if live.studies and rise > policy.max_fp_per_study_increase + 1e-12:
        reasons.append(
            f"evaluation on {dataset}: {candidate.fp_per_study:.2f} false positives per study against "
            f"{live.fp_per_study:.2f} for the version serving, a rise of {rise:.2f} beyond the tolerance "
            f"{policy.max_fp_per_study_increase}"
        )
    return reasons


def load_volumes(dataset_path: Path, limits: Any) -> tuple[Any, list[tuple[str, Any]]]:
    """The dataset (the format of ``radserve eval``) and each study's Volume, read from the server's disk."""
    from inference.evaluation.dataset import load_dataset
    from inference.io.dicom import read_dicom_series
    from inference.io.nifti import read_nifti

    dataset = load_dataset(dataset_path)
    volumes = []
    for study in dataset.studies:
        if study.nifti:
            volume = read_nifti(study.image_files[0], modality=study.modality or "CT", limits=limits)
        else:
            volume = read_dicom_series(list(study.image_files), limits=limits)
        volumes.append((study.name, volume))
    return dataset, volumes


def score(dataset: Any, findings_by_study: Mapping[str, list[Any]]) -> EvalScore:
    """Score findings (anything with label, score, center_mm, diameter_mm) with ``radserve eval``'s rules."""
    from inference.evaluation.matching import Finding
    from inference.evaluation.metrics import evaluate

    converted = {
        name: [Finding(f.label, float(f.score), tuple(f.center_mm), float(f.diameter_mm)) for f in findings]
        for name, findings in findings_by_study.items()
    }
    report = evaluate(dataset, converted)
    lesions = sum(len(r.lesions) for r in report.studies)
    hits = sum(n is not None for r in report.studies for n in r.match.lesion_finding)
    false_positives = sum(n is None for r in report.studies for n in r.match.finding_lesion)
    return EvalScore(len(report.studies), lesions, hits, false_positives)


async def evaluate_versions(
    dataset_path: Path,
    limits: Any,
    read: Callable[[str, Any], Awaitable[list[Any]]],
    versions: tuple[str, str],
    load: Callable[[Path, Any], Awaitable[tuple[Any, list[tuple[str, Any]]]]],
) -> tuple[EvalScore, EvalScore]:
    """Read every study of the dataset with both ``versions`` (``await read(version, volume)`` -> findings) and
    score each. ``load`` reads the dataset (off the event loop)."""
    dataset, volumes = await load(dataset_path, limits)
    found: dict[str, dict[str, list[Any]]] = {v: {} for v in versions}
    for name, volume in volumes:
        for version in versions:
            found[version][name] = await read(version, volume)
    return score(dataset, found[versions[0]]), score(dataset, found[versions[1]])
