"""Prompt templates filled from a row's catalog fields.

    "studio photo of {title}, {category}, {attributes.color} finish, on a marble counter"

Fields: {title}, {category}, {attributes} (all attributes as "key: value, ..."), and
{attributes.KEY} for one attribute. A field the row lacks renders as nothing and the
leftover commas and spaces are tidied, so sparse catalog rows still give clean prompts.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping
from typing import Any

from ops.base import OpConfigError

_FIELDS = ("title", "category", "attributes", "segment")


def check_template(template: str, *, op_name: str, field: str = "prompt") -> str:
    """Reject templates with unbalanced braces or unknown fields at recipe load time."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise OpConfigError(f"op {op_name!r}: {field} template {template!r} is malformed ({exc}); write literal braces as {{{{ }}}}") from None
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if name.split(".", 1)[0] not in _FIELDS or name == "":
            raise OpConfigError(
                f"op {op_name!r}: {field} template {template!r} uses unknown field {{{name}}}; "
                f"use {', '.join('{' + f + '}' for f in _FIELDS)} or {{attributes.KEY}}"
            )
    return template


def render(template: str, context: Mapping[str, Any]) -> str:
    attrs = _attributes(context.get("attributes"))
    values = {
        "title": _text(context.get("title")),
        "category": _text(context.get("category")),
        "segment": _text(context.get("segment")),
        "attributes": ", ".join(f"{k}: {_text(v)}" for k, v in sorted(attrs.items()) if _text(v)),
    }
    out = []
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(literal)
        if name is None:
            continue
        head, _, key = name.partition(".")
        out.append(_text(attrs.get(key)) if head == "attributes" and key else values.get(head, ""))
    text = "".join(out)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"(\s*,\s*)+", ", ", text)  # ", , " left by empty fields
    return text.strip(" ,")


def _attributes(raw: Any) -> dict[str, Any]:
    if isinstance(raw, Mapping):
        return dict(raw)
    if isinstance(raw, str) and raw.strip():
        try:
            value = json.loads(raw)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}
    return {}


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(_text(v) for v in value)
    return str(value).strip()
