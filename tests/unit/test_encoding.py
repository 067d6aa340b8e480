"""JSON bodies built by splicing pre-encoded values: they must parse to exactly what they say."""

from __future__ import annotations

import base64
import io
import json

from PIL import Image

from hunyuan_service.api.encoding import base64_json_string, encode_image, json_bytes, json_object


def test_json_object_splices_raw_values_and_escapes_the_rest() -> None:
    tricky = 'a "quoted" \\ prompt, é, 雪, \n newline'
    body = json_object({"prompt": tricky, "n": 2, "none": None}, {"b": b'"abc"', "c": b"[1,2]"})
    assert json.loads(body) == {"b": "abc", "c": [1, 2], "prompt": tricky, "n": 2, "none": None}


def test_json_bytes_matches_starlette_compact_form() -> None:
    assert json_bytes({"a": [1, "é"]}) == '{"a":[1,"é"]}'.encode()


def test_base64_json_string_round_trips_to_the_image() -> None:
    image = Image.new("RGB", (48, 32), (10, 200, 30))
    literal = base64_json_string(encode_image(image, "png"))
    decoded = Image.open(io.BytesIO(base64.b64decode(json.loads(literal))))
    assert (decoded.format, decoded.size) == ("PNG", (48, 32))
    assert decoded.getpixel((0, 0)) == (10, 200, 30)
