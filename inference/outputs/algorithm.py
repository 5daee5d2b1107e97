"""The algorithm behind a result, identified the way IHE AI Results (AIR) asks, with the same values everywhere.

One :class:`Algorithm` (the model's name, version and weights digest, and radserve's own version) fills:

* the SR's and SEG's Contributing Equipment item with Purpose of Reference (Newcode1, 99IHE, "Processing
  Algorithm"): Manufacturer "radserve", Manufacturer's Model Name = the model's name, Software Versions =
  ["radserve <version>", "<model> <version>"], Device UID = :func:`inference.outputs.uids.device_uid` (the same
  for every read of that model version and weights), Device Serial Number = the first 16 hex digits of the
  weights' SHA-256 (where known);
* TID 4019 "Algorithm Identification" in every SR measurement group: Algorithm Name = the model's name, Algorithm
  Version = its version, Algorithm Family = DCM 123110 "Artificial Intelligence", Algorithm Parameters =
  "weights_sha256=<hex>" (where known);
* each SEG segment's Segment Algorithm Identification: the same name, version, family and parameter, and
  Algorithm Source = "radserve <version>";
* the SR's device observer (TID 1004) and the FHIR Device: the same name and Device UID.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

import inference
from inference.outputs.codes import ARTIFICIAL_INTELLIGENCE, PROCESSING_ALGORITHM
from inference.outputs.uids import device_uid

MANUFACTURER = "radserve"
_MAX_LO = 64
_SHA256 = re.compile(r"^([0-9a-f]{64})?$")


def lo(value: str) -> str:
    """A value cut to DICOM's LO length (64 characters)."""
    return value[:_MAX_LO]


@dataclass(frozen=True)
class Algorithm:
    """The model that produced a read's findings; see the module docstring for where each value goes."""

    name: str
    version: str
    weights_sha256: str = ""  # of the weights file, lower-case hex; "" when unknown (Triton)
    software_version: str = field(default=inference.__version__)  # radserve's

    def __post_init__(self) -> None:
        for what, value in (("name", self.name), ("version", self.version)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"Algorithm.{what} must be a non-empty string, got {value!r}")
        if not _SHA256.match(self.weights_sha256):
            raise ValueError("Algorithm.weights_sha256 must be 64 lower-case hex digits or empty")

    @property
    def device_uid(self) -> str:
        return device_uid(self.name, self.version, self.weights_sha256)

    @property
    def software_versions(self) -> list[str]:
        """radserve's version and the model's, as the Software Versions of the equipment (LO, multi-valued)."""
        return [lo(f"radserve {self.software_version}"), lo(f"{self.name} {self.version}")]

    @property
    def parameters(self) -> dict[str, str]:
        return {"weights_sha256": self.weights_sha256} if self.weights_sha256 else {}

    def sr_identification(self) -> hd.sr.AlgorithmIdentification:
        """TID 4019 Algorithm Identification, for the SR's measurement groups."""
        return hd.sr.AlgorithmIdentification(
            name=lo(self.name),
            version=lo(self.version),
            parameters=[f"{key}={value}" for key, value in self.parameters.items()] or None,
            family=ARTIFICIAL_INTELLIGENCE,
        )

    def seg_identification(self) -> hd.AlgorithmIdentificationSequence:
        """Segment Algorithm Identification, for each SEG segment: the values of :meth:`sr_identification`."""
        return hd.AlgorithmIdentificationSequence(
            name=lo(self.name),
            family=ARTIFICIAL_INTELLIGENCE,
            version=lo(self.version),
            source=lo(f"radserve {self.software_version}"),
            parameters=self.parameters or None,
        )

    def contributing_equipment(self) -> Dataset:
        """The IHE AIR Contributing Equipment item naming the algorithm (Purpose of Reference "Processing
        Algorithm"); appended to the SR's and SEG's Contributing Equipment Sequence."""
        purpose = Dataset()
        purpose.CodeValue = PROCESSING_ALGORITHM.value
        purpose.CodingSchemeDesignator = PROCESSING_ALGORITHM.scheme_designator
        purpose.CodeMeaning = PROCESSING_ALGORITHM.meaning
        item = Dataset()
        item.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
        item.Manufacturer = MANUFACTURER
        item.ManufacturerModelName = lo(self.name)
        item.SoftwareVersions = self.software_versions
        item.DeviceUID = self.device_uid
        if self.weights_sha256:
            item.DeviceSerialNumber = self.weights_sha256[:16]
        item.ContributionDescription = lo(f"AI model {self.name} {self.version} that produced the findings")
        return item


def add_algorithm_equipment(ds: Dataset, algorithm: Algorithm) -> None:
    """Append ``algorithm``'s Contributing Equipment item to ``ds`` (after the source's acquisition equipment and
    highdicom's own item, which highdicom adds)."""
    items = list(ds.get("ContributingEquipmentSequence", []))
    items.append(algorithm.contributing_equipment())
    ds.ContributingEquipmentSequence = DicomSequence(items)
