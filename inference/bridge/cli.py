"""``radserve bridge``: run the bridge, ``bridge status``: the journal by state, ``bridge retry``: requeue a study.

Kept apart from ``inference/cli/`` so that the thin install (``radserve[client]``) runs it without the server's
modules; ``inference/cli/tools.py`` only registers the parser and calls :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    bridge = sub.add_parser(
        "bridge",
        help="connect a DICOMweb archive: read every new study, store the SR and SEG into it, exactly once",
        description="Polls the archive (QIDO-RS), reads each study once it is quiet (WADO-RS -> radserve "
        "ReadStreamed) and stores the results into the same study (STOW-RS); the journal in --state makes it "
        "resume after a crash without losing or duplicating anything. Settings: flags > --config YAML > defaults.",
    )
    bridge.add_argument("--dicomweb", dest="dicomweb_url", default=None, help="the archive's DICOMweb root URL")
    bridge.add_argument(
        "--dicomweb-token",
        default=None,
        help="bearer token for the archive (default: the RADSERVE_DICOMWEB_TOKEN environment variable)",
    )
    bridge.add_argument(
        "--dicomweb-token-file",
        type=Path,
        default=None,
        help="a file holding the archive's bearer token, read "
        "again when it changes (short-lived OAuth tokens refreshed by another process)",
    )
    bridge.add_argument("--dicomweb-ca", type=Path, default=None, help="CA bundle (PEM) of an HTTPS archive")
    bridge.add_argument("--server", default=None, help="HOST:PORT of radserve")
    bridge.add_argument("--ca", type=Path, default=None, help="CA certificate (PEM) of radserve: use TLS")
    bridge.add_argument("--tls-cert", dest="cert", type=Path, default=None, help="client certificate (mutual TLS)")
    bridge.add_argument("--tls-key", dest="key", type=Path, default=None, help="client private key (mutual TLS)")
    bridge.add_argument("--token", default=None, help="radserve bearer token (default: RADSERVE_TOKEN)")
    bridge.add_argument("--state", dest="state_dir", type=Path, default=None, help="state directory (journal)")
    bridge.add_argument("--config", type=Path, default=None, help="YAML settings: priority and series rules, ...")
    bridge.add_argument("--poll-s", type=float, default=None, help="seconds between polls of the archive (10)")
    bridge.add_argument("--stable-s", type=float, default=None, help="read a study quiet for this long (30)")
    bridge.add_argument("--concurrency", type=int, default=None, help="studies in progress at once (2)")
    bridge.add_argument(
        "--lookback-days", type=int, default=None, help="list only studies of the last N days (0: all; default 0)"
    )
    bridge.add_argument("--read-timeout-s", type=float, default=None, help="deadline of one read (900)")
    bridge.add_argument("--max-attempts", type=int, default=None, help="attempts of a retriable failure (20)")
    bridge.add_argument("--retry-backoff-s", type=float, default=None, help="first back-off, doubled after each (5)")
    bridge.add_argument("--retry-max-backoff-s", type=float, default=None, help="longest back-off (300)")
    bridge.add_argument("--grace-s", type=float, default=None, help="SIGTERM: time for studies in progress (30)")
    bridge.add_argument("--metrics-port", type=int, default=None, help="Prometheus metrics port (9465; 0: off)")
    bridge.add_argument("--metrics-host", default=None, help="address of the metrics port (127.0.0.1)")
    bridge.add_argument("--log-level", default="INFO", help="DEBUG|INFO|WARNING|ERROR")
    bridge.add_argument("--log-format", default="text", choices=["text", "json"])
    commands = bridge.add_subparsers(dest="bridge_command", required=False)
    status = commands.add_parser("status", help="studies by state (hashed UIDs), with each failure's status")
    status.add_argument("--state", dest="state_dir", type=Path, required=True, help="the bridge's state directory")
    status.add_argument("--all", action="store_true", help="list stored and skipped studies too")
    status.add_argument("--format", choices=["table", "json"], default="table")
    retry = commands.add_parser("retry", help="requeue a study (failed, skipped or stored) to be worked on again")
    retry.add_argument("--state", dest="state_dir", type=Path, required=True, help="the bridge's state directory")
    retry.add_argument("study", help="the study's hash as `status` shows it (6 digits or more), or its UID")


CONFIG_KEYS = (
    "dicomweb_url",
    "dicomweb_token",
    "dicomweb_token_file",
    "dicomweb_ca",
    "server",
    "ca",
    "cert",
    "key",
    "token",
    "state_dir",
    "poll_s",
    "stable_s",
    "concurrency",
    "lookback_days",
    "read_timeout_s",
    "max_attempts",
    "retry_backoff_s",
    "grace_s",
    "metrics_port",
    "metrics_host",
)


def _open_journal(state_dir: Path) -> Any:
    from inference.bridge.journal import Journal

    path = Path(state_dir) / "journal.sqlite3"
    if not path.exists():
        raise FileNotFoundError(f"no bridge journal in {state_dir}")
    return Journal(path)


def _when(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds)) if seconds else "-"


def status(args: argparse.Namespace) -> int:
    from inference.bridge.journal import State

    journal = _open_journal(args.state_dir)
    try:
        counts = journal.state_counts()
        shown = [s for s in journal.studies() if args.all or s.state not in (State.STORED, State.SKIPPED)]
    finally:
        journal.close()
    rows = [
        {
            "study": s.study_hash,
            "state": s.state.value,
            "priority": s.priority_name,
            "attempts": s.attempts,
            "status": s.status,
            "message": s.message,
            "next_attempt": _when(s.next_attempt_at) if s.next_attempt_at else None,
            "updated": _when(s.updated_at),
            "choice": json.loads(s.choice) if s.choice else None,  # what was read and why, what was left out
        }
        for s in shown
    ]
    if args.format == "json":
        print(json.dumps({"counts": counts, "studies": rows}, indent=2))
        return 0
    print("  ".join(f"{state} {count}" for state, count in counts.items()))
    if rows:
        print(f"{'study':<12}  {'state':<10}  {'priority':<8}  {'tries':>5}  {'updated':<20}  status: message")
    for row in rows:
        line = (
            f"{row['study']:<12}  {row['state']:<10}  {row['priority']:<8}  {row['attempts']:>5}  {row['updated']:<20}"
        )
        if row["status"]:
            line += f"  {row['status']}: {row['message'] or ''}"
        if row["next_attempt"] and row["state"] in ("queued", "storing"):
            line += f" (next attempt {row['next_attempt']})"
        print(line)
    return 0


def retry(args: argparse.Namespace) -> int:
    journal = _open_journal(args.state_dir)
    try:
        found = journal.find(args.study)
        if not found:
            print(f"error: no study {args.study!r} in the journal", file=sys.stderr)
            return 1
        if len(found) > 1:
            print(f"error: {args.study!r} names {len(found)} studies; give more digits", file=sys.stderr)
            return 1
        state = journal.requeue(found[0].study_uid)
    finally:
        journal.close()
    print(f"{found[0].study_hash}: {found[0].state.value} -> {state.value}")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        from inference.bridge.config import load_bridge_config
        from inference.bridge.metrics import configure_logging
        from inference.bridge.service import Bridge
    except ModuleNotFoundError as exc:  # `pip install radserve` without the client extra
        print(
            f"error: `radserve bridge` needs the client's dependencies (missing: {exc.name}); "
            "install them with: pip install 'radserve[client]'",
            file=sys.stderr,
        )
        return 2

    cli = {key: getattr(args, key) for key in CONFIG_KEYS}
    cli["token"] = cli["token"] if cli["token"] is not None else os.environ.get("RADSERVE_TOKEN") or None
    if cli["dicomweb_token"] is None and cli["dicomweb_token_file"] is None:
        cli["dicomweb_token"] = os.environ.get("RADSERVE_DICOMWEB_TOKEN") or None
    # Basic auth only from the environment: a password on the command line is visible to every user (ps).
    cli["dicomweb_basic_auth"] = os.environ.get("RADSERVE_DICOMWEB_BASIC_AUTH") or None
    try:
        config = load_bridge_config(cli, config_file=args.config)
        configure_logging(args.log_level, args.log_format)
        bridge = Bridge(config)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: bridge.stop())
    signal.signal(signal.SIGINT, lambda *_: bridge.stop())
    return bridge.run()


def main(args: argparse.Namespace) -> int:
    try:
        if args.bridge_command == "status":
            return status(args)
        if args.bridge_command == "retry":
            return retry(args)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run(args)
