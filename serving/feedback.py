"""`/v1/feedback`: an agent's outcome for an interaction (or a whole session), as a FeedbackEvent."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from schemas.base import format_errors
from schemas.feedback import FeedbackEvent
from serving.exceptions import BadRequest
from serving.http import read_body
from serving.protocol import SESSION_ID, FeedbackRequest

if TYPE_CHECKING:
    from serving.gateway import Gateway


def routes(gw: Gateway) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/feedback")
    async def feedback(request: Request) -> JSONResponse:
        fb = await read_body(request, FeedbackRequest, gw.cfg.max_request_bytes)
        if fb.session_id is not None and not SESSION_ID.fullmatch(fb.session_id):
            raise BadRequest(f"session id {fb.session_id[:80]!r} is not allowed", code="invalid_feedback")
        data = {"interaction_id": fb.interaction_id, "session_id": fb.session_id, "kind": fb.kind, "value": fb.value,
                "metadata": fb.metadata,
                # the stream scores it only for interactions (sessions) the same caller captured (None: trusted)
                "caller": gw.principal(request).caller}  # fmt: skip
        try:
            event = FeedbackEvent.model_validate(data, context=gw._ctx)
        except ValidationError as exc:
            raise BadRequest(format_errors(FeedbackEvent, exc), code="invalid_feedback") from None
        eid = gw.emitter.emit(event)
        target = {"interaction_id": fb.interaction_id} if fb.session_id is None else {"session_id": fb.session_id}
        return JSONResponse({"event_id": eid, **target, "status": "accepted"}, status_code=202)

    return router
