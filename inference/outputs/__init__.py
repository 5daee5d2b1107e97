"""What a read returns besides findings: a DICOM SR measurement report, a DICOM SEG, and the JSON contract.

* ``build_measurement_report`` (sr.py): findings -> Comprehensive 3D SR, TID 1500, IHE AI Results.
* ``build_segmentation`` (seg.py): one BINARY SEG segment per finding, its voxels.
* regions.py: each finding's voxels (the model's mask, or its box rendered) and outline on the source images.
* algorithm.py, codes.py, source.py, uids.py: the algorithm's identification, the coded concepts, the patient and
  study attributes taken from the source, and the derived UIDs (the same read gives the same UIDs).
* ``validate_findings_json`` (validate.py): checks a ``read --format json`` object against
  ``findings.schema.json`` (JSON Schema draft 2020-12, shipped in this package).
* ``encode_dataset``: any of the DICOM objects -> Part 10 file bytes for the response.
"""

from __future__ import annotations

import copy
from io import BytesIO

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from inference.outputs.algorithm import Algorithm
from inference.outputs.seg import build_segmentation
from inference.outputs.sr import build_measurement_report
from inference.outputs.validate import load_findings_schema, validate_findings_json


def encode_dataset(ds: Dataset) -> bytes:
    """``ds`` as DICOM Part 10 bytes (preamble, file meta), explicit VR little endian.

    Uncompressed datasets (highdicom's SR and BINARY SEG are) are written explicit VR little endian whatever
    their file meta said; an encapsulated (compressed) dataset keeps its transfer syntax. ``ds`` is not
    modified.
    """
    out = copy.copy(ds)  # shallow: only the file meta differs
    old_meta = getattr(ds, "file_meta", None)
    meta = copy.deepcopy(old_meta) if old_meta is not None else FileMetaDataset()
    syntax = meta.get("TransferSyntaxUID")
    meta.TransferSyntaxUID = syntax if syntax is not None and UID(syntax).is_encapsulated else ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out.file_meta = meta
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, out, enforce_file_format=True)
    return buffer.getvalue()


__all__ = [
    "Algorithm",
    "build_measurement_report",
    "build_segmentation",
    "encode_dataset",
    "load_findings_schema",
    "validate_findings_json",
]
