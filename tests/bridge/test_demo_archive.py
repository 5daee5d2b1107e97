"""`make demo-archive` (tools/demo_archive.py): Orthanc, radserve and the bridge, and the study's URL at the end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from inference.bridge.orthanc import orthanc_available

pytestmark = pytest.mark.server  # every test here starts a server (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(not orthanc_available(), reason="Orthanc with its DICOMweb plugin is not installed")
def test_demo_archive_prints_the_study_with_its_sr_and_seg(model_repo, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "demo_archive.py"), "--exit",
         "--models", str(model_repo("lung_nodule_ct")), "--workdir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(
        r"the study in Orthanc: +http://127\.0\.0\.1:\d+/app/explorer\.html#study\?uuid=[0-9a-f-]+", result.stdout
    )
    assert "series: CT x1, SEG x1, SR x1" in result.stdout
    # Each planted nodule's line shows the nearest finding of the archived SR beside it, within 3 mm.
    rows = [line for line in result.stdout.splitlines() if line.strip().startswith("[")]
    assert len(rows) == 3, result.stdout
    for row in rows:
        planted, found = (np.array(m.split(","), dtype=float) for m in re.findall(r"\[([^\]]+)\]", row))
        assert np.linalg.norm(planted - found) <= 3.0, row
