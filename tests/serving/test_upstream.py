"""The `openai` upstream backend: the official `openai` client through the gateway (real HTTP both sides) to a
small OpenAI-compatible server started here; the upstream is an external service, so a protocol-speaking test
server stands in for it. Captured events are the real InteractionEvents the gateway hands to its emitter."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import openai
import pytest

from schemas.base import EventModel
from serving.backends import OpenAIBackend, build_backend
from taoflow.settings import Settings
from tests.conftest import free_port
from tests.serving.harness import running_gateway

KEY, UPSTREAM_KEY, TIMEOUT_S = "sk-user", "sk-upstream", 1.0
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather of a city", "parameters": CITY}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


class FakeUpstream(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat server: calls the tool when offered tools, answers after a tool result, honours
    n / response_format / logprobs / stream_options; the last user message can ask for a failure."""

    bodies: ClassVar[list[dict[str, Any]]] = []
    auths: ClassVar[list[str | None]] = []

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(200, {"object": "list", "data": [{"id": "up-model", "object": "model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        type(self).auths.append(self.headers.get("Authorization"))
        last = body["messages"][-1]
        said = last.get("content") if last["role"] == "user" else None
        if said == "refuse":
            err = {"message": "tools[0] is invalid", "type": "invalid_request_error", "param": "tools",
                   "code": "invalid_tools"}  # fmt: skip
            return self._send(400, {"error": err})
        if said == "boom":
            return self._send(500, {"error": {"message": "CUDA out of memory", "type": "server_error"}})
        if said == "stall":
            time.sleep(TIMEOUT_S * 3)
            return self._send(200, {})
        if body.get("stream"):
            return self._stream(body, stall=said == "stall later")
        if last["role"] == "tool":
            message: dict[str, Any] = {"role": "assistant", "content": f"It is sunny ({last['content']})."}
            finish = "stop"
        elif body.get("tools"):
            message, finish = {"role": "assistant", "content": None, "tool_calls": [CALL]}, "tool_calls"
        elif (body.get("response_format") or {}).get("type") == "json_object":
            message, finish = {"role": "assistant", "content": '{"answer": 42}'}, "stop"
        else:
            message, finish = {"role": "assistant", "content": "plain"}, "length"
        logprobs = None
        if body.get("logprobs"):
            top = [{"token": t, "logprob": -0.5, "bytes": None} for t in ("a", "b")][: body.get("top_logprobs", 0)]
            logprobs = {"content": [{"token": "plain", "logprob": -0.1, "bytes": None, "top_logprobs": top}]}
        choices = [
            {"index": i, "message": {**message, **({"content": f"answer {i}"} if i else {})}, "finish_reason": finish,
             "logprobs": logprobs}
            for i in range(body.get("n", 1))
        ]  # fmt: skip
        self._send(200, {"id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": body["model"],
                         "choices": choices, "usage": USAGE, "system_fingerprint": "fp_up"})  # fmt: skip

    def _stream(self, body: dict[str, Any], stall: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        base = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
        fn = CALL["function"]
        deltas: list[tuple[dict[str, Any], str | None]] = [
            ({"role": "assistant", "content": None}, None),
            ({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "weather"}}]}, None),
            ({"tool_calls": [{"index": 0, "function": {"arguments": fn["arguments"][:9]}}]}, None),
            ({"tool_calls": [{"index": 0, "function": {"arguments": fn["arguments"][9:]}}]}, None),
            ({}, "tool_calls"),
        ]
        for n, (delta, finish) in enumerate(deltas):
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self.wfile.flush()
            if stall and n == 1:
                time.sleep(TIMEOUT_S * 3)
                return
        if (body.get("stream_options") or {}).get("include_usage"):
            self.wfile.write(b"data: " + json.dumps({**base, "choices": [], "usage": USAGE}).encode() + b"\n\n")
        self.wfile.write(b"data: [DONE]\n\n")


class Captured:
    """The emitter seam: keeps the events the gateway emits."""

    def __init__(self) -> None:
        self.events: list[EventModel] = []

    def emit(self, event: EventModel) -> str:
        self.events.append(event)
        return str(getattr(event, "event_id", ""))

    def close(self) -> None: ...

    def since(self, before: int, n: int, timeout: float = 10.0) -> list[Any]:
        """The `n` events emitted after the first `before`: a non-streamed reply is captured once it is sent, so
        the capture may come a moment after the client has the reply."""
        deadline = time.monotonic() + timeout
        while len(self.events) < before + n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.events) == before + n, f"{len(self.events) - before} events captured, expected {n}"
        return self.events[before:]


def upstream_settings(tmp: Path, url: str) -> Settings:
    operators = {"support": [{"name": "kind", "system_prompt": "Be kind."}], "default": [{"name": "plain"}],
                 "mix": [{"name": "terse", "system_prompt": "Be terse."}, {"name": "verbose",
                                                                          "system_prompt": "Be verbose."}]}  # fmt: skip
    serve = {"backend": "openai", "upstream_url": url, "upstream_api_key": UPSTREAM_KEY, "upstream_model": "up-model",
             "upstream_timeout_s": TIMEOUT_S, "api_keys": [KEY], "max_tokens": 64, "operators": operators}  # fmt: skip
    return Settings(overrides={"core": {"data_dir": tmp}, "kafka": {"bootstrap": "127.0.0.1:9"}, "serve": serve})


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeUpstream)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.fixture(scope="module")
def gw(upstream: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[openai.OpenAI, Captured]]:
    cap = Captured()
    settings = upstream_settings(tmp_path_factory.mktemp("gw"), upstream)
    backend = build_backend(settings)
    assert isinstance(backend, OpenAIBackend)
    with running_gateway(settings, backend, kafka=False, emitter=cap) as (url, _):
        yield openai.OpenAI(base_url=url, api_key=KEY, max_retries=0), cap


