"""An evaluation as people read it: the printed table, ``eval.json`` and the FROC plot ``froc.png``.

matplotlib is imported where the plot is drawn (the ``eval`` extra installs it), with its file-only Agg backend.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from inference.evaluation.froc import FROC_RATES, RATE_NAMES
from inference.evaluation.metrics import SIZE_BUCKETS, EvalReport, froc_of
from inference.evaluation.paired import COMPARED, Comparison


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_report(report: EvalReport) -> str:
    """The table ``radserve eval`` prints: per label, overall then each size bucket."""
    lines = [
        f"model {report.model}:{report.model_version} on {len(report.studies)} studies of {report.dataset}",
        f"{'label':<10} {'size mm':<8} {'lesions':>7} {'hits':>5} {'sens':>7} {'FP/study':>8} {'CPM':>6}"
        f" {'center err mm':>13} {'diam err mm':>11}",
    ]
    for label in report.labels:
        rows = [("all", report.metrics(label))] + [(name, report.metrics(label, name)) for name, _, _ in SIZE_BUCKETS]
        for n, (size, m) in enumerate(rows):
            fp = _num(m["fp_per_study"]) if "fp_per_study" in m else ""
            lines.append(
                f"{label if n == 0 else '':<10} {size:<8} {m['lesions']:>7} {m['hits']:>5} {_pct(m['sensitivity']):>7}"
                f" {fp:>8} {_num(m['cpm'], 3):>6} {_num(m['center_error_mm']['mean']):>13}"
                f" {_num(m['diameter_error_mm']['mean']):>11}"
            )
        overall = report.metrics(label)
        if overall["froc"] is not None:
            points = "  ".join(f"{name} {overall['froc'][name]:.3f}" for name in RATE_NAMES)
            lines.append(f"{'':<10} FROC (sensitivity at FP/study): {points}")
        segmentation = report.segmentation(label)
        if segmentation is not None:
            d, lw = segmentation["dice_per_study"], segmentation["lesion_wise"]["overall"]
            lines.append(
                f"{'':<10} segmentation over {segmentation['studies']} studies with masks: Dice per study mean "
                f"{_num(d['mean'], 3)} (median {_num(d['median'], 3)}, min {_num(d['min'], 3)}, "
                f"{d['studies']} studies),"
                f" pooled {_num(segmentation['dice_pooled'], 3)}; lesion-wise detected {lw['detected']}/{lw['lesions']}"
                f" ({_pct(lw['sensitivity'])})"
            )
    lines += [f"warning: {w}" for w in report.warnings]
    lines.append(
        "hit: finding center within the lesion's radius (at least 3 mm), same label, one finding per lesion; "
        "FP/study counts every other finding"
    )
    return "\n".join(lines)


def format_comparison(comparison: Comparison) -> str:
    """The paired differences b - a, with 95 % bootstrap intervals and McNemar's test on the lesions."""
    lines = [f"paired over {comparison.studies} studies: a = {comparison.a}, b = {comparison.b} (difference b - a)"]
    lines.append(f"{'label':<10} {'metric':<13} {'a':>8} {'b':>8} {'b - a':>8}  95% CI (bootstrap)")
    for label, entry in comparison.labels.items():
        for n, metric in enumerate(COMPARED):
            m = entry[metric]
            ci = "-" if m["ci95"] is None else f"[{m['ci95'][0]:+.3f}, {m['ci95'][1]:+.3f}]"
            diff = "-" if m["difference"] is None else f"{m['difference']:+.3f}"
            lines.append(
                f"{label if n == 0 else '':<10} {metric:<13} {_num(m['a'], 3):>8} {_num(m['b'], 3):>8} {diff:>8}  {ci}"
            )
        les = entry["lesions"]
        lines.append(
            f"{'':<10} lesions found by both {les['both']}, only a {les['only_a']}, only b {les['only_b']}, "
            f"neither {les['neither']}; McNemar exact p = {les['mcnemar_p']:.3g}"
        )
    return "\n".join(lines)


def write_json(
    path: Path, report: EvalReport, others: Sequence[EvalReport] = (), comparison: Comparison | None = None
) -> None:
    """eval.json: the report of ``--model``, when it was made and, when the dataset has one, its ``dataset.json``
    (how `radserve phantoms make` made it); with ``--compare`` also the other version's report and the paired
    differences under ``compare``."""
    body: dict[str, Any] = {"date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), **report.to_json()}
    manifest = Path(report.dataset) / "dataset.json"
    if manifest.is_file():
        try:
            body["dataset_manifest"] = json.loads(manifest.read_text())
        except (OSError, ValueError):
            body["dataset_manifest"] = None
    if comparison is not None:
        body["compare"] = {"paired": comparison.to_json(), "reports": [other.to_json() for other in others]}
    path.write_text(json.dumps(body, indent=2) + "\n")


def write_froc_png(path: Path, reports: Sequence[EvalReport]) -> None:
    """One panel per label: each report's FROC points (FP per study on a log2 axis, 1/8 to 8) and its operating
    points as steps; for a single report, each size bucket's FROC points as well."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    labels = sorted({label for r in reports for label in r.labels if r.metrics(label)["lesions"]})
    if not labels:
        labels = ["(no lesions)"]
    figure, axes = plt.subplots(1, len(labels), figsize=(5.5 * len(labels), 4.5), squeeze=False)
    for ax, label in zip(axes[0], labels, strict=True):
        for n, report in enumerate(reports):
            if label not in report.labels:
                continue
            m = report.metrics(label)
            name = f"{report.model}:{report.model_version}"
            curve = froc_of(report.studies, label)
            color = f"C{n}"
            if curve:
                # The steps a reader can set: each operating point holds until the next one.
                xs = [max(p[0], FROC_RATES[0] / 2) for p in curve]
                ax.step(xs, [p[1] for p in curve], where="post", color=color, alpha=0.5)
            if m["froc"] is not None:
                ax.plot(
                    FROC_RATES,
                    [m["froc"][name_] for name_ in RATE_NAMES],
                    "o-",
                    color=color,
                    label=f"{name} (CPM {m['cpm']:.3f}, {m['lesions']} lesions)",
                )
        if len(reports) == 1:  # one version: its size buckets too, dashed (with --compare the plot keeps to overall)
            for k, (bucket, _, _) in enumerate(SIZE_BUCKETS):
                b = reports[0].metrics(label, bucket)
                if b["froc"] is not None:
                    ax.plot(
                        FROC_RATES,
                        [b["froc"][name_] for name_ in RATE_NAMES],
                        "--",
                        color=f"C{k + 1}",
                        linewidth=1,
                        label=f"{bucket} mm ({b['lesions']} lesions, CPM {b['cpm']:.3f})",
                    )
        ax.set_xscale("log", base=2)
        ax.set_xticks(FROC_RATES, RATE_NAMES)
        ax.set_xlim(FROC_RATES[0] / 1.5, FROC_RATES[-1] * 1.5)
        ax.set_ylim(0.0, 1.02)
        ax.set_xlabel("false positives per study")
        ax.set_ylabel("sensitivity")
        ax.set_title(f"FROC: {label} ({len(reports[0].studies)} studies)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
