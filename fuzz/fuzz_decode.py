"""Coverage-guided fuzzing (atheris, libFuzzer) of what a client's bytes reach: the DICOM series, NIfTI and RAW
readers and the Read stream assembly (header, chunks, limits, then the reader the header names).

An input's first byte picks the target; the rest is its payload (see :func:`one_input`). Every input must end in a
value or a :class:`~inference.errors.RadserveError` (the gRPC status a client would get); any other exception is a
crash, and so is a run over the time or memory libFuzzer is given. Small limits keep each input fast and bounded.

    python fuzz/fuzz_decode.py fuzz/corpus_work fuzz/corpus -max_total_time=600 -timeout=10 -rss_limit_mb=3072

(copy ``fuzz/corpus`` to a work folder first: libFuzzer adds what it finds to the first folder.) A crash is written to
``crash-<sha1>`` (``-artifact_prefix``); add it to ``fuzz/crashes/`` as a regression case once fixed:
tests/fuzz/test_fuzz.py replays the corpus and every crash on each ``make test``. README "Fuzzing" and RELIABILITY.md
give the runs and their figures.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import atheris

with atheris.instrument_imports(include=["inference", "pydicom", "nibabel"]):
    from fuzz.targets import one_input


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
