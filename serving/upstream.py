"""The OpenAI-compatible upstream protocol: an HTTP client that forwards bodies whole and maps its failures, and
readers of what capture needs from a response or a stream of chunks (first choice's text or tool calls)."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import httpx
import orjson

from serving.exceptions import ServingError

log = logging.getLogger(__name__)


class UpstreamError(ServingError):
    """The upstream refused, failed, timed out or was unreachable; `error` is the OpenAI error object to return."""

    type = "server_error"

    def __init__(self, message: str, *, status: int, code: str | None = None, error: Any = None) -> None:
        super().__init__(message, status=status, code=code)
        if isinstance(error, dict) and error.get("message"):
            self.type = str(error.get("type") or self.type)
            self.error = {"message": error["message"], "type": self.type, "param": error.get("param"),
                          "code": error.get("code")}  # fmt: skip
        else:
            self.error = {"message": message, "type": self.type, "param": None, "code": self.code}


class Upstream:
    """One OpenAI-compatible server by URL, with its own key; connect and read are bounded so nothing hangs.

    Complete replies (`post`) go through aiohttp, streams through httpx: on the request path the gateway adds to
    every call, httpx's client costs about 1.4 ms of CPU per request and aiohttp's about 0.3 ms (measured against
    the same server), while httpx's line iteration and error types are what the streaming relay is built on."""

    def __init__(self, url: str, api_key: str | None, timeout_s: float) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.client: httpx.AsyncClient | None = None
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # the client's own Authorization is never forwarded: the upstream sees only the operator's key
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        connect = min(10.0, self.timeout_s)
        timeout = httpx.Timeout(self.timeout_s, connect=connect)
        self.client = httpx.AsyncClient(base_url=self.url, timeout=timeout, headers=headers)
        # as httpx's: connecting bounded, then each read (no total: a long generation that keeps sending is fine)
        bounds = aiohttp.ClientTimeout(total=None, connect=connect, sock_connect=connect, sock_read=self.timeout_s)
        self.session = aiohttp.ClientSession(headers=headers, timeout=bounds)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        if self.session is not None:
            await self.session.close()

    def _http(self) -> httpx.AsyncClient:
        if self.client is None:
            raise ServingError("the upstream client is not started (Backend.start() was not awaited)")
        return self.client

    def failure(self, exc: httpx.HTTPError | aiohttp.ClientError | TimeoutError) -> UpstreamError:
        """A transport failure (httpx's or aiohttp's) as the gateway's error: 504 on a timeout, 503 when nothing
        listens (the backend is down, as /healthz says too), 502 for a connection broken mid-answer."""
        if isinstance(exc, httpx.ConnectError | aiohttp.ClientConnectorError):
            return UpstreamError(
                f"the upstream at {self.url} is unreachable: {exc}; check that it runs and TAOFLOW_SERVE_UPSTREAM_URL",
                status=503, code="backend_unavailable",
            )  # fmt: skip
        # aiohttp's ServerTimeoutError and ConnectionTimeoutError are TimeoutErrors too
        if isinstance(exc, httpx.TimeoutException | TimeoutError):
            return UpstreamError(
                f"the upstream at {self.url} did not answer within {self.timeout_s:g} s ({type(exc).__name__}); "
                "raise TAOFLOW_SERVE_UPSTREAM_TIMEOUT_S or check the upstream",
                status=504, code="upstream_timeout",
            )  # fmt: skip
        return UpstreamError(
            f"the upstream at {self.url} broke the connection: {type(exc).__name__}: {exc}",
            status=502, code="upstream_error",
        )  # fmt: skip

    def refused(self, status: int, content: bytes) -> UpstreamError:
        """An upstream error reply: 4xx keep their status and error object, 5xx become 502."""
        try:
            doc = orjson.loads(content) if content else None
        except orjson.JSONDecodeError:
            doc = None
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, str):
            err = {"message": err}
        if status >= 500:
            detail = err.get("message") if isinstance(err, dict) else content[:200].decode(errors="replace")
            return UpstreamError(f"the upstream at {self.url} failed with {status}: {detail}", status=502,
                                 code="upstream_error")  # fmt: skip
        text = content[:300].decode(errors="replace")
        return UpstreamError(f"the upstream refused the request ({status}): {text}", status=status, error=err)

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        """POST `body`; the JSON reply ({} for a non-JSON success, e.g. vLLM's LoRA endpoints)."""
        if self.session is None:
            raise ServingError("the upstream client is not started (Backend.start() was not awaited)")
        try:
            async with self.session.post(self.url + path, data=orjson.dumps(body),
                                         headers={"Content-Type": "application/json"}) as resp:  # fmt: skip
                status, kind, content = resp.status, resp.headers.get("content-type", ""), await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self.failure(exc) from None
        if status >= 400:
            raise self.refused(status, content)
        if not content or not kind.startswith("application/json"):
            return {}
        try:
            return orjson.loads(content)
        except orjson.JSONDecodeError:
            raise UpstreamError(f"the upstream at {self.url} sent invalid JSON", status=502,
                                code="upstream_error") from None  # fmt: skip

    async def open_stream(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """Send a streaming request and return the open response once its status is known (an error status is
        raised here, so the client gets it as an HTTP status, not inside a 200 stream). The caller closes it."""
        http = self._http()
        request = http.build_request("POST", path, content=orjson.dumps(body),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            resp = await http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise self.failure(exc) from None
        if resp.status_code >= 400:
            try:
                content = await resp.aread()
            except httpx.HTTPError as exc:
                raise self.failure(exc) from None
            finally:
                await resp.aclose()
            raise self.refused(resp.status_code, content)
        return resp


def reply_text(choice: dict[str, Any]) -> str:
    """What capture records of a choice: its text, or a JSON rendering of its tool calls when it made some.

    >>> reply_text({"message": {"content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}})
    '[{"function":{"name":"f","arguments":"{}"}}]'
    """
    if "text" in choice:
        return str(choice.get("text") or "")
    msg = choice.get("message") or {}
    calls = msg.get("tool_calls")
    if calls and not msg.get("content"):
        return orjson.dumps(calls).decode()
    return str(msg.get("content") or msg.get("refusal") or "")


class Tally:
    """The first choice of a stream put back together from its chunks (content, tool-call deltas, finish
    reason) and the usage chunk, for capture."""

    def __init__(self) -> None:
        self.text = ""
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish: str | None = None
        self.usage: dict[str, Any] = {}

    def add(self, doc: dict[str, Any]) -> None:
        if isinstance(doc.get("usage"), dict):
            self.usage = doc["usage"]
        for choice in doc.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
            if "text" in choice:
                self.text += choice.get("text") or ""
                continue
            delta = choice.get("delta") or {}
            self.text += delta.get("content") or ""
            for d in delta.get("tool_calls") or ():
                call = self.calls.setdefault(int(d.get("index", 0)), {"function": {"name": "", "arguments": ""}})
                for key in ("id", "type"):
                    if d.get(key):
                        call[key] = d[key]
                fn = d.get("function") or {}
                call["function"]["name"] += fn.get("name") or ""
                call["function"]["arguments"] += fn.get("arguments") or ""

    def response(self) -> str:
        if self.calls and not self.text:
            return orjson.dumps([self.calls[i] for i in sorted(self.calls)]).decode()
        return self.text
