"""Deterministic UIDs: valid, reproducible from the documented recipe, the same for the same read, other for another."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import uuid

import highdicom as hd
import pydicom
import pytest

from inference.io.volume import Volume
from inference.outputs import Algorithm, build_measurement_report, build_segmentation
from inference.outputs.regions import finding_masks
from inference.outputs.uids import SEG, SR, DerivedUids, SourceKey, derive_uid, device_uid, is_valid_uid

MODEL = {"model_name": "lung_nodule_ct", "model_version": "1.2.0", "weights_sha256": "ab" * 32}
ALGORITHM = Algorithm("lung_nodule_ct", "1.2.0", "ab" * 32)
DICOM_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def recipe(*parts: str) -> str:
    """The derivation as docs/decisions.md states it, written out again independently of the module."""
    key = json.dumps(["radserve/derived-uid/v1", *parts], separators=(",", ":"), ensure_ascii=True)
    value = int.from_bytes(hashlib.sha256(key.encode("ascii")).digest()[:16], "big")
    value = (value & ~(0xF << 76)) | (0x8 << 76)  # version 8 in bits 76-79
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # variant 0b10 in bits 62-63
    return f"2.25.{value}"


def test_derived_uids_follow_the_documented_recipe_and_are_valid():
    for parts in [(), ("a",), ("a", "b"), ("ab",), ("1.2.3", "x" * 500, "ü")]:
        uid = derive_uid(*parts)
        assert uid == recipe(*parts)
        assert len(uid) <= 64 and DICOM_UID.match(uid) and is_valid_uid(uid)
        parsed = uuid.UUID(int=int(uid.removeprefix("2.25.")))
        assert (parsed.version, parsed.variant) == (8, uuid.RFC_4122)
    assert derive_uid("a", "b") != derive_uid("ab") != derive_uid("a", "b", "")  # parts are delimited
    # Pinned: a change of the recipe would give every redelivered object new UIDs; it must be deliberate.
    assert derive_uid("radserve") == "2.25.85368958382242782310026756331418067962"
    with pytest.raises(TypeError, match="strings"):
        derive_uid("a", 1)  # type: ignore[arg-type]


def test_is_valid_uid_rejects_what_dicom_rejects():
    assert is_valid_uid("1.2.840.10008.1.2.1") and is_valid_uid("2.25.0")
    for bad in ("", "1.02.3", "1..2", "1.2.", ".1", "1.2a", "1." + "1" * 63, None):
        assert not is_valid_uid(bad), bad


def test_uids_derive_from_source_model_and_kind(ct_study):
    volume = ct_study.volume
    source = SourceKey.of(volume)
    assert source is not None and len(source.sop_instance_uids) == 16
    assert list(source.sop_instance_uids) == sorted(ds.SOPInstanceUID for ds in ct_study.datasets)
    uids = DerivedUids(source, **MODEL)
    assert uids.instance(SR) == recipe(*source.parts(), *MODEL.values(), "SR", "instance")
    assert uids.series(SEG) == recipe(*source.parts(), *MODEL.values(), "SEG", "series")
    assert uids.tracking(2) == recipe(*source.parts(), *MODEL.values(), "FINDING", "2")
    all_uids = {uids.series(SR), uids.instance(SR), uids.series(SEG), uids.instance(SEG), uids.tracking(1)}
    assert len(all_uids) == 5

    again = DerivedUids.for_volume(volume, **MODEL)
    assert (again.instance(SR), again.tracking(1)) == (uids.instance(SR), uids.tracking(1))
    for change in ({"model_version": "1.2.1"}, {"weights_sha256": "cd" * 32}, {"model_name": "other"}):
        other = DerivedUids(source, **{**MODEL, **change})
        assert other.instance(SR) != uids.instance(SR) and other.tracking(1) != uids.tracking(1), change
    fewer = dataclasses.replace(source, sop_instance_uids=source.sop_instance_uids[1:])
    assert DerivedUids(fewer, **MODEL).series(SR) != uids.series(SR)

    nifti = Volume(volume.voxels, volume.affine, "CT")
    assert SourceKey.of(nifti) is None
    first, second = DerivedUids.for_volume(nifti, **MODEL), DerivedUids.for_volume(nifti, **MODEL)
    assert not first.deterministic and first.instance(SR) != second.instance(SR)
    assert device_uid("m", "1", "") == derive_uid("device", "m", "1", "") != device_uid("m", "2", "")


def every_uid(ds: pydicom.Dataset) -> list[tuple[str, str]]:
    """(keyword, value) of every UI element of ``ds`` and its sequences, in order."""
    found: list[tuple[str, str]] = []
    ds.walk(lambda _, element: found.append((element.keyword, str(element.value))) if element.VR == "UI" else None)
    return found


def test_sr_and_seg_built_twice_carry_the_same_derived_uids(ct_study):
    volume, findings = ct_study.volume, ct_study.findings
    uids = DerivedUids.for_volume(volume, **MODEL)
    masks, _ = finding_masks(volume, findings, None)

    def build() -> tuple[pydicom.Dataset, pydicom.Dataset]:
        sr = build_measurement_report(volume, findings, algorithm=ALGORITHM)
        seg = build_segmentation(volume, findings, masks, algorithm=ALGORITHM, source_datasets=ct_study.datasets)
        return sr, seg

    (sr, seg), (sr_again, seg_again) = build(), build()
    for first, second in ((sr, sr_again), (seg, seg_again)):
        assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (second.SOPInstanceUID, second.SeriesInstanceUID)
        assert every_uid(first) == every_uid(second)  # none drawn at random, nested ones included
    dimension_uids = {item.DimensionOrganizationUID for item in seg.DimensionIndexSequence}
    assert dimension_uids == {seg.DimensionOrganizationSequence[0].DimensionOrganizationUID}
    assert dimension_uids == {uids.dimension_organization(SEG)}
    assert (sr.SOPInstanceUID, sr.SeriesInstanceUID) == (uids.instance(SR), uids.series(SR))
    assert (seg.SOPInstanceUID, seg.SeriesInstanceUID) == (uids.instance(SEG), uids.series(SEG))
    groups = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_planar_roi_measurement_groups()
    assert [g.tracking_uid for g in groups[::2]] == [uids.tracking(n) for n in range(1, len(findings) + 1)]
    assert [d.TrackingUID for d in seg.SegmentSequence] == [uids.tracking(n) for n in range(1, len(findings) + 1)]
    observer_uids = [  # TID 1004 Device Observer UID: the model's device UID
        item.UID for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121012"
    ]
    assert observer_uids == [device_uid(*MODEL.values())]

    other = build_measurement_report(volume, findings, algorithm=Algorithm("lung_nodule_ct", "2", "ab" * 32))
    assert other.SOPInstanceUID != sr.SOPInstanceUID and other.SeriesInstanceUID != sr.SeriesInstanceUID
    negative = build_measurement_report(volume, [], algorithm=ALGORITHM)
    (group,) = hd.sr.Comprehensive3DSR.from_dataset(negative).content.get_image_measurement_groups()
    assert group.tracking_uid == uids.no_findings_tracking()
