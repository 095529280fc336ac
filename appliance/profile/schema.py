"""JSON Schema for editors, and the Markdown profile reference generated from it."""

from __future__ import annotations

import json
from typing import Any

from .model import Profile

SCHEMA_ID = "https://appliance.invalid/profile.schema.json"  # an identifier, not fetched by anything


def json_schema() -> dict[str, Any]:
    schema = Profile.model_json_schema(mode="validation")
    schema["properties"]["extends"] = {
        "type": "string",
        "description": "relative path of a base profile; maps merge, lists replace",
    }
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, **schema}


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = defs[node["$ref"].split("/")[-1]]
    return node


def _type_text(node: dict[str, Any], defs: dict[str, Any]) -> str:
    node_r = _resolve(node, defs)
    if "const" in node_r:
        return f"`{node_r['const']}`"
    if "enum" in node_r:
        return " \\| ".join(f"`{v}`" for v in node_r["enum"])
    alts = node_r.get("anyOf") or node_r.get("oneOf")
    if alts:
        parts = [_type_text(a, defs) for a in alts if a.get("type") != "null"]
        return " \\| ".join(dict.fromkeys(parts))
    t = node_r.get("type")
    if t == "array":
        return f"list of {_type_text(node_r.get('items', {}), defs)}"
    if t == "object" or "properties" in node_r:
        return "map"
    if t == "string" and node_r.get("description") and "$ref" not in node:
        return "string"
    return str(t or "any")


def _objects(node: dict[str, Any], defs: dict[str, Any]) -> list[dict[str, Any]]:
    node = _resolve(node, defs)
    if node.get("type") == "array":
        return _objects(node.get("items", {}), defs)
    alts = node.get("anyOf") or node.get("oneOf")
    if alts:
        return [o for a in alts for o in _objects(a, defs)]
    return [node] if "properties" in node else []


def reference_markdown() -> str:
    """One row per field, in model order; nested maps and list items get dotted paths."""
    schema = json_schema()
    defs = schema.get("$defs", {})
    rows: list[str] = ["| field | type | default | description |", "|---|---|---|---|"]

    def walk(obj: dict[str, Any], prefix: str) -> None:
        required = set(obj.get("required", []))
        for name, prop in obj.get("properties", {}).items():
            path = f"{prefix}{name}"
            desc = prop.get("description") or _resolve(prop, defs).get("description", "")
            if name in required:
                default = "**required**"
            elif "default" in prop:
                default = f"`{json.dumps(prop['default'])}`"
            else:
                default = ""
            rows.append(f"| `{path}` | {_type_text(prop, defs)} | {default} | {desc} |")
            is_list = _resolve(prop, defs).get("type") == "array"
            for sub in _objects(prop, defs):
                if sub is not obj:
                    walk(sub, f"{path}[]." if is_list else f"{path}.")

    walk(schema, "")
    # a discriminated union (dataplane) lists the same key once per variant: keep the first
    return "\n".join(dict.fromkeys(rows)) + "\n"
