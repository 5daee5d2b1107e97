"""The coded concepts of radserve's DICOM and FHIR outputs: standard codes wherever one exists.

SNOMED CT (SCT) for findings, sites and measurements, DCM for DICOM's own concepts, LOINC (LN) for the procedure
(the values of context group CID 100 "Quantitative Diagnostic Imaging Procedures", which TID 1500 requires), UCUM
for units. Two private coding schemes remain, each declared in the Coding Scheme Identification Sequence of the
object that uses it (``coding_schemes``):

* ``99IHE``: IHE AI Results' trial-implementation code (Newcode1, 99IHE, "Processing Algorithm") for the Purpose of
  Reference of the algorithm's Contributing Equipment item; DICOM has not assigned a standard code for it yet.
* ``99RADSERVE``: a model label that no table here maps to a standard concept (``local_label_code``). The bundled
  models' labels (nodule, lesion, opacity) never use it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

LOCAL_SCHEME = "99RADSERVE"
IHE_SCHEME = "99IHE"
_MAX_LO = 64

# Finding type (DCM 121071 "Finding"; in a SEG the segmented property type) by model label.
FINDING_TYPE_BY_LABEL: dict[str, Code] = {
    "nodule": codes.SCT.Nodule,  # 27925004
    "lung_nodule": codes.SCT.Nodule,
    "mass": codes.SCT.Mass,  # 4147007
    "lesion": codes.SCT.Lesion,  # 52988006
    "tumor": codes.SCT.Neoplasm,  # 108369006
    "tumour": codes.SCT.Neoplasm,
    "neoplasm": codes.SCT.Neoplasm,
    "metastasis": codes.SCT.Metastasis,  # 128462008
    "cyst": codes.SCT.Cyst,  # 367643001
    "hemorrhage": codes.SCT.Hemorrhage,  # 50960005
    "haemorrhage": codes.SCT.Hemorrhage,
    "hematoma": codes.SCT.Hematoma,  # 35566002
    "edema": codes.SCT.Edema,  # 79654002
    "pneumothorax": codes.SCT.Pneumothorax,  # 36118008
    "pleural_effusion": codes.SCT.PleuralEffusion,  # 60046008
    "effusion": codes.SCT.PleuralEffusion,
    "cardiomegaly": codes.SCT.Cardiomegaly,  # 287272002
    "lymphadenopathy": codes.SCT.Lymphadenopathy,  # 30746006
    "aneurysm": codes.SCT.Aneurysm,  # 85659009
    "pulmonary_embolism": codes.SCT.PulmonaryEmbolism,  # 59282003
    # Chest radiograph findings: DCM's chest CAD concepts (CID 6102 "Types of Finding"); SNOMED CT has no
    # "opacity" of a radiograph.
    "opacity": codes.DCM.Opacity,  # 112001
    "ground_glass_opacity": codes.DCM.GroundGlassOpacity,  # 112120
}

# Finding site (SCT 363698007) by (modality, label); "*" matches any modality. No entry: no site item (better
# none than a wrong one, e.g. a CT "mass" may be anywhere). MR lesion labels are taken as brain lesions, the MR
# models radserve is built for; add rows when a model covers another body part.
FINDING_SITE_BY_MODALITY_LABEL: dict[tuple[str, str], Code] = {
    ("CT", "nodule"): codes.SCT.Lung,  # 39607008
    ("CR", "nodule"): codes.SCT.Lung,  # chest radiograph
    ("DX", "nodule"): codes.SCT.Lung,
    ("CR", "opacity"): codes.SCT.Lung,
    ("DX", "opacity"): codes.SCT.Lung,
    ("*", "lung_nodule"): codes.SCT.Lung,
    ("*", "pulmonary_embolism"): codes.SCT.Lung,
    ("*", "ground_glass_opacity"): codes.SCT.Lung,
    ("*", "pneumothorax"): codes.SCT.Pleura,  # 3120008
    ("*", "pleural_effusion"): codes.SCT.Pleura,
    ("*", "effusion"): codes.SCT.Pleura,
    ("*", "cardiomegaly"): codes.SCT.Heart,  # 80891009
    ("MR", "lesion"): codes.SCT.Brain,  # 12738006
    ("MR", "tumor"): codes.SCT.Brain,
    ("MR", "tumour"): codes.SCT.Brain,
    ("MR", "metastasis"): codes.SCT.Brain,
    ("MR", "hemorrhage"): codes.SCT.Brain,
    ("MR", "haemorrhage"): codes.SCT.Brain,
    ("MR", "edema"): codes.SCT.Brain,
}

# Procedure reported (TID 1500 row 4, from CID 100) by modality. PixelMed's validator checks the context group:
# SCT 77477000 "Computed tomography", used before, is not in it. Projection X-ray gets CID 100's generic "Imaging
# procedure": LOINC 43468-8 "XR unspecified body region" joined CID 100 after the CID 100 of the PixelMed release
# that Debian ships (2022), which reports it as an error (docs/decisions.md, "DICOM conformance gate").
PROCEDURE_BY_MODALITY: dict[str, Code] = {
    "CT": codes.cid100.CTUnspecifiedBodyRegion,  # LN 25045-6
    "MR": codes.cid100.MRIUnspecifiedBodyRegion,  # LN 25056-3
    "CR": codes.cid100.ImagingProcedure,  # SCT 363679005
    "DX": codes.cid100.ImagingProcedure,
}
DEFAULT_PROCEDURE = codes.cid100.ImagingProcedure  # SCT 363679005

# Segmented property category of a SEG segment: abnormalities, or anatomy for organ labels.
ABNORMAL = codes.cid7150.MorphologicallyAbnormalStructure  # SCT 49755003
ANATOMY = codes.cid7150.AnatomicalStructure  # SCT 91723000
ANATOMY_BY_LABEL: dict[str, Code] = {
    "lung": codes.SCT.Lung,  # 39607008
    "brain": codes.SCT.Brain,  # 12738006
    "liver": codes.SCT.Liver,  # 10200004
    "spleen": codes.SCT.Spleen,  # 78961009
    "kidney": codes.SCT.Kidney,  # 64033007
    "heart": codes.SCT.Heart,  # 80891009
}

# Measurements and qualifiers (TID 1419 / TID 300).
DIAMETER = codes.SCT.Diameter  # 81827009
VOLUME = codes.SCT.Volume  # 118565006
LONGEST = codes.SCT.Maximum  # 56851009, derivation of the diameter
CERTAINTY_OF_FINDING = codes.DCM.CertaintyOfFinding  # 111012, the model's score x 100
NO_FINDING = codes.SCT.None_  # 260413007
UNIT_MM = Code("mm", "UCUM", "millimeter")
UNIT_ML = Code("ml", "UCUM", "milliliter")
UNIT_PERCENT = Code("%", "UCUM", "percent")

# Geometric purpose of a region (CID 219), telling the groups of one finding apart. "Center" also for a segmented
# region's centroid: DCM 128138 "Center of Mass" joined CID 219 after the release PixelMed's validator checks against.
OUTLINE = codes.DCM.Outline  # 111041
CENTER = codes.DCM.Center  # 111010

# IHE AI Results (Rev. 1.1, trial implementation): Purpose of Reference of the algorithm's Contributing Equipment.
PROCESSING_ALGORITHM = Code("Newcode1", IHE_SCHEME, "Processing Algorithm")
ARTIFICIAL_INTELLIGENCE = codes.cid7162.ArtificialIntelligence  # DCM 123110, the algorithm family


def finding_type_code(label: str) -> Code:
    """The coded finding type of a model label: the table's standard concept, else a 99RADSERVE local code."""
    known = FINDING_TYPE_BY_LABEL.get(label.lower())
    if known is not None:
        return known
    return local_label_code(label)


