"""Attacks on the gateway's HTTP surface (issue 13), each against a real uvicorn server on loopback.

The model server is a scripted backend (the gateway is under test, not generation); captured events are the real
InteractionEvent / FeedbackEvent objects the gateway hands to its emitter.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from schemas.base import EventModel
from serving.auth import caller_id
from serving.backends import Backend, Generation, GenRequest
from serving.exceptions import InsecureConfig
from serving.server import run_server
from taoflow.settings import Settings
from tests.serving.harness import running_gateway

KEY, OTHER, TRUSTED, ADMIN, METRICS = "sk-user-1", "sk-user-2", "sk-trusted", "sk-admin", "sk-metrics"
CHAT = {"model": "taoflow", "messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 4}


class ScriptedBackend(Backend):
    """Answers '4' at once (streams it in three pieces); holds adapters by name."""

    name = "scripted"
    base_model = "scripted-base"

    async def generate(self, req: GenRequest) -> Generation:
        req.served = req.adapter
        return Generation("4", 5, 1)

    async def stream(self, req: GenRequest) -> AsyncIterator[str]:  # type: ignore[override]
        req.served = req.adapter
        for piece in ("4", " is", " it"):
            yield piece

    async def load_adapter(self, name: str, path: str) -> None:
        self.adapters[name] = path

    async def unload_adapter(self, name: str) -> None:
        self.adapters.pop(name, None)


class Captured:
    """The emitter seam: keeps the events the gateway emits."""

    def __init__(self) -> None:
        self.events: list[EventModel] = []

    def emit(self, event: EventModel) -> str:
        self.events.append(event)
        return str(getattr(event, "event_id", ""))

    def close(self) -> None: ...


def settings(tmp: Path, **serve: Any) -> Settings:
    cfg = {"api_keys": [KEY, OTHER, TRUSTED], "admin_keys": [ADMIN], "metrics_keys": [METRICS],
           "trusted_keys": [TRUSTED], "max_request_bytes": 4096, **serve}  # fmt: skip
    return Settings(overrides={"core": {"data_dir": tmp}, "kafka": {"bootstrap": "127.0.0.1:9"}, "serve": cfg})


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any, Captured]]:
    cap = Captured()
    backend = ScriptedBackend()
    backend.adapters["ad-1"] = "/nowhere"
    with running_gateway(settings(tmp_path_factory.mktemp("gw")), backend, kafka=False, emitter=cap) as (url, g):
        yield url.removesuffix("/v1"), g, cap


def raw_http(base: str, request: bytes, wait: float = 5.0) -> tuple[bytes, float]:
    """Send `request` on a socket and read what comes back within `wait` seconds: (response, seconds taken)."""
    host, port = base.removeprefix("http://").split(":")
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(request)
        out = b""
        try:
            while b"\r\n\r\n" not in out or len(out) < out.index(b"\r\n\r\n") + 20:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except TimeoutError:
            pass
    return out, time.monotonic() - t0


def last_interaction(cap: Captured, iid: str) -> Any:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = [e for e in cap.events if getattr(e, "event_id", None) == iid]
        if found:
            return found[0]
        time.sleep(0.01)
    raise AssertionError(f"interaction {iid} was not captured")


# -- authentication before the body ------------------------------------------------------------------------------


def test_unauthenticated_huge_declared_body_is_refused_before_it_is_read(gw: Any) -> None:
    base, _, _ = gw
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n{")  # fmt: skip
    resp, took = raw_http(base, head)
    assert resp.startswith(b"HTTP/1.1 401"), resp[:200]
    assert took < 3  # answered at once: the server did not wait for a gigabyte
    resp, took = raw_http(base, head.replace(b"Host: x", f"Host: x\r\nAuthorization: Bearer {KEY}".encode()))
    assert resp.startswith(b"HTTP/1.1 413") and took < 3, resp[:200]


def test_chunked_body_over_the_cap_is_cut_off_while_read(gw: Any) -> None:
    base, _, _ = gw
    chunk = b"1000\r\n" + b" " * 4096 + b"\r\n"
    req = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
           "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode() + chunk * 3  # fmt: skip
    resp, _ = raw_http(base, req)
    assert resp.startswith(b"HTTP/1.1 413"), resp[:200]


def test_unauthenticated_invalid_json_gets_401_not_a_parse_error(gw: Any) -> None:
    base, _, _ = gw
    r = httpx.post(f"{base}/v1/chat/completions", content=b'{"model": [', headers={"Content-Type": "application/json"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(f"{base}/v1/feedback", json={"bogus": 1})
    assert r.status_code == 401


def test_non_ascii_authorization_and_cookie_get_401_not_500(gw: Any) -> None:
    base, _, _ = gw
    bad_key = {"Authorization": "Bearer s\xe9cr\xe9t".encode("latin-1")}
    r = httpx.post(f"{base}/v1/chat/completions", json=CHAT, headers=bad_key)  # type: ignore[arg-type]
    assert r.status_code == 401
    bad_cookie = {"Cookie": "taoflow_session=\xe9\xe9".encode("latin-1")}
    r = httpx.get(f"{base}/dashboard/charts.js", headers=bad_cookie)  # type: ignore[arg-type]
    assert r.status_code == 401


# -- tenants: forced, reserved metadata, agent, caller ----------------------------------------------------------


def test_forced_operator_or_adapter_is_served_but_captured_as_forced(gw: Any) -> None:
    base, _, cap = gw
    plain = httpx.post(f"{base}/v1/chat/completions", json=CHAT, headers=auth(KEY))
    forcing = {**auth(KEY), "X-Taoflow-Operator": "default"}
    by_header = httpx.post(f"{base}/v1/chat/completions", json=CHAT, headers=forcing)
    by_model = httpx.post(f"{base}/v1/chat/completions", json={**CHAT, "model": "ad-1"}, headers=auth(KEY))
    by_meta = httpx.post(f"{base}/v1/completions", json={"model": "taoflow", "prompt": "2+2?", "metadata":
                         {"operator": "default"}}, headers=auth(KEY))  # fmt: skip
    assert [r.status_code for r in (plain, by_header, by_model, by_meta)] == [200] * 4
    ev = {name: last_interaction(cap, r.headers["x-taoflow-interaction-id"])
          for name, r in [("plain", plain), ("header", by_header), ("model", by_model), ("meta", by_meta)]}  # fmt: skip
    assert not ev["plain"].forced
    assert ev["header"].forced and ev["model"].forced and ev["meta"].forced
    assert ev["model"].adapter == "ad-1"


def test_reserved_metadata_and_agent_header_do_not_come_from_untrusted_keys(gw: Any) -> None:
    base, _, cap = gw
    body = {**CHAT, "metadata": {"answer": "4", "reference": "4", "ticket": "T-1"}}
    headers = {"X-Taoflow-Agent": "billing-bot"}
    untrusted = httpx.post(f"{base}/v1/chat/completions", json=body, headers={**auth(KEY), **headers})
    trusted = httpx.post(f"{base}/v1/chat/completions", json=body, headers={**auth(TRUSTED), **headers})
    u = last_interaction(cap, untrusted.headers["x-taoflow-interaction-id"])
    t = last_interaction(cap, trusted.headers["x-taoflow-interaction-id"])
    assert "answer" not in u.metadata and "reference" not in u.metadata and u.metadata["ticket"] == "T-1"
    assert u.agent_id == "gateway" and u.metadata["client_agent"] == "billing-bot"
    assert u.caller == caller_id(KEY)
    assert t.metadata["answer"] == "4" and t.agent_id == "billing-bot" and t.caller == caller_id(TRUSTED)


def test_feedback_carries_the_callers_key_hash(gw: Any) -> None:
    base, _, cap = gw
    iid = str(uuid.uuid4())
    fb = {"interaction_id": iid, "kind": "thumbs", "value": 1.0}
    assert httpx.post(f"{base}/v1/feedback", json=fb, headers=auth(OTHER)).status_code == 202
    assert httpx.post(f"{base}/v1/feedback", json={**fb, "kind": "rating"}, headers=auth(ADMIN)).status_code == 202
    mine = [e for e in cap.events if getattr(e, "interaction_id", None) == iid]
    assert [(e.kind, e.caller) for e in mine] == [("thumbs", caller_id(OTHER)), ("rating", None)]


# -- bounds --------------------------------------------------------------------------------------------------------


def test_stop_list_is_bounded(gw: Any) -> None:
    base, _, _ = gw
    post = lambda stop: httpx.post(f"{base}/v1/chat/completions", json={**CHAT, "stop": stop}, headers=auth(KEY))  # noqa: E731
    assert post(["a", "b", "c", "d"]).status_code == 200
    r = post([str(i) for i in range(5)])
    assert r.status_code == 400 and "at most 4 stop" in r.json()["error"]["message"]
    assert post("x" * 1000).status_code == 400


def test_task_type_charset_and_length(gw: Any) -> None:
    base, _, _ = gw
    url = f"{base}/v1/chat/completions"
    r = httpx.post(url, json={**CHAT, "metadata": {"task_type": "math\r\nX-Evil: 1"}}, headers=auth(KEY))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_task_type"
    r = httpx.post(url, json=CHAT, headers={**auth(KEY), "X-Taoflow-Task-Type": "t" * 5000})
    assert r.status_code == 400
    assert httpx.post(url, json=CHAT, headers={**auth(KEY), "X-Taoflow-Task-Type": "math/v2:easy"}).status_code == 200


def test_text_plain_post_is_refused(gw: Any) -> None:
    base, _, _ = gw
    r = httpx.post(f"{base}/v1/chat/completions", content=b'{"model":"taoflow"}',
                   headers={**auth(KEY), "Content-Type": "text/plain"})  # fmt: skip
    assert r.status_code == 415


def test_text_plain_and_cross_site_posts_are_refused_with_no_keys(tmp_path: Path) -> None:
    open_settings = Settings(overrides={"core": {"data_dir": tmp_path}, "kafka": {"bootstrap": "127.0.0.1:9"}})
    with running_gateway(open_settings, ScriptedBackend(), kafka=False, emitter=Captured()) as (url, _):
        form = httpx.post(f"{url}/chat/completions", content=b'{"model":"taoflow","messages":[{"role":"user",'
                          b'"content":"hi"}]}', headers={"Content-Type": "text/plain"})  # fmt: skip
        assert form.status_code == 415
        cross = httpx.post(f"{url}/chat/completions", json=CHAT, headers={"Sec-Fetch-Site": "cross-site"})
        assert cross.status_code == 403
        assert httpx.post(f"{url}/chat/completions", json=CHAT).status_code == 200


def test_metrics_need_a_key_and_their_labels_stay_bounded(gw: Any) -> None:
    base, _, _ = gw
    with httpx.Client(base_url=base, headers=auth(KEY)) as c:
        for i in range(250):
            c.get(f"/v1/nope-{uuid.uuid4().hex}")
            c.post("/v1/chat/completions", json=CHAT, headers={"X-Taoflow-Task-Type": f"task-{i}"})
    assert httpx.get(f"{base}/metrics").status_code == 401
    assert httpx.get(f"{base}/metrics", headers=auth(KEY)).status_code == 401  # a user key is not a metrics key
    text = httpx.get(f"{base}/metrics", headers=auth(METRICS)).text
    assert httpx.get(f"{base}/metrics", headers=auth(ADMIN)).status_code == 200
    assert "nope-" not in text and "task-1" not in text
    assert 'endpoint="/v1/chat/completions"' in text and 'task_type="other"' in text
    assert len(text) < 60_000, len(text)


def test_healthz_says_only_up_or_down_and_admin_state_has_the_rest(gw: Any) -> None:
    base, _, _ = gw
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    state = httpx.get(f"{base}/admin/state", headers=auth(ADMIN)).json()
    assert state["adapters"] == {"ad-1": "/nowhere"} and "routing" in state


def test_rate_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    s = settings(tmp_path, rate_limit_per_s=0.5, rate_limit_burst=2)
    with running_gateway(s, ScriptedBackend(), kafka=False, emitter=Captured()) as (url, _):
        codes = [httpx.post(f"{url}/chat/completions", json=CHAT, headers=auth(KEY)) for _ in range(3)]
        assert [r.status_code for r in codes] == [200, 200, 429]
        assert int(codes[-1].headers["retry-after"]) >= 1
        assert httpx.post(f"{url}/chat/completions", json=CHAT, headers=auth(OTHER)).status_code == 200  # per key


# -- dashboard ------------------------------------------------------------------------------------------------------


def test_dashboard_key_never_in_url_and_the_cookie_is_not_the_key(gw: Any) -> None:
    base, _, _ = gw
    assert httpx.get(f"{base}/dashboard", params={"key": ADMIN}).status_code == 400
    assert httpx.post(f"{base}/dashboard/login", data={"key": KEY}).status_code == 401
    r = httpx.post(f"{base}/dashboard/login", data={"key": ADMIN})
    assert r.status_code == 303
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and ADMIN not in cookie
    token = cookie.split(";")[0].split("=", 1)[1]
    js = httpx.get(f"{base}/dashboard/charts.js", cookies={"taoflow_session": token})
    assert js.status_code == 200
    https = httpx.post(f"{base}/dashboard/login", data={"key": ADMIN}, headers={"X-Forwarded-Proto": "https"})
    assert "Secure" in https.headers["set-cookie"]


# -- start-up -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "serve",
    [{"api_keys": ["change-me"]}, {"admin_keys": ["xxxxxx"]}, {"api_keys": ["placeholder-1"]}, {"host": "0.0.0.0"}],
)
def test_placeholder_keys_or_no_keys_on_a_public_address_refuse_to_start(tmp_path: Path, serve: dict[str, Any]) -> None:
    s = Settings(overrides={"core": {"data_dir": tmp_path}, "serve": {"port": 1, **serve}})
    with pytest.raises(InsecureConfig):
        run_server(s)  # refused before binding or loading a model (port 1 would fail otherwise)


def test_the_explicit_opt_out_allows_no_keys_on_a_public_address() -> None:
    from pydantic import SecretStr

    from serving.auth import check_exposure
    from taoflow.settings import ServeSettings

    check_exposure(ServeSettings(host="0.0.0.0", allow_open=True))
    check_exposure(ServeSettings(host="::1"))
    check_exposure(ServeSettings(host="0.0.0.0", api_keys=[SecretStr("q8Jf0vN3pL2mZ7rT")]))
