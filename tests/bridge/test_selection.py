"""Series choice: what each routed model reads, and every rule that leaves a series or an image out."""

from __future__ import annotations

from typing import Any

import pytest

from inference.bridge.config import SeriesRules
from inference.bridge.journal import hash_uid
from inference.bridge.selection import candidates, choose_series

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ROUTED = {"CT": "lung_nodule_ct", "MR": "brain_lesion_mr", "CR": "chest_xray", "DX": "chest_xray"}
AXIAL = [1, 0, 0, 0, 1, 0]


def tag(vr: str, *values: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)}


def series(uid: str, modality: str, number: int, description: str = "") -> dict[str, Any]:
    item = {"0020000E": tag("UI", uid), "00080060": tag("CS", modality), "00200011": tag("IS", number)}
    if description:
        item["0008103E"] = tag("LO", description)
    return item


def image(
    uid: str,
    *,
    sop_class: str = CT_IMAGE,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    orientation: list[float] = AXIAL,
    spacing: tuple[float, float] = (0.7, 0.7),
    size: int = 512,
    number: int = 1,
    view: str | None = None,
    frames: int | None = None,
) -> dict[str, Any]:
    item = {
        "00080018": tag("UI", uid),
        "00080016": tag("UI", sop_class),
        "00080008": tag("CS", *image_type),
        "00200037": tag("DS", *orientation),
        "00280030": tag("DS", *spacing),
        "00280010": tag("US", size),
        "00280011": tag("US", size),
        "00200013": tag("IS", number),
    }
    if view:
        item["00185101"] = tag("CS", view)
    if frames:
        item["00280008"] = tag("IS", frames)
    return item


def volume(prefix: str, n: int, **kwargs: Any) -> list[dict[str, Any]]:
    return [image(f"{prefix}.{k}", number=k, **kwargs) for k in range(1, n + 1)]


RULES = SeriesRules()


def choose(series_list, metadata, routed=ROUTED, rules=RULES, own=frozenset()):
    wanted = set(candidates(series_list, routed, rules, own))
    return choose_series(series_list, {uid: m for uid, m in metadata.items() if uid in wanted}, routed, rules, own)


