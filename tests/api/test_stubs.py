"""The committed gRPC stubs must match proto/: regenerate into a temporary folder and compare."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "tools" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_stubs_are_up_to_date(tmp_path):
    generated = _load_generator().generate(tmp_path)
    assert generated, "no stubs generated"
    committed_root = ROOT / "inference" / "api" / "gen"
    for path in generated:
        committed = committed_root / path.relative_to(tmp_path)
        assert committed.is_file(), f"{committed} is missing: run `make proto`"
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run `make proto`"
