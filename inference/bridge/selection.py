"""Which series of a study each routed model reads, and why the others are left out.

Pure functions over DICOM JSON (QIDO-RS series, WADO-RS metadata), so every rule is tested without an archive:

1. A series is left out whole when its modality is a non-image one (SR, SEG, KO, PR, ...), no model is routed for
   it, it is one of radserve's own outputs, or its SeriesDescription matches ``exclude_descriptions`` (scouts).
2. Within a series, an instance is left out when its SOP class is not an image (secondary capture, SR, SEG, KO,
   PR, documents) or its ImageType says DERIVED, SECONDARY or LOCALIZER.
3. For a projection modality (CR, DX, ...) the model reads one image: the first PA, else AP, else any view, by
   series and instance number. For CT, MR and the rest it reads a volume: the instances of the one series and the
   one geometry (orientation, pixel spacing, rows x columns) with the most slices, at least ``min_slices``.

Each choice records its reason with the series' number and a hash of its UID, never the UID or description.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from inference.bridge.archive import SERIES_UID, SOP_UID, first_value, text_values, values
from inference.bridge.config import SeriesRules
from inference.bridge.journal import hash_uid

MODALITY = "00080060"
SOP_CLASS = "00080016"
IMAGE_TYPE = "00080008"
SERIES_NUMBER = "00200011"
SERIES_DESCRIPTION = "0008103E"
INSTANCE_NUMBER = "00200013"
ORIENTATION = "00200037"
PIXEL_SPACING = "00280030"
ROWS = "00280010"
COLUMNS = "00280011"
FRAMES = "00280008"
VIEW_POSITION = "00185101"

PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "IO", "PX", "RG", "RF", "XA"})
# SOP class UID prefixes that are never images a model reads.
NON_IMAGE_SOP_CLASSES = (
    ("1.2.840.10008.5.1.4.1.1.7", "secondary capture"),
    ("1.2.840.10008.5.1.4.1.1.88", "structured report or key object"),
    ("1.2.840.10008.5.1.4.1.1.66", "segmentation, registration or raw data"),
    ("1.2.840.10008.5.1.4.1.1.11", "presentation state"),
    ("1.2.840.10008.5.1.4.1.1.104", "encapsulated document"),
    ("1.2.840.10008.5.1.4.1.1.9", "waveform"),
)
VIEW_PREFERENCE = {"PA": 0, "AP": 1}


@dataclass(frozen=True)
class SeriesChoice:
    """One read: ``model`` (as the server routes ``modality``) on ``sop_uids`` of ``series_uid``."""

    model: str
    modality: str
    series_uid: str
    sop_uids: tuple[str, ...]
    reason: str

    def describe(self) -> dict[str, Any]:
        """The choice without UIDs, as the journal and ``bridge status`` show it."""
        return {
            "model": self.model,
            "modality": self.modality,
            "series": hash_uid(self.series_uid),
            "images": len(self.sop_uids),
            "reason": self.reason,
        }


@dataclass
class Selection:
    choices: list[SeriesChoice] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)  # one line per series left out, and why

    def describe(self) -> dict[str, Any]:
        return {"reads": [c.describe() for c in self.choices], "excluded": self.excluded}

    def nothing_to_read(self) -> str:
        why = "; ".join(self.excluded) if self.excluded else "the study has no series"
        return f"no series a routed model reads: {why}"


def _name(series: Mapping[str, Any]) -> str:
    number = first_value(series, SERIES_NUMBER)
    uid = first_value(series, SERIES_UID, "")
    return f"series {number if number is not None else '?'} ({hash_uid(uid)})"


def _number(value: Any, default: float = 1e9) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def series_exclusion(
    series: Mapping[str, Any], routed: Mapping[str, str], rules: SeriesRules, own_series: set[str]
) -> str | None:
    """Why a whole series is left out before its metadata is fetched, or None when it is a candidate."""
    modality = str(first_value(series, MODALITY, "") or "").upper()
    if first_value(series, SERIES_UID, "") in own_series:
        return "radserve's own output"
    if not modality:
        return "no Modality"
    if modality in rules.exclude_modalities:
        return f"{modality}, not an image series"
    if modality not in routed:
        return f"{modality}, no model is routed for it"
    description = " ".join(text_values(series, SERIES_DESCRIPTION))
    if description and re.search(rules.exclude_descriptions, description, re.IGNORECASE):
        return "its description names a localizer or dose report"
    return None


def instance_exclusion(instance: Mapping[str, Any], rules: SeriesRules) -> str | None:
    sop_class = str(first_value(instance, SOP_CLASS, "") or "")
    for prefix, what in NON_IMAGE_SOP_CLASSES:
        if sop_class == prefix or sop_class.startswith(prefix + "."):
            return what
    image_type = {str(v).upper() for v in values(instance, IMAGE_TYPE)}
    for excluded in rules.exclude_image_types:
        if excluded in image_type:
            return excluded.lower()
    return None


def _geometry(instance: Mapping[str, Any]) -> tuple[Any, ...]:
    orientation = tuple(round(_number(v, 0.0), 4) for v in values(instance, ORIENTATION))
    spacing = tuple(round(_number(v, 0.0), 3) for v in values(instance, PIXEL_SPACING))
    return orientation, spacing, first_value(instance, ROWS), first_value(instance, COLUMNS)


def _frames(instance: Mapping[str, Any]) -> int:
    return max(1, int(_number(first_value(instance, FRAMES, 1), 1)))


def choose_series(
    series_list: Sequence[Mapping[str, Any]],
    metadata: Mapping[str, Sequence[Mapping[str, Any]]],
    routed: Mapping[str, str],
    rules: SeriesRules,
    own_series: set[str] | frozenset[str] = frozenset(),
) -> Selection:
    """Choose, per routed model, what to read. ``routed`` maps a modality to the model a read of it gets (the
    server's ListModels ``default_models``); ``metadata`` holds the WADO-RS metadata of each candidate series, by
    UID (:func:`candidates` names them); ``own_series`` are radserve outputs already stored into this study."""
    selection = Selection()
    # model -> the best (rank, choice) so far
    best: dict[str, tuple[tuple[float, ...], SeriesChoice]] = {}
    for series in sorted(series_list, key=lambda s: _number(first_value(s, SERIES_NUMBER))):
        uid = str(first_value(series, SERIES_UID, ""))
        why = series_exclusion(series, routed, rules, set(own_series))
        if why is not None:
            selection.excluded.append(f"{_name(series)}: {why}")
            continue
        modality = str(first_value(series, MODALITY)).upper()
        model = routed[modality]
        kept: list[Mapping[str, Any]] = []
        reasons: dict[str, int] = defaultdict(int)
        for instance in metadata.get(uid, ()):
            excluded = instance_exclusion(instance, rules)
            if excluded is None:
                kept.append(instance)
            else:
                reasons[excluded] += 1
        left_out = ", ".join(f"{n} {why}" for why, n in sorted(reasons.items()))
        if not kept:
            selection.excluded.append(f"{_name(series)}: no image to read ({left_out or 'empty'})")
            continue
        if modality in PROJECTION_MODALITIES:
            image = min(
                kept,
                key=lambda i: (
                    VIEW_PREFERENCE.get(str(first_value(i, VIEW_POSITION, "")).upper(), 2),
                    _number(first_value(i, INSTANCE_NUMBER)),
                ),
            )
            view = str(first_value(image, VIEW_POSITION, "") or "unknown")
            rank: tuple[float, ...] = (
                VIEW_PREFERENCE.get(view.upper(), 2),
                _number(first_value(series, SERIES_NUMBER)),
            )
            choice = SeriesChoice(
                model,
                modality,
                uid,
                (str(first_value(image, SOP_UID)),),
                f"{_name(series)}: {modality} image, view {view}" + (f" (left out: {left_out})" if left_out else ""),
            )
        else:
            groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = defaultdict(list)
            for instance in kept:
                groups[_geometry(instance)].append(instance)
            group = max(groups.values(), key=lambda g: sum(_frames(i) for i in g))
            slices = sum(_frames(i) for i in group)
            if slices < rules.min_slices:
                selection.excluded.append(
                    f"{_name(series)}: {slices} slices of one geometry, fewer than {rules.min_slices}"
                )
                continue
            rank = (-slices, _number(first_value(series, SERIES_NUMBER)))
            others = len(kept) - len(group)
            notes = [n for n in (left_out, f"{others} of other geometries" if others else "") if n]
            choice = SeriesChoice(
                model,
                modality,
                uid,
                tuple(str(first_value(i, SOP_UID)) for i in group),
                f"{_name(series)}: {modality}, {slices} slices of one geometry"
                + (f" (left out: {', '.join(notes)})" if notes else ""),
            )
        previous = best.get(model)
        if previous is None or rank < previous[0]:
            if previous is not None:
                selection.excluded.append(f"{previous[1].reason.split(':')[0]}: another series was preferred")
            best[model] = (rank, choice)
        else:
            selection.excluded.append(f"{_name(series)}: another series was preferred")
    selection.choices = [choice for _, choice in sorted(best.values(), key=lambda item: item[1].model)]
    return selection


def candidates(
    series_list: Sequence[Mapping[str, Any]],
    routed: Mapping[str, str],
    rules: SeriesRules,
    own_series: set[str] | frozenset[str] = frozenset(),
) -> list[str]:
    """The series whose metadata :func:`choose_series` needs (those not left out whole)."""
    return [
        str(first_value(s, SERIES_UID))
        for s in series_list
        if series_exclusion(s, routed, rules, set(own_series)) is None
    ]
