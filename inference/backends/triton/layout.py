"""How a network's output structure travels through Triton as flat, named tensors.

Triton models have a flat list of named inputs and outputs; radserve's networks return a tensor (segmentation),
a list of tensors, or a dict of tensors / lists of tensors (RetinaNet: ``{"classification": [per level],
"box_regression": [per level]}``). The export flattens the output in a fixed order and names every tensor
``<key>[_<index>]__<position>`` (the ``__<position>`` suffix is the convention of Triton's PyTorch backend,
which maps a TorchScript module's output tuple to names by position). The *layout* is the output's structure
with each tensor replaced by its name, stored as JSON in the model's ``config.pbtxt`` parameter
:data:`LAYOUT_PARAMETER`; :func:`rebuild` turns Triton's named outputs back into the structure the task's
``split_outputs`` expects. This module needs no torch or tritonclient import of its own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["INPUT_NAME", "LAYOUT_PARAMETER", "flatten", "layout_names", "parse_layout", "rebuild"]

INPUT_NAME = "image__0"  # (B, C, *spatial) float32; one input per model
LAYOUT_PARAMETER = "radserve_output_layout"  # config.pbtxt parameter holding the layout JSON

_NAME_OK = re.compile(r"[^A-Za-z0-9_]")


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, (list, tuple, Mapping))


def flatten(outputs: Any) -> tuple[list[Any], Any]:
    """``(tensors, layout)``: the output's tensors in their fixed order, and the structure naming each one.

    Supported: a tensor, a list/tuple of tensors, a mapping ``str -> tensor | list/tuple of tensors``.
    """
    tensors: list[Any] = []

    def name(stem: str) -> str:
        return f"{_NAME_OK.sub('_', stem)}__{len(tensors)}"

    if _is_tensor(outputs):
        layout: Any = name("output")
        tensors.append(outputs)
        return tensors, layout
    if isinstance(outputs, (list, tuple)):
        layout = []
        for i, t in enumerate(outputs):
            if not _is_tensor(t):
                raise TypeError(f"network output list item {i} is a {type(t).__name__}, not a tensor")
            layout.append(name(f"output_{i}"))
            tensors.append(t)
        return tensors, layout
    if isinstance(outputs, Mapping):
        layout = {}
        for key, value in outputs.items():
            if _is_tensor(value):
                layout[str(key)] = name(str(key))
                tensors.append(value)
            elif isinstance(value, (list, tuple)) and all(_is_tensor(v) for v in value):
                names = []
                for i, t in enumerate(value):
                    names.append(name(f"{key}_{i}"))
                    tensors.append(t)
                layout[str(key)] = names
            else:
                raise TypeError(f"network output {key!r} is a {type(value).__name__}, not a tensor or list of tensors")
        return tensors, layout
    raise TypeError(f"network output of type {type(outputs).__name__} cannot be exported to Triton")


def layout_names(layout: Any) -> list[str]:
    """The output names of a layout, in position order."""
    if isinstance(layout, str):
        return [layout]
    if isinstance(layout, list):
        return [n for item in layout for n in layout_names(item)]
    if isinstance(layout, dict):
        return [n for value in layout.values() for n in layout_names(value)]
    raise ValueError(f"invalid output layout element {layout!r}")


def rebuild(layout: Any, tensors: Mapping[str, Any]) -> Any:
    """The network's output structure from Triton's outputs by name (the inverse of :func:`flatten`)."""
    if isinstance(layout, str):
        return tensors[layout]
    if isinstance(layout, list):
        return [rebuild(item, tensors) for item in layout]
    return {key: rebuild(value, tensors) for key, value in layout.items()}


def parse_layout(text: str) -> Any:
    """Parse and check the layout JSON of a model's config (names unique, only str / list / dict)."""
    try:
        layout = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the {LAYOUT_PARAMETER} parameter is not JSON: {exc}") from exc
    names = layout_names(layout)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"the {LAYOUT_PARAMETER} parameter names no outputs or repeats one: {names}")
    return layout
