"""The gateway with the official `openai` client, on the CPU (transformers) backend, over real HTTP."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import openai
import pytest

from serving.backends import TransformersBackend, VllmBackend
from taoflow.broker import EmbeddedBroker
from taoflow.settings import Settings
from tests.serving.harness import noise_adapter, running_gateway
from tests.streams.harness import start_worker, stop, wait_for, worker_env

KEY, ADMIN = "sk-user", "sk-admin"


def gw_settings(data: Path, base: Path, bootstrap: str, **serve: object) -> Settings:
    cfg = {"api_keys": [KEY], "admin_keys": [ADMIN], "max_tokens": 8, **serve}
    return Settings(overrides={"core": {"data_dir": data, "base_model": str(base)},
                               "kafka": {"bootstrap": bootstrap}, "serve": cfg,
                               "sdk": {"spool_dir": data / "spool"}})  # fmt: skip


@pytest.mark.broker
def test_openai_client_chat_stream_completions_feedback_each_request_lands_as_an_interaction(
    fresh_broker: EmbeddedBroker, tmp_path: Path, warm_model: Path
) -> None:
    broker = fresh_broker  # the interaction rows this test counts are exactly the ones it sent
    data = tmp_path / "data"
    adapter_dir = noise_adapter(warm_model, data / "adapters" / "ad-1", seed=1)
    operators = {"support": [{"name": "kind", "system_prompt": "Be kind."}], "default": [{"name": "plain"}]}
    settings = gw_settings(data, warm_model, broker.bootstrap, operators=operators)
    worker = start_worker(worker_env(broker.bootstrap, data, "gw-e2e"), tmp_path / "worker.log")
    try:
        backend = TransformersBackend(str(warm_model), "cpu")
        with running_gateway(settings, backend) as (url, gw):
            asyncio.run_coroutine_threadsafe(backend.load_adapter("ad-1", str(adapter_dir)), gw.loop).result(60)
            client = openai.OpenAI(base_url=url, api_key=KEY)
            assert {m.id for m in client.models.list()} >= {"taoflow", "base", "ad-1"}

            raw = client.chat.completions.with_raw_response.create(
                model="taoflow", messages=[{"role": "user", "content": "Order 1: What is 2 + 3?"}], max_tokens=4,
                temperature=0, extra_headers={"X-Taoflow-Task-Type": "support"},
            )  # fmt: skip
            chat = raw.parse()
            iid_chat = raw.headers["x-taoflow-interaction-id"]
            assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens > 0
            assert chat.model_extra["interaction_id"] == iid_chat
            assert raw.headers["x-taoflow-operator"] == "kind@base"

            pieces, iid_stream = [], None
            for ev in client.chat.completions.create(
                model="ad-1", messages=[{"role": "user", "content": "Order 2: What is 1 + 1?"}], max_tokens=6,
                temperature=0, stream=True, metadata={"task_type": "math"},
            ):  # fmt: skip
                iid_stream = ev.model_extra["interaction_id"]
                if ev.choices and ev.choices[0].delta.content:
                    pieces.append(ev.choices[0].delta.content)
            assert pieces and iid_stream

            comp = client.completions.create(model="base", prompt="What is 4 + 4?", max_tokens=4, temperature=0)
            iid_comp = comp.model_extra["interaction_id"]
            assert comp.choices[0].text is not None and comp.model_extra["taoflow"]["adapter"] is None

            fb = httpx.post(f"{url}/feedback", json={"interaction_id": iid_chat, "kind": "thumbs", "value": 1.0},
                            headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
            assert fb.status_code == 202

            rows = wait_for(data, "SELECT event_id, task_type, operator, adapter, response, metadata FROM "
                            "interactions ORDER BY ts", lambda r: len(r.rows) == 3).rows  # fmt: skip
            by_id = {r[0]: r for r in rows}
            assert by_id[iid_chat][1:4] == ["support", "kind@base", None]
            assert by_id[iid_chat][4] == chat.choices[0].message.content
            assert by_id[iid_stream][1:4] == ["math", "plain@ad-1", "ad-1"]
            assert by_id[iid_stream][4] == "".join(pieces)
            assert by_id[iid_comp][1:4] == ["default", "plain@base", None]
            meta = json.loads(by_id[iid_chat][5])
            assert meta["completion_tokens"] == chat.usage.completion_tokens and meta["endpoint"] == "chat"
            wait_for(data, f"SELECT kind, value FROM feedback WHERE interaction_id = '{iid_chat}'",
                     lambda r: r.rows == [["thumbs", 1.0]])  # fmt: skip
    finally:
        stop(worker)


def test_bad_input_gets_the_right_status_and_the_gateway_stays_up(tmp_path: Path, warm_model: Path) -> None:
    settings = gw_settings(tmp_path / "d", warm_model, "127.0.0.1:9", max_request_bytes=4096)
    with running_gateway(settings, TransformersBackend(str(warm_model), "cpu")) as (url, _):
        auth = {"Authorization": f"Bearer {KEY}"}
        chat = {"model": "taoflow", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

        def post(path: str, **kw: object) -> httpx.Response:
            return httpx.post(f"{url}{path}", timeout=60, **kw)

        r = post("/chat/completions", json=chat)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = post("/chat/completions", json=chat, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong").models.list()
        r = post("/chat/completions", json={**chat, "messages": [{"role": "user", "content": "x" * 10_000}]},
                 headers=auth)  # fmt: skip
        assert r.status_code == 413 and "exceeds the limit of 4096" in r.json()["error"]["message"]
        r = post("/chat/completions", content=b'{"model": "taoflow", "messages": [',
                 headers={**auth, "Content-Type": "application/json"})  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = post("/chat/completions", json={"model": "taoflow", "messages": []}, headers=auth)
        assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
        r = post("/chat/completions", json={**chat, "model": "gpt-9"}, headers=auth)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        with pytest.raises(openai.NotFoundError):
            openai.OpenAI(base_url=url, api_key=KEY).chat.completions.create(model="gpt-9", messages=chat["messages"])
        r = post("/chat/completions", json=chat, headers={**auth, "X-Taoflow-Operator": "nope"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "operator_not_found"
        r = httpx.get(f"{url.removesuffix('/v1')}/admin/state", headers=auth)
        assert r.status_code == 401  # a user key is not an admin key
        assert (
            httpx.get(
                f"{url.removesuffix('/v1')}/admin/state", headers={"Authorization": f"Bearer {ADMIN}"}
            ).status_code
            == 200
        )
        # still up and serving
        assert post("/chat/completions", json=chat, headers=auth).status_code == 200
        assert httpx.get(f"{url.removesuffix('/v1')}/healthz").json()["status"] == "ok"

    # a backend that is down: 503 with a clear message; the gateway itself keeps answering
    down = VllmBackend(str(warm_model), "http://127.0.0.1:9/v1")
    with running_gateway(settings, down) as (url, _):
        r = httpx.post(f"{url}/chat/completions", json=chat, headers=auth, timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable"
        assert "unreachable" in r.json()["error"]["message"]
        h = httpx.get(f"{url.removesuffix('/v1')}/healthz")
        assert h.status_code == 503 and h.json()["status"] == "backend_down"


def test_transformers_backend_refuses_what_it_cannot_serve_and_reports_the_real_finish_reason(
    tmp_path: Path, warm_model: Path
) -> None:
    settings = gw_settings(tmp_path / "d", warm_model, "127.0.0.1:9")
    with running_gateway(settings, TransformersBackend(str(warm_model), "cpu"), kafka=False) as (url, _):
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
        msg = [{"role": "user", "content": "What is 2 + 3?"}]
        tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
        for kw in ({"tools": tools}, {"n": 2}, {"logprobs": True}, {"response_format": {"type": "json_object"}}):
            with pytest.raises(openai.BadRequestError) as refused:
                client.chat.completions.create(model="taoflow", messages=msg, max_tokens=2, **kw)  # type: ignore[call-overload]
            assert refused.value.code == "unsupported_feature" and next(iter(kw)) in refused.value.message

        # max_tokens=1 is always hit by a model that has more to say: "length", in a stream as well
        one = client.chat.completions.create(model="taoflow", messages=msg, max_tokens=1, temperature=0)
        assert one.choices[0].finish_reason == "length"
        finishes = [c.choices[0].finish_reason for c in client.chat.completions.create(
            model="taoflow", messages=msg, max_tokens=1, temperature=0, stream=True) if c.choices]  # fmt: skip
        assert finishes[-1] == "length"
        plain = client.chat.completions.create(model="taoflow", messages=msg, max_tokens=2, temperature=0)
        assert plain.choices[0].message.content is not None
