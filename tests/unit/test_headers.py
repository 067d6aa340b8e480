"""api/headers.py: a request's headers looked up from one dict per request."""

from starlette.requests import Request

from hunyuan_service.api.headers import header, request_headers


def scope_with(headers: list[tuple[bytes, bytes]]) -> dict:
    return {"type": "http", "method": "POST", "path": "/infer", "headers": headers}


def test_a_header_is_its_first_value_and_an_absent_one_is_empty() -> None:
    scope = scope_with([(b"accept", b"text/event-stream"), (b"accept", b"image/png"),
                        (b"x-name", "café".encode("latin-1"))])  # fmt: skip
    request = Request(scope)
    assert header(request, b"accept") == request.headers.get("accept") == "text/event-stream"
    assert header(request, b"x-name") == request.headers.get("x-name") == "café"
    assert header(request, b"content-encoding") == ""


def test_the_dict_is_made_once_per_request_and_shared_by_every_request_object() -> None:
    scope = scope_with([(b"content-type", b"application/json")])
    first = request_headers(scope)
    assert header(Request(scope), b"content-type") == "application/json"
    assert request_headers(scope) is first  # kept in the scope, not made again
