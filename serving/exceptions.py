"""Errors of the serving tier, each with the HTTP status and OpenAI-style error type/code it maps to."""

from __future__ import annotations

from taoflow.exceptions import TaoflowError


class ServingError(TaoflowError):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class BadRequest(ServingError):
    status = 400
    type = "invalid_request_error"


class AuthError(ServingError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class BackendDown(ServingError):
    status = 503
    type = "server_error"
    code = "backend_unavailable"


class RateLimited(ServingError):
    """A key sent more requests than its token bucket allows; `retry_after` is in seconds."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class AdapterRefused(ServingError):
    """An adapter failed its name, location or manifest checks and is not loaded."""

    status = 422
    code = "adapter_refused"


class InsecureConfig(ServingError):
    """The gateway's keys or address would expose it; it refuses to start."""
