"""The last step of benchmarks/gpu_run.sh: one table of what the GPU run measured, and its verdict.

Reads what the steps left (any of them may be missing or partial): the benchmark's ``<profile>.json``, pytest's
JUnit report of the cuda tests, ``compile.json`` and the steps' outcomes; adds the test counts, the compile
figures and the steps to ``<profile>.json`` and rewrites ``<profile>.md`` (the table for BENCHMARKS.md, with the
card, date and commit), prints it, and returns the run's exit status:

* 3 when CUDA is present and no cuda test ran (none collected, or all skipped): the run proved nothing on the GPU;
* 1 when a cuda test failed, a step failed or timed out, or the benchmark recorded a failure;
* 0 otherwise.

    python -m benchmarks.gpu_summary --out runs/bench-gpu --profile gpu --junit cuda-junit.xml \\
        --compile runs/bench-gpu/compile.json --steps steps.txt --cuda 1
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

RESULT_FILES_MAX = 6  # what the GPU run may leave in $OUT (benchmarks/README.md, "The GPU run")


def cuda_tests(junit: Path) -> dict[str, Any]:
    """Counts and the failed or skipped tests' names from pytest's JUnit XML; ``{"missing": ...}`` without it."""
    if not junit.is_file():
        return {"missing": "no JUnit report: the test step did not run or was killed before pytest wrote it"}
    try:
        root = ET.parse(junit).getroot()
    except ET.ParseError as exc:
        return {"missing": f"unreadable JUnit report: {exc}"}
    counts = {"collected": 0, "passed": 0, "failed": 0, "skipped": 0}
    failed, skipped = [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        counts["collected"] += 1
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            failed.append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
            element = case.find("skipped")
            skipped.append(f"{name}: {(element.get('message') or '')[:120]}")
        else:
            counts["passed"] += 1
    # Errors outside any test case (a module that failed to import) count as failures.
    suite_errors = sum(int(s.get("errors", 0)) for s in root.iter("testsuite")) - sum(
        1 for case in root.iter("testcase") if case.find("error") is not None
    )
    if suite_errors > 0:
        counts["failed"] += suite_errors
        failed.append(f"{suite_errors} collection error(s): see cuda-tests.txt")
    return {**counts, "failed_tests": failed, "skipped_tests": skipped[:20]}


def verdict(report: dict[str, Any], cuda: bool) -> tuple[int, list[str]]:
    """The exit status and the reasons for it."""
    reasons = []
    tests = report["cuda_tests"]
    if cuda and tests.get("passed", 0) + tests.get("failed", 0) == 0:
        reasons.append("CUDA is present and no cuda test ran (" + (tests.get("missing") or "all skipped") + ")")
        return 3, reasons
    if tests.get("failed"):
        reasons.append(f"{tests['failed']} cuda test(s) failed")
    reasons += [f"step {s}" for s in report.get("steps", []) if ": exit 0 after " not in s]
    for name, entry in report.get("workloads", {}).items():
        reasons += [f"{name} {e['part']} failed" for e in entry.get("errors", [])]
        reasons += [
            f"{name} c={r['concurrency']}: failed reads {r['errors']}" for r in entry.get("service", []) if r["errors"]
        ]
    reasons += [f"{e['part']} failed" for e in report.get("errors", [])]
    reasons += [f"benchmark stopped early: {report['stopped']}"] if "stopped" in report else []
    reasons += [f"compile {name}: {e['error']}" for name, e in report.get("compile", {}).items() if "error" in e]
    return (1 if reasons else 0), reasons


def test_lines(tests: dict[str, Any], cuda: bool) -> list[str]:
    if "missing" in tests:
        return [f"cuda tests: {tests['missing']}"]
    lines = [
        f"cuda tests: {tests['collected']} collected, {tests['passed']} passed, {tests['failed']} failed, "
        f"{tests['skipped']} skipped" + ("" if cuda else " (no CUDA here: skipped by design)")
    ]
    lines += [f"  FAILED {name}" for name in tests["failed_tests"]]
    if cuda:
        lines += [f"  skipped {name}" for name in tests["skipped_tests"]]
    return lines


def progressive_lines(report: dict[str, Any], path: Path | None) -> list[str]:
    """The progressive-reading rows (benchmarks/progressive.py), added to ``report``; none when the step left none."""
    from benchmarks.progressive import format_rows

    try:
        rows = json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        rows = {}
    report["progressive"] = rows
    if not rows:
        return []
    return ["progressive reading (time after the last byte):", *[format_rows(s, r) for s, r in rows.items()], ""]


def main(argv: list[str] | None = None) -> int:
    from benchmarks.run import summarize, table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profile", required=True)
    parser.add_argument("--junit", type=Path, required=True)
    parser.add_argument("--compile", type=Path, required=True)
    parser.add_argument("--steps", type=Path, default=None, help="one 'name: outcome' per line")
    parser.add_argument("--cuda", type=int, choices=(0, 1), required=True, help="whether CUDA was available")
    parser.add_argument("--elapsed-s", type=float, default=None, help="the GPU run's wall time so far")
    parser.add_argument("--progressive", type=Path, default=None, help="benchmarks.progressive's JSON, if it ran")
    args = parser.parse_args(argv)

    path = args.out / f"{args.profile}.json"
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        report = {"profile": args.profile, "device": "?", "machine": {"cpus": "?"}, "load_avg_before": ["?"]}
        report |= {"commit": "?", "date": "?", "workloads": {}, "notes": [f"no benchmark results ({exc})"]}
        report |= {"wall_s": 0.0}
    report["cuda_tests"] = cuda_tests(args.junit)
    try:
        compiled = json.loads(args.compile.read_text())
        report["compile"] = compiled.get("models", {})
        report["notes"] = report.get("notes", []) + [f"compile: {n}" for n in compiled.get("notes", [])]
    except (OSError, ValueError):
        report["compile"] = {}
        report["notes"] = [*report.get("notes", []), "compile: no results (the step did not finish a model)"]
    report["steps"] = args.steps.read_text().splitlines() if args.steps and args.steps.is_file() else []
    report["gpu_run_elapsed_s"] = args.elapsed_s
    report["summary"] = summarize(report)
    status, reasons = verdict(report, bool(args.cuda))
    report["verdict"] = {"exit_status": status, "reasons": reasons}

    lines = [table(report), "", *test_lines(report["cuda_tests"], bool(args.cuda)), ""]
    lines += progressive_lines(report, args.progressive)
    lines += ["steps:", *[f"  {s}" for s in report["steps"]]]
    if args.elapsed_s is not None:
        lines.append(f"gpu_run.sh: {args.elapsed_s:.0f} s until the summary")
    lines.append(f"verdict: exit {status}" + (": " + "; ".join(reasons) if reasons else ": every step passed"))
    text = "\n".join(lines)
    for name, body in ((f"{args.profile}.json", json.dumps(report, indent=2)), (f"{args.profile}.md", text + "\n")):
        partial = args.out / (name + ".partial")
        partial.write_text(body)
        partial.replace(args.out / name)
    files = sorted(p.name for p in args.out.iterdir())
    if len(files) > RESULT_FILES_MAX:
        text += f"\nwarning: {len(files)} files in {args.out} (at most {RESULT_FILES_MAX} come back): {files}"
    print(text)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
