"""What every gateway endpoint shares: errors in OpenAI's shape with their HTTP status, and request bodies read
within their size bound and validated against their protocol model."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from schemas.base import format_errors
from serving.exceptions import BadRequest, RateLimited, ServingError

log = logging.getLogger(__name__)


def error_response(exc: ServingError) -> JSONResponse:
    """`{"error": {"message", "type", "param", "code"}}` with the error's status (an upstream's own error object
    goes back as it came)."""
    err = getattr(exc, "error", None) or {"message": str(exc), "type": exc.type, "param": None, "code": exc.code}
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = str(max(1, int(exc.retry_after + 0.999)))
    return JSONResponse({"error": err}, status_code=exc.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Expected failures as error responses; anything else as a 500 in the same shape, logged, never a trace."""

    @app.exception_handler(ServingError)
    async def on_serving_error(request: Request, exc: ServingError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return error_response(ServingError(f"internal error: {type(exc).__name__}"))


async def read_body(request: Request, model: type[BaseModel], max_bytes: int) -> Any:
    """The request's JSON object as `model`; bodies over `max_bytes` are refused as they stream in (413)."""
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_bytes:
            raise BadRequest(f"request body exceeds the limit of {max_bytes} bytes", status=413,
                             code="request_too_large")  # fmt: skip
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(doc, dict):
        raise BadRequest("the body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise BadRequest(format_errors(model, exc), code="invalid_request") from None
