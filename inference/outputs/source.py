"""What a derived object (SR, SEG) takes from its source study: patient and study attributes, carried, never invented.

The SR and SEG join the source's study, so they copy its Patient and General Study attributes (highdicom copies
the modules from the first source dataset it is given). Archives send studies that lack some of them (anonymised
data drops PatientSex, ReferringPhysicianName, AccessionNumber, StudyID...) or carry values a derived object
cannot repeat. :func:`patient_study_header` prepares a copy of the source header that every builder uses:

* each Type 2 attribute of those modules (``PATIENT_STUDY_TYPE2``) is present, empty when the source lacks it:
  DICOM's "unknown", never a made-up value;
* a DA, TM or DT value that does not parse is copied as empty (the read is not failed for it);
* PatientSex outside its enumerated values (M, F, O) is copied as empty;
* PatientOrientation, which a projection X-ray SEG must carry (Type 2C in its General Image module), is kept
  when it holds two valid values, else empty.

Nothing from the header is ever logged or put into an exception message.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

from pydicom.dataset import Dataset
from pydicom.valuerep import DA, DT, TM

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
_DATES_TIMES = (
    ("PatientBirthDate", DA),
    ("PatientBirthTime", TM),
    ("StudyDate", DA),
    ("StudyTime", TM),
    ("SeriesDate", DA),
    ("SeriesTime", TM),
    ("AcquisitionDateTime", DT),
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
    for keyword in PATIENT_STUDY_TYPE2:
        if keyword not in out or out[keyword].value is None:
            setattr(out, keyword, "")
    for keyword, parse in _DATES_TIMES:
        value = out.get(keyword)
        if not value:
            continue
        try:
            if parse(str(value)) is None:
                raise ValueError("empty")
        except (TypeError, ValueError, OverflowError):
            setattr(out, keyword, "")
    if str(out.get("PatientSex", "")).strip().upper() not in _PATIENT_SEX:
        out.PatientSex = ""
    out.PatientOrientation = patient_orientation(header)
    return out


def patient_orientation(header: Dataset | None) -> list[str] | str:
    """The header's PatientOrientation when it is two valid values, else empty (Type 2: unknown)."""
    value = header.get("PatientOrientation") if header is not None else None
    multiple = isinstance(value, Sequence) and not isinstance(value, str)
    values = [str(v).strip().upper() for v in value] if multiple else []
    if len(values) == 2 and all(_ORIENTATION.match(v) for v in values):
        return values
    return ""


def fit_source_datasets(datasets: Sequence[Dataset]) -> list[Dataset]:
    """The source datasets for a SEG, each with the patient and study attributes of :func:`patient_study_header`.

    highdicom copies the Patient and Study modules from the first one and fails on an absent Type 2 attribute; the
    others are given the same values so that they agree with it. The inputs are not modified.
    """
    replaced = (*PATIENT_STUDY_TYPE2, "PatientBirthTime", "SeriesDate", "SeriesTime")
    fitted = []
    for ds in datasets:
        header = patient_study_header(ds)
        fixed = Dataset()  # a new dataset sharing the elements it does not replace (pydicom's copies share them all)
        for element in ds:
            if element.keyword not in replaced:
                fixed.add(element)
        for keyword in replaced:
            if keyword in header:
                setattr(fixed, keyword, header[keyword].value)
        fitted.append(fixed)
    return fitted
