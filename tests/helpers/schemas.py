"""Random JSON schemas for the structured-output tests: nested objects, arrays, enums, bounded
numbers, strings of bounded length, required and optional properties."""

from __future__ import annotations

import random
from typing import Any

WORDS = ["id", "name", "size", "tags", "kind", "ok", "score", "items", "meta", "x", "y", "note"]


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """A schema whose instances are small: every string, array and number is bounded."""
    kinds = ["string", "integer", "number", "boolean", "enum"]
    if depth < 2:
        kinds += ["object", "array"]
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 8)}
    if kind == "integer":
        low = rng.randint(-100, 100)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 1000)}
    if kind == "number":
        return {"type": "number", "minimum": -10.0, "maximum": 10.0}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2.5, True, None], rng.randint(1, 4))}
    if kind == "array":
        return {
            "type": "array",
            "items": random_schema(rng, depth + 1),
            "minItems": rng.randint(0, 1),
            "maxItems": rng.randint(1, 3),
        }
    return random_object(rng, depth + 1)


def random_object(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    names = rng.sample(WORDS, rng.randint(1, 4))
    return {
        "type": "object",
        "properties": {n: random_schema(rng, depth) for n in names},
        "required": [n for n in names if rng.random() < 0.7],
    }


def ten_field_schema() -> dict[str, Any]:
    """The benchmark's schema: ten required fields of assorted types."""
    props: dict[str, Any] = {}
    for i in range(10):
        props[f"field_{i}"] = [
            {"type": "string", "maxLength": 12},
            {"type": "integer", "minimum": 0, "maximum": 100000},
            {"type": "boolean"},
            {"enum": ["low", "medium", "high"]},
            {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 999},
                "maxItems": 3,
            },
        ][i % 5]
    return {"type": "object", "properties": props, "required": list(props)}
