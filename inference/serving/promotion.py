"""The promotion guard: whether a model version may take default routing (``radserve models promote``).

A version not marked ``promote: auto`` in its model.yaml serves only reads naming it until promoted. Promotion is
refused, with every reason, when

* its shadow agreement (inference.serving.shadow) rests on fewer than ``min_shadow_reads`` compared reads, or is
  below ``min_agreement`` (the lower of "share of live findings it also found" and "share of its findings live also
  has"); ``min_shadow_reads: 0`` lifts the shadow requirement;
* an evaluation dataset is configured for the model (``eval_datasets``, model name -> a labelled dataset in the
  format of ``radserve eval``) and the candidate, read on it next to the version in default routing, loses more than
  ``max_sensitivity_drop`` of sensitivity or gains more than ``max_fp_per_study_increase`` false positives per study
  (all labels pooled). That evaluation is ``radserve eval``'s, a client of the API (inference.evaluation.promotion):
  ``radserve models promote`` runs it and hands its reasons to PromoteModel (``client_reasons``).

``--force`` promotes whatever the guard says, and the audit log records it with the reasons overridden.
"""

from __future__ import annotations

import logging

from inference.config import PromotionPolicy
from inference.serving.shadow import Agreement

logger = logging.getLogger(__name__)


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
