"""The dashboard page in headless chromium on data made here: a panel per task type, lines broken where there was no
traffic, every kind of adapter marker; plotly.js from the installed package, under the page's CSP.
(tests/streams/test_views.py drives it on the real pipeline's data.)"""

from __future__ import annotations

import doctest
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import HTMLResponse

import serving.dashboard
from serving.dashboard import build_dashboard_app
from taoflow.settings import Settings
from tests.conftest import SCREENSHOTS, free_port

KEY = "sk-admin-dashboard"


def render(app: FastAPI, out: Path, key: str = KEY) -> tuple[str, str, Path]:
    """Serves `app`, signs in with the form in headless chromium and loads `/dashboard`.
    Returns the DOM once the page has loaded, chromium's log and a screenshot's path (in `out`)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is installed by `make test` (apt); run `make test` or install it"

    async def sign_in() -> HTMLResponse:
        # a person signs in with the form (the key never goes in a URL); chromium's command line can only load a
        # URL, so a same-origin page fills the form in and submits it, and the session cookie does the rest
        return HTMLResponse(f'<form method="post" action="/dashboard/login"><input name="key" value="{key}">'
                            "</form><script>document.forms[0].submit()</script>")  # fmt: skip

    app.add_api_route("/test-sign-in", sign_in, methods=["GET"])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.config.port}/test-sign-in"
    args = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--virtual-time-budget=15000", f"--user-data-dir={out / 'profile'}", "--enable-logging=stderr", "--v=0",
            # nothing but this server resolves: a page that needed a CDN would fail here
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]  # fmt: skip
    shot = out / "dashboard.png"
    try:
        run = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=120)
        subprocess.run([*args, f"--screenshot={shot}", "--window-size=1600,2400", url], capture_output=True,
                       timeout=120)  # fmt: skip
    finally:
        server.should_exit = True
        thread.join(30)
    (out / "dashboard.html").write_text(run.stdout)
    SCREENSHOTS.append(shot)  # listed in the run's summary (tests/conftest.py)
    return run.stdout, run.stderr, shot


def plots(dom: str, section: str = "reward") -> dict[str, str]:
    """The markup of each plot in the section (`reward` or `utilities`), by its key (the task type)."""
    dom = dom.split(f'id="{section}">', 1)[1].split("<h2>", 1)[0]
    starts = [(m.start(), m.group(1)) for m in re.finditer(r'<div class="plot js-plotly-plot" data-key="([^"]+)"', dom)]
    ends = [s for s, _ in starts[1:]] + [len(dom)]
    return {key: dom[s:e] for (s, key), e in zip(starts, ends, strict=True)}


def traces(plot: str) -> list[dict[str, int]]:
    """Per drawn scatter trace: line strokes, subpaths of the filled area, data points and marker symbols."""
    out = []
    for t in re.split(r'<g class="trace scatter', plot.split('class="legend"', 1)[0])[1:]:
        fill = re.findall(r'<path class="js-fill" d="([^"]*)"', t)
        out.append({
            "strokes": len(re.findall(r'<path class="js-line" d="M', t)),
            "fill": sum(d.count("M") for d in fill),
            "points": len(re.findall(r'<path class="point plotly-customdata"[^>]* d="M', t)),
            "symbols": len(re.findall(r'<path class="point" [^>]* d="M', t)),
        })  # fmt: skip
    return out


def doc(**over: Any) -> dict[str, Any]:
    """What `/dashboard/data` answers, with every field present."""

    def pts(minutes: list[int], y: float) -> list[dict[str, Any]]:
        return [{"x": f"2026-03-01T10:{m:02d}:00+00:00", "y": y, "n": 4, "ci_low": y - 0.1, "ci_high": y + 0.1}
                for m in minutes]  # fmt: skip

    math_base = serving.dashboard.with_gaps(pts([0, 1, 2, 7, 8], 0.4), 60)  # no traffic for 10:03-10:06
    return {
        "bucket_seconds": 60, "refresh_seconds": 5, "rewards": 40,
        "reward_series": [{"name": "base", "points": [{"x": p["x"], "y": p["y"], "n": 4} for p in pts([0], 0.4)]}],
        "reward_panels": [
            {"task_type": "math", "series": [{"name": "base", "points": math_base},
                                             {"name": "ad2", "points": pts([8, 9], 0.6)}]},
            {"task_type": "support", "series": [{"name": "base", "points": pts([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 0.5)}]},
        ],
        "utility_series": [], "round_series": [{"name": "held-out reward before", "points": []},
                                               {"name": "after", "points": []}],
        "throughput_series": [{"name": "interactions", "points": []}, {"name": "dead letters", "points": []}],
        "adapter_events": [{"adapter": "ad2", "action": "published", "ts": "2026-03-01T10:07:30+00:00"},
                           {"adapter": "ad2", "action": "promoted", "ts": "2026-03-01T10:07:40+00:00"},
                           {"adapter": "ad2", "action": "rolled_back", "ts": "2026-03-01T10:09:10+00:00"}],
        "release_decisions": [], "rounds": [], "leaderboard": [], "sessions": [], "freshness": [],
        "dead_letters": [], "stream": None, **over,
    }  # fmt: skip


def test_gaps_are_marked_between_buckets_without_traffic() -> None:
    assert doctest.testmod(serving.dashboard).failed == 0
    points = doc()["reward_panels"][0]["series"][0]["points"]
    assert [p["y"] for p in points] == [0.4, 0.4, 0.4, None, 0.4, 0.4]
    assert points[3]["x"] == "2026-03-01T10:03:00+00:00"


def test_page_panels_gaps_markers_in_chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serving.dashboard, "dashboard_data", lambda settings: doc())
    app = build_dashboard_app(Settings(overrides={"core": {"data_dir": tmp_path}, "serve": {"admin_keys": [KEY]}}))
    dom, log, shot = render(app, tmp_path)
    assert 'data-loaded="1"' in dom, dom[-2000:]
    assert "Content Security Policy" not in log and "Uncaught" not in log, log[-2000:]  # no CSP block, no JS error
    panels = plots(dom)
    assert list(panels) == ["math", "support"]  # one panel per task type, nothing for utilities (none yet)
    assert "no utility updates yet" in dom
    math, support = panels["math"], panels["support"]
    # per adapter: a line of one stroke per run of buckets with traffic (math's base: 10:00-10:02 and 10:07-10:08)
    # with a point per bucket, over a band of one filled polygon per run; then one symbol per adapter event
    math_traces = traces(math)
    lines = [t for t in math_traces if t["points"]]
    assert [(t["strokes"], t["points"]) for t in lines] == [(2, 5), (1, 2)]  # base, ad2
    assert [t["fill"] for t in math_traces if t["fill"]] == [2, 1]
    assert [t["symbols"] for t in math_traces if t["symbols"]] == [1, 1, 1]  # published, promoted, rolled back
    support_traces = traces(support)
    assert [(t["strokes"], t["points"]) for t in support_traces if t["points"]] == [(1, 10)]
    assert sum(t["symbols"] for t in support_traces) == 3
    legend = re.findall(r'<text class="legendtext"[^>]*>([^<]+)</text>', math)
    assert sorted(legend) == ["ad2", "base", "promoted", "published", "rolled back"]
    legend = re.findall(r'<text class="legendtext"[^>]*>([^<]+)</text>', support)
    assert sorted(legend) == ["base", "promoted", "published", "rolled back"]
    # and a dotted vertical line per event, across the plot
    assert len(re.findall(r"<path [^>]*stroke-dasharray", math)) == 3
    assert shot.exists() and shot.stat().st_size > 10_000


def test_plotly_comes_from_the_installed_package_with_a_long_cache() -> None:
    from fastapi.testclient import TestClient

    app = build_dashboard_app(Settings(overrides={"serve": {"admin_keys": [KEY]}}))
    with TestClient(app) as client:
        assert client.get("/dashboard/plotly.min.js").status_code == 401
        login = client.get("/dashboard")
        assert login.status_code == 401 and "frame-ancestors 'none'" in login.headers["content-security-policy"]
        page = client.get("/dashboard", headers={"Authorization": f"Bearer {KEY}"})
        assert page.status_code == 200 and "<script>" not in page.text  # no inline script: CSP script-src 'self'
        version = serving.dashboard.PLOTLY_VERSION
        assert f'src="dashboard/plotly.min.js?v={version}"' in page.text
        js = client.get(f"/dashboard/plotly.min.js?v={version}", headers={"Authorization": f"Bearer {KEY}"})
        assert js.status_code == 200 and b"plotly.js v" in js.content[:100]
        assert js.headers["cache-control"] == "private, max-age=31536000, immutable"
        assert len(js.content) == len(serving.dashboard.plotly_js()[0])
