"""The web dashboard: served by the gateway at `/dashboard`, or alone by `taoflow dashboard`.

One HTML page and its script (`serving/static`) drawing with plotly.js, which is served from the installed
`plotly` package (nothing is fetched from the network), fed by `/dashboard/data`, which reads the SQL views. The
page refreshes itself every few seconds, and a Content-Security-Policy lets it load scripts and data only from
this server (inline styles are allowed: plotly.js sets them).
Access takes an admin key, as the gateway's admin scope: `Authorization: Bearer <key>`, or the sign-in form at
`/dashboard` (a POST; the key never goes in a URL), which sets an HttpOnly, SameSite=Strict cookie (`Secure`
over https) holding a session token: an expiry time and an HMAC of it under the key, so the key itself is never
stored in the browser, every replica accepts it, and it lapses after SESSION_S. With no keys configured at all
the dashboard is open, like the gateway.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import hashlib
import hmac
import importlib.metadata
import importlib.resources
import json
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from serving.exceptions import AuthError, BadRequest, ServingError
from streams.sqlapi import bucket_width, query, running_lander
from taoflow.settings import Settings

STATIC = Path(__file__).parent / "static"
COOKIE = "taoflow_session"
REFRESH_S = 5
SESSION_S = 12 * 3600
LOGIN_MAX_BYTES = 4096
PLOTLY_VERSION = importlib.metadata.version("plotly")
# scripts, data and the sign-in form only from this server; no framing, no plugins, no <base> tricks
CSP = (
    "default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self' data: blob:; "
    "style-src 'self' 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _iso(v: Any) -> Any:
    return v.replace(" ", "T", 1) if isinstance(v, str) and len(v) >= 19 and v[10] == " " else v


def _rows(settings: Settings, sql: str) -> list[dict[str, Any]]:
    return [{k: _iso(v) for k, v in r.items()} for r in query(sql, settings).as_dicts()]


def lander_status(settings: Settings) -> dict[str, Any] | None:
    """The running lander's consumer lag and last batch time (None when no lander runs)."""
    import json
    import urllib.request

    info = running_lander(settings)
    if info is None:
        return None
    try:
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
    by_task = _rows(
        settings,
        f"SELECT task_type, adapter, bucket AS x, mean_reward AS y, n, ci_low, ci_high "
        f"FROM improvement_by(INTERVAL {w} SECOND) ORDER BY task_type, adapter, x",
    )
    panels: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in by_task:
        task, adapter = r.pop("task_type"), r.pop("adapter")
        panels.setdefault(task, {}).setdefault(adapter, []).append(r)
    ops = _rows(
        settings,
        "SELECT task_type || '/' || operator AS name, max(n) AS n FROM utility_history "
        "GROUP BY ALL ORDER BY n DESC LIMIT 12",
    )
    names = ", ".join("'" + o["name"].replace("'", "''") + "'" for o in ops) or "''"
    util = _rows(
        settings,
        f"SELECT task_type || '/' || operator AS name, task_type, operator, "
        f"time_bucket(INTERVAL {w} SECOND, ts) AS x, arg_max(utility, n) AS y FROM utility_history "
        f"WHERE task_type || '/' || operator IN ({names}) GROUP BY ALL ORDER BY x",
    )
    useries: dict[str, dict[str, Any]] = {}
    for r in util:
        u = useries.setdefault(r["name"], {"name": r["name"], "task_type": r["task_type"], "operator": r["operator"]})
        u.setdefault("points", []).append({"x": r["x"], "y": r["y"]})
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
        # one panel per task type: mean reward and its 95% interval per adapter and bucket, None where no traffic
        "reward_panels": [
            {"task_type": t, "series": [{"name": a, "points": with_gaps(p, w)} for a, p in s.items()]}
            for t, s in panels.items()
        ],
        "utility_series": list(useries.values()),
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
        # the sequential test's evidence: n per side, means, difference and its always-valid interval
        "release_decisions": [
            _flatten_metrics(d)
            for d in _rows(
                settings,
                "SELECT adapter, action, ts, reason, metrics FROM adapters WHERE action IN "
                "('promoted', 'rolled_back') ORDER BY ts",
            )
        ],
        "rounds": rounds,
        "leaderboard": _rows(settings, "SELECT * FROM operator_leaderboard"),
        "sessions": _rows(settings, "SELECT * FROM session_leaderboard"),
        "freshness": _rows(settings, "SELECT * FROM freshness"),
        "dead_letters": _rows(settings, "SELECT * FROM dead_letter_rate"),
        "stream": lander_status(settings),
    }


def with_gaps(points: list[dict[str, Any]], width: int) -> list[dict[str, Any]]:
    """`points` (ascending `x`, one per bucket of `width` seconds) with a `y: None` point after each bucket that
    has no successor, so a chart breaks its line there instead of drawing across a time with no traffic.

    >>> [p["y"] for p in with_gaps([{"x": "2026-01-01T00:00:00", "y": 1}, {"x": "2026-01-01T00:01:00", "y": 2},
    ...                             {"x": "2026-01-01T00:05:00", "y": 3}], 60)]
    [1, 2, None, 3]
    """
    out: list[dict[str, Any]] = []
    for p in points:
        if out:
            gap = datetime.fromisoformat(str(out[-1]["x"])) + timedelta(seconds=width)
            if datetime.fromisoformat(str(p["x"])) > gap:
                out.append({"x": gap.isoformat(), "y": None})
        out.append(p)
    return out


