"""Bridge settings: bounds checked at construction (the message quotes the value), YAML rules, flags over YAML."""

from __future__ import annotations

from pathlib import Path

import pytest

from inference.bridge.config import BridgeConfig, PriorityRule, load_bridge_config
from inference.bridge.journal import ROUTINE, STAT

BASE = {"dicomweb_url": "http://127.0.0.1:8042/dicom-web", "server": "127.0.0.1:50051", "state_dir": "/tmp/state"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"dicomweb_url": "ftp://archive/dicom-web"}, "dicomweb_url must be an http:// or https:// URL, got 'ftp:"),
        ({"server": "radserve"}, "server must be HOST:PORT, got 'radserve'"),
        ({"poll_s": 0.0}, "poll_s must be in [0.1, 3600.0], got 0.0"),
        ({"concurrency": 0}, "concurrency must be an integer in [1, 64], got 0"),
        ({"concurrency": 2.5}, "concurrency must be an integer in [1, 64], got 2.5"),
        ({"page_size": 10, "page_overlap": 10}, "page_overlap must be in [0, page_size), got 10"),
        ({"retry_backoff_s": 10.0, "retry_max_backoff_s": 5.0}, "retry_max_backoff_s (5.0) must be >= retry_backoff_s"),
        ({"cert": Path("c.pem")}, "a client certificate needs both cert and key"),
    ],
)
def test_bounds_are_checked_and_quoted(override, message):
    with pytest.raises(ValueError) as info:
        BridgeConfig(**{**BASE, **override})
    assert message in str(info.value)


def test_secrets_are_not_in_repr():
    config = BridgeConfig(**BASE, token="s3cret-radserve", dicomweb_token="s3cret-archive")
    assert "s3cret" not in repr(config)


def test_yaml_rules_and_flags(tmp_path):
    path = tmp_path / "bridge.yaml"
    path.write_text(
        "poll_s: 5\nconcurrency: 3\n"
        "priority:\n"
        "  - {attribute: StudyDescription, match: 'stroke|code stroke'}\n"
        "  - {attribute: RequestPriority, match: '^(STAT|HIGH)$', priority: STAT}\n"
        "series: {min_slices: 4, exclude_modalities: [SR, SEG, KO, PR, OT]}\n"
    )
    config = load_bridge_config({**BASE, "concurrency": 4, "poll_s": None}, config_file=path)
    assert (config.poll_s, config.concurrency) == (5, 4)  # the flag wins, an unset flag leaves the YAML value
    assert [r.attribute for r in config.priority] == ["StudyDescription", "RequestPriority"]
    assert config.series.min_slices == 4 and "OT" in config.series.exclude_modalities
    assert config.state_dir == Path("/tmp/state")


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("priority: [{attribute: StudyDescriptio, match: x}]\n", "'StudyDescriptio' is not a DICOM keyword"),
        ("priority: [{attribute: StudyDescription, match: '('}]\n", "bad regular expression '('"),
        ("priority: [{attribute: StudyDescription, match: x, priority: URGENT}]\n", "got 'URGENT'"),
        ("priority: [{attribute: StudyDescription, match: x, when: now}]\n", "priority rule 0 must be a mapping"),
        ("series: {min_slice: 3}\n", "unknown series setting(s) ['min_slice']"),
        ("pol_s: 3\n", "unknown bridge setting(s) ['pol_s']"),
    ],
)
def test_bad_yaml_is_refused_naming_the_setting(tmp_path, yaml_text, message):
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValueError) as info:
        load_bridge_config(BASE, config_file=path)
    assert message in str(info.value)


def test_required_settings_name_their_flag():
    with pytest.raises(ValueError, match="--dicomweb is required"):
        load_bridge_config({"server": "127.0.0.1:1", "state_dir": "/tmp/s"})


def test_priority_rule_matching():
    from inference.bridge.service import Bridge

    rule = PriorityRule("StudyDescription", r"\bstroke\b")
    assert rule.matches(["CT HEAD CODE STROKE"]) and not rule.matches(["CT chest"])
    priority = Bridge.study_priority
    holder = type("Holder", (), {"config": BridgeConfig(**BASE, priority=(rule,))})()
    assert priority(holder, {"00081030": {"vr": "LO", "Value": ["Code Stroke protocol"]}}) == STAT
    assert priority(holder, {"00081030": {"vr": "LO", "Value": ["Chest routine"]}}) == ROUTINE
    assert priority(holder, {}) == ROUTINE