def test_ct_reads_the_series_with_most_slices_and_leaves_out_localizers_derived_and_non_images():
    series_list = [
        series("1.1", "CT", 1, "Topogram 0.6 T20f"),  # a scout named as such, without LOCALIZER
        series("1.2", "CT", 2),  # localizer by ImageType
        series("1.3", "CT", 3),  # the thin reconstruction: most slices
        series("1.4", "CT", 4),  # a thicker one
        series("1.5", "CT", 5),  # derived MPR
        series("1.6", "SR", 6),
        series("1.7", "SEG", 7),
        series("1.8", "KO", 8),
        series("1.9", "PR", 9),
        series("1.10", "CT", 10),  # a dose screen saved as secondary capture
    ]
    metadata = {
        "1.1": volume("1.1", 1),
        "1.2": volume("1.2", 2, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")),
        "1.3": volume("1.3", 300),
        "1.4": volume("1.4", 60),
        "1.5": volume("1.5", 400, image_type=("DERIVED", "SECONDARY", "MPR")),
        "1.10": volume("1.10", 1, sop_class=SECONDARY_CAPTURE),
    }
    selection = choose(series_list, metadata)
    (choice,) = selection.choices
    assert (choice.model, choice.modality, choice.series_uid) == ("lung_nodule_ct", "CT", "1.3")
    assert choice.sop_uids == tuple(f"1.3.{k}" for k in range(1, 301))
    assert "300 slices of one geometry" in choice.reason
    excluded = "\n".join(selection.excluded)
    for number, why in [
        (1, "localizer or dose report"),
        (2, "2 localizer"),
        (4, "another series was preferred"),
        (5, "derived"),
        (6, "SR, not an image series"),
        (7, "SEG, not an image series"),
        (8, "KO, not an image series"),
        (9, "PR, not an image series"),
        (10, "secondary capture"),
    ]:
        assert any(line.startswith(f"series {number} (") and why in line for line in selection.excluded), (
            number,
            excluded,
        )
    # Reasons name series by number and hash, never by UID.
    assert "1.3" not in excluded and hash_uid("1.3") in choice.reason


def test_only_the_largest_geometry_of_a_mixed_series_is_read():
    mixed = volume("2.1", 40) + [
        image(f"2.1.c{k}", orientation=[1, 0, 0, 0, 0, -1], number=100 + k) for k in range(10)
    ]  # coronal reformats in the same series
    selection = choose([series("2.1", "CT", 1)], {"2.1": mixed})
    (choice,) = selection.choices
    assert len(choice.sop_uids) == 40 and all(".c" not in uid for uid in choice.sop_uids)
    assert "10 of other geometries" in choice.reason


def test_a_series_of_fewer_slices_than_the_minimum_is_not_a_volume():
    selection = choose([series("3.1", "MR", 1)], {"3.1": volume("3.1", 2, sop_class=MR_IMAGE)})
    assert not selection.choices
    assert "2 slices of one geometry, fewer than 3" in selection.nothing_to_read()
    assert choose([series("3.3", "MR", 1)], {"3.3": volume("3.3", 3, sop_class=MR_IMAGE)}).choices
    frames = choose([series("3.2", "MR", 1)], {"3.2": [image("3.2.1", sop_class=MR_IMAGE, frames=30)]})
    assert frames.choices[0].sop_uids == ("3.2.1",)  # an enhanced multi-frame series counts frames


def test_projection_reads_one_image_preferring_pa_then_ap():
    series_list = [series("4.1", "DX", 1), series("4.2", "DX", 2), series("4.3", "CR", 3)]
    metadata = {
        "4.1": [image("4.1.1", sop_class=DX_IMAGE, view="LL")],
        "4.2": [image("4.2.1", sop_class=DX_IMAGE, view="AP"), image("4.2.2", sop_class=DX_IMAGE, view="PA", number=2)],
        "4.3": [image("4.3.1", sop_class=DX_IMAGE, view="AP")],
    }
    (choice,) = choose(series_list, metadata).choices
    assert (choice.model, choice.series_uid, choice.sop_uids) == ("chest_xray", "4.2", ("4.2.2",))
    assert "view PA" in choice.reason


def test_each_routed_model_gets_its_own_series_and_unrouted_modalities_are_left_out():
    series_list = [series("5.1", "CT", 1), series("5.2", "MR", 2), series("5.3", "US", 3), series("5.4", "MR", 4)]
    metadata = {"5.1": volume("5.1", 20), "5.2": volume("5.2", 30, sop_class=MR_IMAGE)}
    selection = choose(series_list, metadata, own=frozenset({"5.4"}))
    assert [(c.model, c.series_uid) for c in selection.choices] == [
        ("brain_lesion_mr", "5.2"),
        ("lung_nodule_ct", "5.1"),
    ]
    assert any("series 3" in line and "US, no model is routed for it" in line for line in selection.excluded)
    assert any("series 4" in line and "radserve's own output" in line for line in selection.excluded)
    only_ct = choose(series_list, metadata, routed={"CT": "lung_nodule_ct"})
    assert [c.series_uid for c in only_ct.choices] == ["5.1"]


def test_a_study_of_reports_only_has_nothing_to_read():
    selection = choose([series("6.1", "SR", 1), series("6.2", "SEG", 2)], {})
    assert selection.choices == []
    assert selection.nothing_to_read().startswith("no series a routed model reads: series 1")


@pytest.mark.parametrize(
    ("rules", "error"),
    [
        ({"exclude_descriptions": "("}, "bad regular expression '('"),
        ({"min_slices": 0}, "min_slices must be in [1, 10000], got 0"),
    ],
)
def test_series_rules_are_checked(rules, error):
    with pytest.raises(ValueError, match=error.replace("[", r"\[").replace("(", r"\(")):
        SeriesRules(**rules)
