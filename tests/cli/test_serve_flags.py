"""`radserve serve`'s flags come from the settings' dataclasses (field metadata): the names operators and scripts rely
on (DESIGN.md, README "Configuration") exist, and each flag given reaches the ServerConfig the server starts with."""

from __future__ import annotations

from pathlib import Path

from inference.cli import build_parser
from inference.cli.serve import flag_values
from inference.config import cli_settings, load_config

# README "Configuration" and DESIGN.md: names kept across releases.
DOCUMENTED = [
    "--host",
    "--port",
    "--models",
    "--device",
    "--backend",
    "--triton-url",
    "--health-port",
    "--config",
    "--grace-s",
    "--log-level",
    "--max-in-flight",
    "--max-reads-per-client",
    "--memory-budget-gb",
    "--decode-workers",
    "--decode-timeout-s",
    "--upload-first-chunk-timeout-s",
    "--upload-min-bytes-per-s",
    "--tls-cert",
    "--tls-key",
    "--tls-client-ca",
    "--auth-tokens",
    "--insecure",
    "--metrics-port",
    "--log-format",
    "--model-poll-interval-s",
    "--default-model",
    "--oom-cpu-fallback",
    "--no-oom-cpu-fallback",
    "--compile",
    "--no-compile",
]


def _serve_parser():
    parser = build_parser(["serve"])
    return next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "serve")[1]


def test_the_documented_serve_flags_exist():
    flags = {option for action in _serve_parser()._actions for option in action.option_strings}
    assert set(DOCUMENTED) - flags == set()
    assert {s.flag for s in cli_settings()} <= flags


def test_each_flag_given_reaches_the_server_config(tmp_path):
    argv = ["serve", "--host", "0.0.0.0", "--port", "50123", "--models", str(tmp_path), "--device", "cpu"]
    argv += ["--backend", "triton", "--triton-url", "triton.local:9001", "--grace-s", "5", "--log-format", "json"]
    argv += ["--max-in-flight", "7", "--decode-workers", "0", "--upload-min-bytes-per-s", "1000", "--insecure"]
    argv += ["--no-oom-cpu-fallback", "--compile", "--default-model", "MR=brain_x", "--default-model", "CT="]
    argv += ["--tls-cert", "c.pem", "--tls-key", "k.pem", "--metrics-port", "0", "--health-port", "50124"]
    config = load_config(flag_values(build_parser(argv).parse_args(argv)), environ={})
    assert (config.host, config.port, config.models, config.device) == ("0.0.0.0", 50123, Path(tmp_path), "cpu")
    assert (config.backend, config.triton.url, config.grace_s, config.log_format) == (
        "triton",
        "triton.local:9001",
        5.0,
        "json",
    )
    assert (config.max_in_flight, config.decode_workers, config.upload_min_bytes_per_s) == (7, 0, 1000.0)
    assert (config.insecure, config.oom_cpu_fallback, config.compile) == (True, False, True)
    assert config.default_models["MR"] == "brain_x" and "CT" not in config.default_models
    assert (config.tls_cert, config.tls_key, config.metrics_port, config.health_port) == ("c.pem", "k.pem", 0, 50124)


def test_flags_not_given_leave_the_environment_and_defaults_alone():
    argv = ["serve"]
    values = flag_values(build_parser(argv).parse_args(argv))
    assert set(values.values()) == {None}
    config = load_config(values, environ={"RADSERVE_PORT": "50200"})
    assert (config.port, config.max_in_flight, config.oom_cpu_fallback) == (50200, 64, True)


def test_client_commands_build_no_serve_flags():
    """Building the parser for any other command leaves the server's settings unimported (a client-only install)."""
    parser = build_parser(["read", "x"])
    serve = parser._subparsers._group_actions[0].choices["serve"]
    assert [a.dest for a in serve._actions] == ["help"]
