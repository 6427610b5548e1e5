"""docs/spec.md, the API's contract for people, rendered from the OpenAPI schema the server
serves: the routes with their answers, then every request and result object field by field.
`make spec-doc` writes it; a test fails when the committed file differs, so it cannot drift.

    python -m service.api.contract_doc > docs/spec.md
"""

from __future__ import annotations

import json
import sys
from typing import Any

from service.api.app import create_app
from service.config import Settings

HEADER = """# The trainplan API contract

Generated from the OpenAPI schema the server serves at `/openapi.json` (`make spec-doc`; a test
fails when this file and the schema disagree). Errors are RFC 9457 problem details
(`application/problem+json`): `type`, `title`, `status`, `detail`, and for a 422 an `errors`
list whose `field` is the dotted path in the JSON you sent. Runnable specs: `examples/*.json`.
"""


def _type(schema: dict[str, Any]) -> str:
    """A field's type in a few words: `integer`, `"auto"`, `TrainingSpec`, `list of LayerSpec`."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "const" in schema:
        return json.dumps(schema["const"])
    if "enum" in schema:
        return ", ".join(json.dumps(v) for v in schema["enum"])
    for union in ("anyOf", "oneOf"):
        if union in schema:
            return " or ".join(_type(s) for s in schema[union])
    kind = schema.get("type")
    if kind == "array":
        return f"list of {_type(schema.get('items', {}))}"
    if kind == "object" and "additionalProperties" in schema:
        extra = schema["additionalProperties"]
        return "object" if extra is True else f"map of {_type(extra)}"
    return str(kind or "any")


def _limits(schema: dict[str, Any]) -> str:
    words = {
        "minimum": ">=",
        "exclusiveMinimum": ">",
        "maximum": "<=",
        "exclusiveMaximum": "<",
        "minLength": "length >=",
        "maxLength": "length <=",
        "minItems": "items >=",
        "maxItems": "items <=",
        "pattern": "matches",
    }
    parts = [f"{w} {_number(schema[k])}" for k, w in words.items() if k in schema]
    for union in ("anyOf", "oneOf"):
        for member in schema.get(union, []):
            if member.get("type") != "null":
                inner = _limits(member)
                if inner:
                    parts.append(inner)
    return ", ".join(parts)


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"`{value}`" if isinstance(value, str) else str(value)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _object(name: str, schema: dict[str, Any]) -> list[str]:
    lines = [f"### {name}", ""]
    if schema.get("description"):
        lines += [_cell(schema["description"]), ""]
    if "enum" in schema:
        return [*lines, "One of " + ", ".join(f"`{v}`" for v in schema["enum"]) + ".", ""]
    required = set(schema.get("required", []))
    lines += ["| field | type | default | limits | meaning |", "|---|---|---|---|---|"]
    for field, prop in schema.get("properties", {}).items():
        default = "required" if field in required else f"`{json.dumps(prop.get('default'))}`"
        lines.append(
            f"| `{field}` | {_cell(_type(prop))} | {default} | {_cell(_limits(prop))} "
            f"| {_cell(prop.get('description', ''))} |"
        )
    return [*lines, ""]


def _routes(paths: dict[str, Any]) -> list[str]:
    lines = ["## Routes", "", "| method | path | what | answers |", "|---|---|---|---|"]
    for path, methods in paths.items():
        for method, op in methods.items():
            answers = ", ".join(sorted(op.get("responses", {})))
            lines.append(
                f"| {method.upper()} | `{path}` | {_cell(op.get('summary', ''))} | {answers} |"
            )
    return [*lines, ""]


def render(openapi: dict[str, Any]) -> str:
    schemas = openapi["components"]["schemas"]
    lines = [HEADER, *_routes(openapi["paths"]), "## Objects", ""]
    for name in sorted(schemas):
        lines += _object(name, schemas[name])
    return "\n".join(lines).rstrip() + "\n"


def current() -> str:
    """The contract of this code's API (no database is touched: the schema is static)."""
    return render(create_app(Settings(database_url="sqlite://")).openapi())


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(current())