@functools.cache
def plotly_js() -> tuple[bytes, bytes]:
    """plotly.js as the installed `plotly` package ships it, plain and gzipped (read once)."""
    raw = (importlib.resources.files("plotly") / "package_data" / "plotly.min.js").read_bytes()
    return raw, gzip.compress(raw, compresslevel=6, mtime=0)


def session_token(key: bytes, expires: int) -> str:
    """`<expiry>.<hmac>`: proves the holder signed in with `key` and lapses at `expires` (unix seconds)."""
    mac = hmac.new(key, f"taoflow-dashboard-session:{expires}".encode(), hashlib.sha256).hexdigest()
    return f"{expires}.{mac}"


def _ascii(value: str | None) -> bytes:
    """Header and cookie values arrive latin-1 decoded; anything but printable ASCII never matches (-> b'')."""
    raw = (value or "").encode("latin-1", "replace")
    return raw if raw and all(33 <= c < 127 for c in raw) else b""


def add_dashboard(app: FastAPI, settings: Settings) -> None:
    """Mount `/dashboard` (page, or the sign-in form), `/dashboard/login`, `/dashboard/logout`,
    `/dashboard/charts.js`, `/dashboard/plotly.min.js` and `/dashboard/data` on `app`."""
    cfg = settings.serve
    admin = [k.get_secret_value().encode() for k in cfg.admin_keys]
    anyone = not admin and not cfg.api_keys

    def valid_session(token: bytes) -> bool:
        expires, _, _ = token.partition(b".")
        if not expires.isdigit() or int(expires) < time.time():
            return False
        return any(hmac.compare_digest(token, session_token(k, int(expires)).encode()) for k in admin)

    def allowed(request: Request) -> bool:
        if anyone:
            return True
        raw = request.headers.get("authorization") or ""
        # the scheme's space would fail _ascii's check, so it goes first
        header = _ascii(raw[7:].strip() if raw[:7].lower() == "bearer " else raw)
        if header:
            return any(hmac.compare_digest(header, k) for k in admin)
        cookie = _ascii(request.cookies.get(COOKIE))
        return bool(cookie) and valid_session(cookie)

    def check(request: Request) -> None:
        if not allowed(request):
            raise AuthError("the dashboard needs an admin key: Authorization: Bearer <key>, or sign in at /dashboard")

    def login_page(message: str = "", status: int = 401) -> HTMLResponse:
        html = (STATIC / "login.html").read_text().replace("{message}", message)
        return HTMLResponse(html, status_code=status, headers=HEADERS)

    @app.get("/dashboard")
    async def page(request: Request) -> Response:
        if "key" in request.query_params:
            # a key in a URL ends up in browser history, proxy and access logs
            raise BadRequest("keys in URLs are refused; sign in with the form at /dashboard", code="key_in_url")
        if not allowed(request):
            return login_page()
        html = (STATIC / "dashboard.html").read_text().replace("{plotly_version}", PLOTLY_VERSION)
        return HTMLResponse(html, headers=HEADERS)

    @app.post("/dashboard/login")
    async def login(request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
            raise BadRequest("sign in with the form at /dashboard", status=415, code="unsupported_media_type")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > LOGIN_MAX_BYTES:
                raise BadRequest("the sign-in form is too large", status=413, code="request_too_large")
        key = _ascii((parse_qs(raw.decode("latin-1")).get("key") or [""])[0])
        match = next((k for k in admin if hmac.compare_digest(key, k)), None) if key else None
        if match is None:
            return login_page("That is not an admin key.")
        resp = RedirectResponse("/dashboard", status_code=303)
        https = request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"
        resp.set_cookie(
            COOKIE, session_token(match, int(time.time()) + SESSION_S), max_age=SESSION_S, path="/dashboard",
            httponly=True, samesite="strict", secure=https,
        )  # fmt: skip
        return resp

    @app.post("/dashboard/logout")
    async def logout(request: Request) -> Response:
        resp = RedirectResponse("/dashboard", status_code=303)
        resp.delete_cookie(COOKIE, path="/dashboard", httponly=True, samesite="strict")
        return resp

    @app.get("/dashboard/charts.js")
    async def charts(request: Request) -> Response:
        check(request)
        return Response(
            (STATIC / "charts.js").read_text(),
            media_type="application/javascript",
            headers={"Cache-Control": "no-cache"},
        )

    @app.get("/dashboard/plotly.min.js")
    async def plotly(request: Request) -> Response:
        check(request)
        raw, packed = await asyncio.to_thread(plotly_js)
        # the page asks for ?v=<plotly version>, so an upgrade is a new URL and a year's caching is safe
        headers = {"Cache-Control": "private, max-age=31536000, immutable", "Vary": "Accept-Encoding"}
        if "gzip" in request.headers.get("accept-encoding", ""):
            return Response(
                packed, media_type="application/javascript", headers={**headers, "Content-Encoding": "gzip"}
            )
        return Response(raw, media_type="application/javascript", headers=headers)

    @app.get("/dashboard/data")
    async def data(request: Request) -> JSONResponse:
        check(request)
        return JSONResponse(await asyncio.to_thread(dashboard_data, settings), headers={"Cache-Control": "no-store"})


def build_dashboard_app(settings: Settings) -> FastAPI:
    """`taoflow dashboard`: the dashboard alone (no model loaded)."""
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


def _flatten_metrics(row: dict[str, Any]) -> dict[str, Any]:
    metrics = row.pop("metrics", None)
    if isinstance(metrics, str):
        metrics = json.loads(metrics)
    return {**row, **(metrics or {})}
