"""Validate a `radserve read --format json` object against ``findings.schema.json`` (JSON Schema 2020-12).

Errors are ValueError naming the path of the first error, e.g. ``$.findings[0].score: ...``; messages
never echo the offending value (it may be a UID).
"""

from __future__ import annotations

import functools
import json
import math
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema.exceptions import best_match

SCHEMA_FILE = "findings.schema.json"


@functools.cache
def load_findings_schema() -> dict[str, Any]:
    """The parsed schema file shipped in this package, checked to be a valid 2020-12 schema."""
    text = resources.files("inference.outputs").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    schema = json.loads(text)
    Draft202012Validator.check_schema(schema)
    return schema


def _is_finite_number(checker: Any, instance: Any) -> bool:
    """JSON numbers: no bools, and no NaN or infinities (which json.dumps would happily write)."""
    return isinstance(instance, int | float) and not isinstance(instance, bool) and math.isfinite(instance)


# Draft 2020-12 with "number" meaning a finite number.
_FindingsValidator = validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("number", _is_finite_number),
)


@functools.cache
def _validator() -> Draft202012Validator:
    return _FindingsValidator(load_findings_schema())


def _path(parts: Any) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


def _describe(error: ValidationError) -> tuple[str, str]:
    """(path, message) for one error, in words that never repeat the offending value."""
    path, rule, expected = list(error.absolute_path), error.validator, error.validator_value
    if rule == "required":
        missing = next(k for k in expected if k not in error.instance)
        return _path(path), f"missing required property {missing!r}"
    if rule == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return _path([*path, extra[0]]), "not an allowed property"
    if rule == "type":
        got = {dict: "object", list: "array", str: "string", bool: "boolean"}.get(type(error.instance), "other")
        return _path(path), f"must be of type {expected}, got {got}"
    messages = {
        "minimum": f"must be >= {expected}",
        "maximum": f"must be <= {expected}",
        "minItems": f"must have at least {expected} items",
        "maxItems": f"must have at most {expected} items",
        "pattern": "does not match the required pattern",
        "anyOf": "matches none of the allowed forms",
    }
    return _path(path), messages.get(rule, f"violates {rule}")


def validate_findings_json(obj: Any) -> None:
    """Raise ValueError naming the path and the rule of the first schema violation in ``obj``."""
    error = best_match(_validator().iter_errors(obj))
    if error is not None:
        path, message = _describe(error)
        raise ValueError(f"{path}: {message}")
