"""The gateway's protocol: the OpenAI-shaped request models it accepts, and how their fields are checked and kept.

`serving.gateway` routes, serves and captures; what a request may say, and how capture keeps a message, lives here
(as vLLM keeps its OpenAI protocol models apart from its serving handlers)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from serving.auth import Principal
from serving.exceptions import BadRequest
from serving.router import Operator

TASK_HEADER = "x-taoflow-task-type"
OPERATOR_HEADER = "x-taoflow-operator"
AGENT_HEADER = "x-taoflow-agent"
ID_HEADER = "X-Taoflow-Interaction-Id"
OTHER = "other"  # the metric label of task types not configured in `operators`


SESSION_HEADER = "x-taoflow-session"
STEP_HEADER = "x-taoflow-step"
SESSION_ID = re.compile(r"[A-Za-z0-9._:/@-]{1,256}")
MAX_STEP = 1_000_000
# task types and agent ids become DuckDB values and metric labels: a plain charset, bounded length
LABEL = re.compile(r"[A-Za-z0-9._:/-]{1,64}")
MAX_STOP = 4  # as OpenAI
MAX_STOP_CHARS = 256
MAX_N = 16  # choices per request an upstream may be asked for: each costs a full generation
# what a local model cannot honour: asked for, they get a 400 rather than being silently ignored
UNSUPPORTED_LOCALLY = ("tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs")


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class _SamplingRequest(BaseModel):
    """What chat and text completions share; other OpenAI parameters are relayed to an upstream backend whole,
    and refused by the local backend where it cannot honour them."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(stops)}")
        if any(len(x) > MAX_STOP_CHARS for x in stops):
            raise ValueError(f"a stop sequence may have at most {MAX_STOP_CHARS} characters")
        return value


class ChatRequest(_SamplingRequest):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_SamplingRequest):
    prompt: str


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    interaction_id: str | None = Field(default=None, min_length=1)
    session_id: str | None = Field(default=None, min_length=1)  # feedback on a whole multi-step session
    kind: str
    value: float
    metadata: dict[str, Any] = Field(default_factory=dict)


def message_text(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def check_label(value: str, what: str) -> str:
    if not LABEL.fullmatch(value):
        raise BadRequest(
            f"{what} {value[:80]!r} is not allowed: use 1 to 64 of letters, digits and . _ : / -", code="invalid_" +
            what.replace(" ", "_"),
        )  # fmt: skip
    return value


def refuse_unsupported_locally(req: Any) -> None:
    """Refuse what the local (transformers) backend cannot serve, naming the field and the way out."""
    extra = req.model_extra or {}
    asked = [k for k in UNSUPPORTED_LOCALLY if extra.get(k) not in (None, False, [], "none")]
    fmt = extra.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        asked.append("response_format")
    if req.n != 1:
        asked.append("n")
    if asked:
        raise BadRequest(
            f"the transformers backend cannot serve {', '.join(asked)}: drop them, or put an OpenAI-compatible "
            "server behind the gateway (TAOFLOW_SERVE_BACKEND=openai or vllm)",
            code="unsupported_feature",
        )


def captured_message(m: _Message) -> dict[str, Any]:
    """A client message as capture keeps it: role, text, and the tool call fields of tool-using turns."""
    out: dict[str, Any] = {"role": m.role, "content": message_text(m.content) if m.content is not None else None}
    if m.name:
        out["name"] = m.name
    extra = m.model_extra or {}
    for key in ("tool_call_id", "tool_calls"):
        if extra.get(key) is not None:
            out[key] = extra[key]
    if out["content"] is None and "tool_calls" not in out:
        out["content"] = ""
    return out


def session_of(request: Request, meta: dict[str, Any]) -> tuple[str | None, int | None]:
    """The session id and step a request names (header first, then metadata), checked."""
    sid = request.headers.get(SESSION_HEADER) or meta.get("session_id")
    raw_step = request.headers.get(STEP_HEADER) if request.headers.get(STEP_HEADER) is not None else meta.get("step")
    if sid is None:
        if raw_step is not None:
            raise BadRequest("a step needs a session: send X-Taoflow-Session (or metadata.session_id)",
                             code="invalid_session")  # fmt: skip
        return None, None
    sid = str(sid)
    if not SESSION_ID.fullmatch(sid):
        raise BadRequest(f"session id {sid[:80]!r} is not allowed: use 1 to 256 of letters, digits and . _ : / @ -",
                         code="invalid_session")  # fmt: skip
    if raw_step is None:
        return sid, None
    try:
        step = int(str(raw_step))
    except ValueError:
        step = -1
    if not 0 <= step <= MAX_STEP:
        raise BadRequest(f"step {str(raw_step)[:20]!r} is not an integer from 0 to {MAX_STEP}", code="invalid_session")
    return sid, step


@dataclass
class Call:
    """One request as the gateway handles it: who asked, how it was routed, and what its capture records."""

    iid: str
    req: Any  # the parsed ChatRequest or CompletionRequest
    chat: bool
    task_type: str
    op: Operator
    forced: bool  # the client chose the operator or adapter: captured, never in utilities
    principal: Principal
    agent: str | None  # the X-Taoflow-Agent header, as sent
    prompt: Any  # as the client sent it: the messages (tool calls and results included) or the text
    session_id: str | None = None
    step: int | None = None

    @property
    def endpoint(self) -> str:
        return "chat" if self.chat else "completions"

    def headers(self) -> dict[str, str]:
        out = {ID_HEADER: self.iid, "X-Taoflow-Operator": self.op.name, "X-Taoflow-Adapter": self.op.adapter or "base",
               "X-Taoflow-Task-Type": self.task_type}  # fmt: skip
        if self.session_id is not None:
            out.update({"X-Taoflow-Session": self.session_id, "X-Taoflow-Step": str(self.step)})
        return out
