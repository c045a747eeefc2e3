"""The web dashboard: served by the gateway at `/dashboard`, or alone by `taoflow dashboard`.

One HTML page and taoflow's own small SVG chart script (both in `serving/static`, so nothing is fetched from
the network), fed by `/dashboard/data`, which reads the SQL views. The page refreshes itself every few seconds.
Access takes an admin key, as the gateway's admin scope: `Authorization: Bearer <key>`, or `?key=<key>` once
in the browser (it sets a cookie). With no keys configured at all the dashboard is open, like the gateway.
"""

from __future__ import annotations

import asyncio
import hmac
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from serving.exceptions import AuthError
from taoflow.report import bucket_width
from taoflow.settings import Settings

STATIC = Path(__file__).parent / "static"
COOKIE = "taoflow_admin"
REFRESH_S = 5


def _iso(v: Any) -> Any:
    return v.replace(" ", "T", 1) if isinstance(v, str) and len(v) >= 19 and v[10] == " " else v


def _rows(settings: Settings, sql: str) -> list[dict[str, Any]]:
    from streams.sqlapi import query

    return [{k: _iso(v) for k, v in r.items()} for r in query(sql, settings).as_dicts()]


def lander_status(settings: Settings) -> dict[str, Any] | None:
    """The running lander's consumer lag and last batch time (None when no lander runs)."""
    import json
    import urllib.request

    try:
        info = json.loads((settings.core.data_dir / "lander.json").read_text())
        with urllib.request.urlopen(info["url"] + "/healthz", timeout=2) as resp:
            doc: dict[str, Any] = json.loads(resp.read())
    except (OSError, ValueError, KeyError):
        return None
    return {"lag_records": doc.get("lag"), "last_batch_seconds": doc.get("last_land_s")}


def dashboard_data(settings: Settings) -> dict[str, Any]:
    """Everything the page draws, from the views (`/dashboard/data`)."""
    span = _rows(settings, "SELECT min(ts) AS first, max(ts) AS last, count(*) AS n FROM final_scores")[0]
    w = bucket_width(span["first"], span["last"], 60, empty=60)
    reward = _rows(
        settings,
        f"SELECT bucket, adapter, sum(mean_reward * n) / sum(n) AS y, sum(n) AS n "
        f"FROM improvement_by(INTERVAL {w} SECOND) GROUP BY ALL ORDER BY bucket",
    )
    series: dict[str, list[dict[str, Any]]] = {}
    for r in reward:
        series.setdefault(r["adapter"], []).append({"x": r["bucket"], "y": r["y"], "n": r["n"]})
    ops = _rows(
        settings,
        "SELECT task_type || '/' || operator AS name, max(n) AS n FROM utility_history "
        "GROUP BY ALL ORDER BY n DESC LIMIT 12",
    )
    names = ", ".join("'" + o["name"].replace("'", "''") + "'" for o in ops) or "''"
    util = _rows(
        settings,
        f"SELECT task_type || '/' || operator AS name, time_bucket(INTERVAL {w} SECOND, ts) AS x, "
        f"arg_max(utility, n) AS y FROM utility_history WHERE task_type || '/' || operator IN "
        f"({names}) GROUP BY ALL ORDER BY x",
    )
    useries: dict[str, list[dict[str, Any]]] = {}
    for r in util:
        useries.setdefault(r["name"], []).append({"x": r["x"], "y": r["y"]})
    rounds = _rows(settings, "SELECT * FROM round_history")
    tput = _rows(
        settings,
        f"SELECT time_bucket(INTERVAL {w} SECOND, landed_at) AS x, count(*) AS y FROM interactions "
        f"GROUP BY ALL ORDER BY x",
    )
    dead = _rows(
        settings,
        f"SELECT time_bucket(INTERVAL {w} SECOND, landed_at) AS x, count(*) AS y FROM dead_letters "
        f"GROUP BY ALL ORDER BY x",
    )
    return {
        "bucket_seconds": w,
        "refresh_seconds": REFRESH_S,
        "rewards": span["n"],
        "reward_series": [{"name": k, "points": v} for k, v in series.items()],
        "utility_series": [{"name": k, "points": v} for k, v in useries.items()],
        "round_series": [
            {
                "name": "held-out reward before",
                "points": [
                    {"x": r["started_at"], "y": r["reward_before"]} for r in rounds if r["reward_before"] is not None
                ],
            },
            {
                "name": "after",
                "points": [
                    {"x": r["started_at"], "y": r["reward_after"]} for r in rounds if r["reward_after"] is not None
                ],
            },
        ],
        "throughput_series": [{"name": "interactions", "points": tput}, {"name": "dead letters", "points": dead}],
        "adapter_events": _rows(
            settings,
            "SELECT adapter, action, ts FROM adapters WHERE action IN "
            "('published', 'promoted', 'rolled_back') ORDER BY ts",
        ),
        "rounds": rounds,
        "leaderboard": _rows(settings, "SELECT * FROM operator_leaderboard"),
        "freshness": _rows(settings, "SELECT * FROM freshness"),
        "dead_letters": _rows(settings, "SELECT * FROM dead_letter_rate"),
        "stream": lander_status(settings),
    }


def add_dashboard(app: FastAPI, settings: Settings) -> None:
    """Mount `/dashboard`, `/dashboard/charts.js` and `/dashboard/data` on `app`."""
    cfg = settings.serve
    admin = {k.get_secret_value() for k in cfg.admin_keys}
    anyone = not admin and not cfg.api_keys

    def allowed(request: Request) -> bool:
        if anyone:
            return True
        header = (request.headers.get("authorization") or "").removeprefix("Bearer ").strip()
        token = header or request.cookies.get(COOKIE) or request.query_params.get("key") or ""
        return any(hmac.compare_digest(token, k) for k in admin)

    def check(request: Request) -> None:
        if not allowed(request):
            raise AuthError(
                "the dashboard needs an admin key: Authorization: Bearer <key>, or open /dashboard?key=<key>"
            )

    @app.get("/dashboard")
    async def page(request: Request) -> Response:
        check(request)
        key = request.query_params.get("key")
        if key and not anyone:
            resp = RedirectResponse("/dashboard", status_code=303)
            resp.set_cookie(COOKIE, key, httponly=True, samesite="strict")
            return resp
        return HTMLResponse((STATIC / "dashboard.html").read_text())

    @app.get("/dashboard/charts.js")
    async def charts(request: Request) -> Response:
        check(request)
        return Response((STATIC / "charts.js").read_text(), media_type="application/javascript")

    @app.get("/dashboard/data")
    async def data(request: Request) -> JSONResponse:
        check(request)
        return JSONResponse(await asyncio.to_thread(dashboard_data, settings))


def build_dashboard_app(settings: Settings) -> FastAPI:
    """`taoflow dashboard`: the dashboard alone (no model loaded)."""
    from serving.exceptions import ServingError

    app = FastAPI(title="taoflow dashboard", docs_url=None, redoc_url=None)

    @app.exception_handler(ServingError)
    async def on_error(request: Request, exc: ServingError) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": str(exc), "type": exc.type, "code": exc.code}}, status_code=exc.status
        )

    @app.get("/")
    async def root() -> RedirectResponse:
        return RedirectResponse("/dashboard")

    add_dashboard(app, settings)
    return app