def test_tool_calling_round_trip_relays_every_field_and_returns_the_tool_calls(
    gw: tuple[openai.OpenAI, Captured],
) -> None:
    client, cap = gw
    before = len(cap.events)
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    raw = client.chat.completions.with_raw_response.create(
        model="taoflow", messages=ask, tools=TOOLS, tool_choice="auto", parallel_tool_calls=False, seed=7,
        stop=["\n\n"], presence_penalty=0.5, frequency_penalty=0.25, user="u-1", max_tokens=1000,
        metadata={"task_type": "support", "answer": "sunny"}, extra_body={"future_field": {"x": 1}},
    )  # fmt: skip
    first = raw.parse()
    sent = FakeUpstream.bodies[-1]
    assert sent["tools"] == TOOLS and sent["tool_choice"] == "auto" and sent["parallel_tool_calls"] is False
    assert (sent["seed"], sent["stop"], sent["user"], sent["future_field"]) == (7, ["\n\n"], "u-1", {"x": 1})
    assert (sent["presence_penalty"], sent["frequency_penalty"]) == (0.5, 0.25)
    assert sent["model"] == "up-model" and sent["max_tokens"] == 64, "model mapped, token bound kept"
    assert "metadata" not in sent, "the gateway's routing/reference metadata must not leave for the upstream"
    assert sent["messages"][0] == {"role": "system", "content": "Be kind."}, "the operator's system prompt"
    assert FakeUpstream.auths[-1] == f"Bearer {UPSTREAM_KEY}", "the upstream sees its own key, not the client's"

    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert (call.id, call.function.name) == ("call_1", "weather")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert first.usage.total_tokens == 18 and first.system_fingerprint == "fp_up"
    assert first.model_extra["interaction_id"] == raw.headers["x-taoflow-interaction-id"]

    followup = [*ask, choice.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "22 C"}]  # fmt: skip
    final = client.chat.completions.create(model="taoflow", messages=followup, tools=TOOLS)
    assert final.choices[0].message.content == "It is sunny (22 C)." and final.choices[0].finish_reason == "stop"
    relayed = FakeUpstream.bodies[-1]["messages"]
    assert relayed[-2]["tool_calls"][0]["id"] == "call_1" and relayed[-1]["tool_call_id"] == "call_1"

    events = cap.since(before, 2)
    calls = json.loads(events[0].response)
    assert calls[0]["function"]["name"] == "weather"
    # what a learner needs of a tool-using call: the tools offered, the calls made, the finish reason
    assert events[0].tools == TOOLS and events[0].tool_calls == [CALL] and events[0].finish_reason == "tool_calls"
    assert events[1].response == "It is sunny (22 C)." and events[1].finish_reason == "stop"
    assert events[1].tool_calls is None
    # the second step's prompt keeps the tool-using turns: the assistant's call and the tool's result
    turns = [m.model_dump(exclude_none=True) for m in events[1].prompt]
    assert turns[1]["tool_calls"][0]["id"] == "call_1" and turns[2] == {
        "role": "tool",
        "content": "22 C",
        "tool_call_id": "call_1",
    }


