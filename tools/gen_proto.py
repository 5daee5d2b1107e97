"""Generate the Python gRPC stubs from proto/ into inference/api/gen (``make proto``).

The generated modules import each other as ``radserve.v1...``; they are rewritten to absolute imports
under ``inference.api.gen`` so that no sys.path tricks are needed. tests/api/test_stubs.py runs this into
a temporary directory and fails when the committed stubs differ (stale).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
PACKAGE = "inference.api.gen"


def generate(out_dir: Path) -> list[Path]:
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}"]
    args += [str(p) for p in protos]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    written = []
    for path in sorted(out_dir.rglob("*_pb2*.py")):
        text = path.read_text()
        text = re.sub(r"^from radserve\.", f"from {PACKAGE}.radserve.", text, flags=re.MULTILINE)
        path.write_text(text)
        written.append(path)
    for directory in {out_dir, *(p.parent for p in written), *(q for p in written for q in p.parents)}:
        if directory.is_relative_to(out_dir):
            (directory / "__init__.py").touch()
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "inference" / "api" / "gen")
    generated = generate(parser.parse_args().out)
    print(f"generated {len(generated)} modules", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
