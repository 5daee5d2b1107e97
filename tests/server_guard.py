"""What counts as starting a server, for the test-tier guard of tests/conftest.py (a module of its own, so that
tests/test_tiers.py can import it whatever other conftest.py files are on the path)."""

from __future__ import annotations

import os
from collections.abc import Sequence


def starts_a_server(args: str | Sequence[object]) -> bool:
    """Whether a child process with these arguments is (or starts) a server: `radserve serve`, `radserve triton serve`,
    `radserve soak --spawn`, a benchmark run, the archive demo, Orthanc or Triton."""
    words = [str(a) for a in ([args] if isinstance(args, str | os.PathLike) else args)]
    names = {os.path.basename(w) for w in words}
    radserve = "inference.cli" in words or "radserve" in names
    return (
        (radserve and ("serve" in words or "--spawn" in words))
        or "benchmarks.run" in words
        or any(w.endswith("demo_archive.py") for w in words)
        or bool(names & {"Orthanc", "tritonserver"})
    )