def test_stream_passes_tool_call_deltas_usage_and_the_real_finish_reason(gw: tuple[openai.OpenAI, Captured]) -> None:
    client, cap = gw
    before = len(cap.events)
    chunks = list(client.chat.completions.create(
        model="taoflow", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    assert FakeUpstream.bodies[-1]["stream_options"] == {"include_usage": True}
    args = "".join(c.choices[0].delta.tool_calls[0].function.arguments or ""
                   for c in chunks if c.choices and c.choices[0].delta.tool_calls)  # fmt: skip
    assert json.loads(args) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 18
    assert len({c.model_extra["interaction_id"] for c in chunks}) == 1

    events = cap.events[before:]
    assert len(events) == 1, "one stream, one interaction"
    ev: Any = events[0]
    assert json.loads(ev.response) == [CALL] and ev.finish_reason == "tool_calls" and ev.tool_calls == [CALL]
    assert ev.metadata["completion_tokens"] == 7 and ev.metadata["stream"] is True


def test_response_format_n_and_logprobs_come_back_whole(gw: tuple[openai.OpenAI, Captured]) -> None:
    client, cap = gw
    before = len(cap.events)
    msg = [{"role": "user", "content": "Answer in JSON"}]
    js = client.chat.completions.create(model="taoflow", messages=msg, response_format={"type": "json_object"})
    assert json.loads(js.choices[0].message.content or "") == {"answer": 42}
    assert FakeUpstream.bodies[-1]["response_format"] == {"type": "json_object"}
    [ev] = cap.since(before, 1)
    assert ev.response_format == {"type": "json_object"} and ev.tools is None and ev.finish_reason == "stop"

    many = client.chat.completions.create(model="taoflow", messages=[{"role": "user", "content": "hi"}], n=2,
                                          logprobs=True, top_logprobs=2)  # fmt: skip
    assert [c.message.content for c in many.choices] == ["plain", "answer 1"]
    assert many.choices[0].finish_reason == "length", "the upstream's finish reason, not a constant"
    lp = many.choices[0].logprobs
    assert lp is not None and lp.content is not None and [t.token for t in lp.content[0].top_logprobs] == ["a", "b"]


def test_upstream_failures_are_mapped_never_hang_and_leave_the_gateway_serving(
    gw: tuple[openai.OpenAI, Captured],
) -> None:
    client, cap = gw
    before = len(cap.events)

    def ask(text: str, **kw: Any) -> Any:
        return client.chat.completions.create(model="taoflow", messages=[{"role": "user", "content": text}], **kw)

    with pytest.raises(openai.BadRequestError) as refused:
        ask("refuse")
    assert refused.value.status_code == 400 and refused.value.code == "invalid_tools"
    assert refused.value.param == "tools", "the upstream's own error object passes through"
    with pytest.raises(openai.BadRequestError):
        ask("refuse", stream=True)  # a refused stream is a 400 too, not an error inside a 200 stream

    with pytest.raises(openai.InternalServerError) as failed:
        ask("boom")
    assert failed.value.status_code == 502 and "CUDA out of memory" in failed.value.message

    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as timed_out:
        ask("stall")
    assert timed_out.value.status_code == 504 and "TIMEOUT_S" in timed_out.value.message
    assert time.monotonic() - t0 < TIMEOUT_S + 2

    t0 = time.monotonic()
    got: list[Any] = []
    with pytest.raises(openai.APIError, match="did not answer"):
        for chunk in ask("stall later", stream=True):
            got.append(chunk)
    assert got and time.monotonic() - t0 < TIMEOUT_S + 2, "the stalled stream is cut after the timeout"

    assert len(cap.events) == before, "failed requests are not captured"
    assert ask("still there?").choices[0].message.content == "plain"
    cap.since(before, 1)


def test_unreachable_upstream_is_a_503_with_the_setting_to_check(tmp_path: Path) -> None:
    settings = upstream_settings(tmp_path, f"http://127.0.0.1:{free_port()}/v1")
    with running_gateway(settings, build_backend(settings), kafka=False, emitter=Captured()) as (url, _):
        r = httpx.post(f"{url}/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "taoflow", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
        assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable"
        assert "TAOFLOW_SERVE_UPSTREAM_URL" in r.json()["error"]["message"]
        assert httpx.get(f"{url.removesuffix('/v1')}/healthz").status_code == 503


def test_a_session_keeps_its_operator_across_steps_and_takes_session_feedback(
    gw: tuple[openai.OpenAI, Captured], upstream: str
) -> None:
    """Three steps of one session through the official client: the operator of the first step serves them all
    (sticky, although routing is random per request), steps are numbered, and feedback may name the session."""
    client, cap = gw
    before = len(cap.events)
    chosen = set()
    for _ in range(20):  # without a session each request is routed afresh: both operators come up (1 - 2^-19)
        r = client.chat.completions.with_raw_response.create(
            model="taoflow", messages=[{"role": "user", "content": "hi"}], extra_headers={"X-Taoflow-Task-Type": "mix"}
        )
        chosen.add(r.headers["x-taoflow-operator"])
    assert chosen == {"terse@base", "verbose@base"}
    ops, steps = [], []
    for n in range(8):  # in a session they all get the first step's (by chance alone: 2^-7)
        r = client.chat.completions.with_raw_response.create(
            model="taoflow", messages=[{"role": "user", "content": f"step {n}"}],
            extra_headers={"X-Taoflow-Task-Type": "mix", "X-Taoflow-Session": "ticket-42"},
        )  # fmt: skip
        ops.append(r.headers["x-taoflow-operator"])
        steps.append(r.headers["x-taoflow-step"])
    assert len(set(ops)) == 1 and steps == [str(n) for n in range(8)]
    # the step may also come from the client, through metadata
    r = client.chat.completions.with_raw_response.create(
        model="taoflow", messages=[{"role": "user", "content": "last"}],
        metadata={"session_id": "ticket-42", "step": "7", "task_type": "mix"},  # the client's own numbering
    )  # fmt: skip
    assert r.headers["x-taoflow-operator"] == ops[0] and r.headers["x-taoflow-step"] == "7"
    session = [e for e in cap.since(before, 29) if getattr(e, "session_id", None) == "ticket-42"]
    assert [(e.step, e.operator) for e in session] == [(n, ops[0]) for n in (*range(8), 7)]  # type: ignore[attr-defined]
    assert all("session_id" not in e.metadata for e in session)  # type: ignore[attr-defined]

    http = httpx.Client(base_url=str(client.base_url), headers={"Authorization": f"Bearer {KEY}"})
    ok = http.post("/feedback", json={"session_id": "ticket-42", "kind": "task_success", "value": 1.0})
    assert ok.status_code == 202 and ok.json()["session_id"] == "ticket-42"
    fb: Any = cap.events[-1]
    assert (fb.session_id, fb.interaction_id, fb.kind) == ("ticket-42", None, "task_success") and fb.caller
    both = http.post("/feedback", json={"session_id": "s", "interaction_id": "i", "kind": "thumbs", "value": 1.0})
    neither = http.post("/feedback", json={"kind": "thumbs", "value": 1.0})
    assert both.status_code == neither.status_code == 400 and "exactly one" in both.json()["error"]["message"]
    bad = client.chat.completions.with_raw_response
    with pytest.raises(openai.BadRequestError, match="session id"):
        bad.create(model="taoflow", messages=[{"role": "user", "content": "x"}],
                   extra_headers={"X-Taoflow-Session": "no spaces allowed"})  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="step"):
        bad.create(model="taoflow", messages=[{"role": "user", "content": "x"}],
                   extra_headers={"X-Taoflow-Session": "s", "X-Taoflow-Step": "-1"})  # fmt: skip
