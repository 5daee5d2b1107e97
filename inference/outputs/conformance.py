"""The DICOM conformance gate: dicom3tools' dciodvfy on every SR and SEG, PixelMed's DicomSRValidator on every SR.

Both are external programs (Debian packages dicom3tools and pixelmed-apps with a Java runtime); ``.ci/run``
installs them and the tests run them on the objects radserve writes (0 errors; the remaining warnings are listed
and justified in docs/conformance.md, and :data:`EXPECTED_WARNINGS` holds their patterns so that a new warning fails
the tests). PixelMed's validator needs the JDK's XPath limits lifted, or it aborts on large templates.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
PIXELMED_COMMAND = (
    "java",
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
    "-cp",
    str(PIXELMED_JAR),
    "com.pixelmed.validate.DicomSRValidator",
)

# Warnings the validators give on radserve's objects, each justified in docs/conformance.md.
EXPECTED_WARNINGS: dict[str, tuple[re.Pattern[str], ...]] = {
    "dciodvfy": (
        # IHE AIR's Device UID in the algorithm's Contributing Equipment item: dicom3tools' 2022 tables predate it.
        re.compile(r"Attribute is not present in standard DICOM IOD - \(0x0018,0x1002\) UI Device UID"),
        re.compile(r"Dicom dataset contains attributes not present in standard DICOM IOD - this is a Standard Ext"),
        # A source without PatientID, StudyDate, StudyTime or StudyID: carried empty (Type 2), never invented.
        re.compile(
            r"Missing attribute or value that would be needed to build DICOMDIR - (Patient ID|Study (Date|Time|ID))"
        ),
        # The private coding schemes, declared in the Coding Scheme Identification Sequence.
        re.compile(r"Unrecognized defined term <99(IHE|RADSERVE)> for value 1 of attribute <Coding Scheme Designator>"),
    ),
    "pixelmed": (
        # TID 4019 Algorithm Identification in TID 1410/1411 groups: PixelMed's 2022 template tables lack the row.
        re.compile(r'\(11100[0-3],DCM,"Algorithm (Family|Name|Parameters|Version)"\): Content Item not in template'),
        # The Geometric purpose of region of a group that PixelMed checks against no template.
        re.compile(r'\(130400,DCM,"Geometric purpose of region"\): Content Item not in template'),
        # highdicom writes the current standard's code meaning; PixelMed's 2022 tables have another capitalisation.
        re.compile(r'\(121232,DCM,"Source Series for Segmentation"\) has different code meaning'),
    ),
}


@dataclass(frozen=True)
class ValidatorReport:
    """One validator's verdict on one file: its error and warning lines."""

    tool: str
    errors: list[str]
    warnings: list[str]

    def unexpected_warnings(self) -> list[str]:
        """The warnings that :data:`EXPECTED_WARNINGS` does not justify."""
        expected = EXPECTED_WARNINGS.get(self.tool, ())
        return [line for line in self.warnings if not any(pattern.search(line) for pattern in expected)]


def dciodvfy_available() -> bool:
    return shutil.which("dciodvfy") is not None


def pixelmed_available() -> bool:
    return shutil.which("java") is not None and PIXELMED_JAR.is_file()


def dciodvfy(path: Path, timeout_s: float = 120.0) -> ValidatorReport:
    """dciodvfy's Error and Warning lines for one DICOM file."""
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=timeout_s)
    lines = (result.stdout + result.stderr).splitlines()
    return ValidatorReport(
        "dciodvfy",
        [line for line in lines if line.startswith("Error")],
        [line for line in lines if line.startswith("Warning")],
    )


def pixelmed_sr(path: Path, timeout_s: float = 300.0) -> ValidatorReport:
    """PixelMed DicomSRValidator's Error and Warning lines for one SR file (one Java process per file)."""
    result = subprocess.run([*PIXELMED_COMMAND, str(path)], capture_output=True, text=True, timeout=timeout_s)
    lines = (result.stdout + result.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    if result.returncode != 0 or not any("Root Template Validation Complete" in line for line in lines):
        errors.append(f"DicomSRValidator did not complete (exit status {result.returncode}): {lines[-3:]}")
    return ValidatorReport("pixelmed", errors, [line for line in lines if line.startswith("Warning")])
