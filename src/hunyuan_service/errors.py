"""Domain errors and the one error body every endpoint returns."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """An error with a known HTTP status and a message that tells the client what to do."""

    status_code = 500
    error_type = "server_error"
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after_s: int | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(self.retry_after_s)}


class InvalidInput(ServiceError):
    status_code = 422
    error_type = "invalid_request_error"
    code = "invalid_value"


class BadRequest(ServiceError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "bad_request"


class PayloadTooLarge(ServiceError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


class BodyTimeout(ServiceError):
    status_code = 408
    error_type = "invalid_request_error"
    code = "body_timeout"


class NotAcceptable(ServiceError):
    status_code = 406
    error_type = "invalid_request_error"
    code = "not_acceptable"


class UnsupportedMediaType(ServiceError):
    status_code = 415
    error_type = "invalid_request_error"
    code = "unsupported_media_type"


class Unauthorized(ServiceError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ServiceError):
    status_code = 403
    error_type = "permission_error"
    code = "forbidden"


class NotFound(ServiceError):
    status_code = 404
    error_type = "not_found_error"
    code = "not_found"


class QueueFull(ServiceError):
    status_code = 503
    error_type = "overloaded_error"
    code = "queue_full"


class Unavailable(ServiceError):
    status_code = 503
    error_type = "unavailable_error"
    code = "unavailable"


class DeadlineExceeded(ServiceError):
    status_code = 504
    error_type = "timeout_error"
    code = "deadline_exceeded"


class JobCancelled(ServiceError):
    """Raised inside a model when its job was cancelled; the client is usually gone by then."""

    status_code = 499
    error_type = "cancelled_error"
    code = "cancelled"


class OutOfMemory(ServiceError):
    status_code = 500
    error_type = "server_error"
    code = "out_of_memory"


class InternalError(ServiceError):
    status_code = 500
    error_type = "server_error"
    code = "internal_error"


def error_body(error: ServiceError, request_id: str | None) -> dict[str, Any]:
    """The error JSON, shaped like OpenAI's so that its SDK raises its usual exception types."""
    body: dict[str, Any] = {
        "message": error.message,
        "type": error.error_type,
        "param": error.param,
        "code": error.code,
    }
    if request_id:
        body["request_id"] = request_id
    return {"error": body}


class ModelLoadError(RuntimeError):
    """A model cannot load for a reason the operator can fix (a missing device or package)."""
