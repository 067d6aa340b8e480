"""OpenAPI pieces for the bodies that handlers parse themselves (JSON or multipart)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with nested definitions inlined, so it stands alone in OpenAPI."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(definitions[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    return inline(schema)


def request_body(text2image: type[BaseModel], image2text: type[BaseModel]) -> dict[str, Any]:
    """The JSON bodies of both model types, and image2text's multipart form with file uploads."""
    form = inline_schema(image2text)
    form["properties"]["images"] = {
        "type": "array",
        "items": {"type": "string", "format": "binary"},
    }
    return {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"oneOf": [inline_schema(text2image), inline_schema(image2text)]}
            },
            "multipart/form-data": {"schema": form},
        },
    }