def local_label_code(label: str) -> Code:
    """The 99RADSERVE code of a label that no standard code in the tables covers.

    CodeValue = the label upper-cased with every character outside [A-Z0-9] replaced by "_" (up to 64
    characters; over 16 it is stored as LongCodeValue), CodeMeaning = the label.
    """
    value = re.sub(r"[^A-Z0-9]", "_", label.upper())[:_MAX_LO] or "UNLABELLED"
    return Code(value, LOCAL_SCHEME, (label or "unlabelled")[:_MAX_LO])


def finding_site_code(modality: str, label: str) -> Code | None:
    key = label.lower()
    return FINDING_SITE_BY_MODALITY_LABEL.get((modality.upper(), key)) or FINDING_SITE_BY_MODALITY_LABEL.get(("*", key))


def procedure_code(modality: str) -> Code:
    """The Procedure reported of a study of ``modality``, from CID 100."""
    return PROCEDURE_BY_MODALITY.get(modality.upper(), DEFAULT_PROCEDURE)


def segment_codes(label: str) -> tuple[Code, Code]:
    """(SegmentedPropertyCategory, SegmentedPropertyType) of a label: an organ's anatomy, else the finding type
    (a 99RADSERVE type for an unknown label) as a morphologically abnormal structure."""
    organ = ANATOMY_BY_LABEL.get(label.lower())
    if organ is not None:
        return ANATOMY, organ
    return ABNORMAL, finding_type_code(label)


def coding_schemes(used: Iterable[Code]) -> list[CodingSchemeIdentificationItem]:
    """The Coding Scheme Identification items that declare the private schemes among ``used``."""
    designators = {code.scheme_designator for code in used}
    items = []
    if IHE_SCHEME in designators:
        items.append(
            CodingSchemeIdentificationItem(
                designator=IHE_SCHEME,
                name="IHE Radiology Technical Framework trial implementation codes",
                responsible_organization="IHE International",
            )
        )
    if LOCAL_SCHEME in designators:
        items.append(
            CodingSchemeIdentificationItem(
                designator=LOCAL_SCHEME,
                name="radserve local codes for model labels without a standard code",
                responsible_organization="radserve",
            )
        )
    return items
