"""Operations endpoints: `/healthz` (public: up or down), `/metrics` (admin or metrics key), `/admin/state` and
`/admin/adapters/{name}/rollback` (admin scope; the guard checks keys before anything here runs)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from serving.exceptions import BadRequest
from serving.router import Decision
from taoflow.metrics import exposition

if TYPE_CHECKING:
    from serving.gateway import Gateway


def routes(gw: Gateway) -> APIRouter:
    router = APIRouter()

    @router.get("/healthz")
    async def healthz() -> JSONResponse:
        # public, so it says only up or down; routing state and adapters are in /admin/state
        ok = await gw.backend.health()
        return JSONResponse({"status": "ok" if ok else "backend_down"}, status_code=200 if ok else 503)

    @router.get("/metrics")  # admin or metrics key (the guard); open only in the no-auth mode
    async def metrics() -> Response:
        body, content_type = exposition(gw.metrics.registry)
        return Response(body, media_type=content_type)

    @router.get("/admin/state")
    async def admin_state(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "status": "ok" if await gw.backend.health() else "backend_down",
                "backend": gw.backend.name,
                "base_model": gw.backend.base_model,
                "kafka": bool(gw.kafka),
                "routing": gw.router.state(),
                "adapters": gw.backend.adapters,
                "utilities": [
                    {"task_type": t, "operator": o, "utility": u, "n": n}
                    for (t, o), (u, n) in sorted(gw.router.utilities.items())
                ],
            }
        )

    @router.post("/admin/adapters/{name}/rollback")
    async def admin_rollback(name: str, request: Request) -> JSONResponse:
        r = gw.router
        if name not in (r.canary, r.incumbent):
            raise BadRequest(
                f"adapter {name!r} is neither the canary nor the incumbent", status=404, code="adapter_not_found"
            )
        r.apply_event("rolled_back", name)
        await gw.lifecycle.apply_decision(Decision("rolled_back", name, "rolled back by an operator (admin API)"))
        return JSONResponse({"routing": r.state()})

    return router
