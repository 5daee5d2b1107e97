"""What a derived object (SR, SEG) takes from its source study: patient and study attributes, carried, never invented.

The SR and SEG join the source's study, so they copy its Patient and General Study attributes (highdicom copies
the modules from the first source dataset it is given). Archives send studies that lack some of them (anonymised
data drops PatientSex, ReferringPhysicianName, AccessionNumber, StudyID...) or carry values a derived object
cannot repeat. :func:`patient_study_header` prepares a copy of the source header that every builder uses:

* each Type 2 attribute of those modules (``PATIENT_STUDY_TYPE2``) is present, empty when the source lacks it:
  DICOM's "unknown", never a made-up value;
* a patient or study value its VR does not allow (too long, a DA, TM or DT that does not parse, characters outside
  the VR's set: ``pydicom.valuerep.validate_value``) is copied as empty when the attribute is Type 2 here, else
  left out; the read is not failed for it. UIDs are kept as they are: they name the study the objects join;
* PatientSex outside its enumerated values (M, F, O) is copied as empty.

:func:`patient_orientation` gives what a projection X-ray SEG must carry as PatientOrientation (Type 2C in its
General Image module): the source's when it holds two valid values, else empty.

Nothing from the header is ever logged or put into an exception message.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

from pydicom import config
from pydicom.dataset import Dataset
from pydicom.valuerep import validate_value

PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
# The VRs of text, number, date and time values checked against their VR (UIDs, sequences and binary data are not).
_CHECKED_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UT"})
# The study-level attributes (General Study, Patient Study modules) outside the patient group 0x0010 that the
# derived objects copy; image-level attributes are left as the reader accepted them.
_STUDY_LEVEL = frozenset(
    {
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyDescription",
        "StudyID",
        "PhysiciansOfRecord",
        "NameOfPhysiciansReadingStudy",
        "AdmittingDiagnosesDescription",
    }
)
_PATIENT_SEX = frozenset({"M", "F", "O"})
# A patient orientation value: directions from {A, P, R, L, H, F} (quadruped terms included), up to 3 letters each.
_ORIENTATION = re.compile(r"^[APRLHFMDVCGTENB]{1,3}$")


def patient_study_header(header: Dataset | None) -> Dataset:
    """A copy of ``header`` (pixel data excluded) fit to be copied into a derived object; see the module docstring."""
    out = Dataset()
    if header is not None:
        for element in header:
            if element.tag.group in (0x7FE0, 0x0002):  # pixel data, file meta
                continue
            out.add(copy.deepcopy(element))
    for element in list(out):
        copied = element.tag.group == 0x0010 or element.keyword in _STUDY_LEVEL
        if copied and element.VR in _CHECKED_VRS and not _valid(element.VR, element.value):
            if element.keyword in PATIENT_STUDY_TYPE2:
                element.value = ""
            else:
                del out[element.tag]
    for keyword in PATIENT_STUDY_TYPE2:
        if keyword not in out or out[keyword].value is None:
            setattr(out, keyword, "")
    if str(out.get("PatientSex", "")).strip().upper() not in _PATIENT_SEX:
        out.PatientSex = ""
    return out


def _valid(vr: str, value: object) -> bool:
    values = value if isinstance(value, Sequence) and not isinstance(value, str | bytes) else [value]
    try:
        for item in values:
            if item is not None and item != "":
                validate_value(vr, item, config.RAISE)
    except (ValueError, TypeError, OverflowError):
        return False
    return True


def patient_orientation(header: Dataset | None) -> list[str] | str:
    """The header's PatientOrientation when it is two valid values, else empty (Type 2: unknown)."""
    value = header.get("PatientOrientation") if header is not None else None
    multiple = isinstance(value, Sequence) and not isinstance(value, str)
    values = [str(v).strip().upper() for v in value] if multiple else []
    if len(values) == 2 and all(_ORIENTATION.match(v) for v in values):
        return values
    return ""


def fit_source_datasets(datasets: Sequence[Dataset]) -> list[Dataset]:
    """The source datasets for a SEG, each prepared by :func:`patient_study_header` (copies: the inputs are not
    modified). highdicom copies the Patient and Study modules from the first and fails on an absent Type 2
    attribute; all are prepared alike, so that they agree."""
    return [patient_study_header(ds) for ds in datasets]
