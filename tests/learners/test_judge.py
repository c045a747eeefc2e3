"""The LLM-judge scorer against a real HTTP server speaking the OpenAI chat-completions protocol.

The server stands in for a judge model (we have none here): it grades by a fixed rule, so the scores the
scorer computes from its replies can be checked exactly.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from learners.exceptions import ScorerConfigError
from learners.rewards.registry import build_scorer
from learners.rewards.specs import LlmJudgeSpec


class _Judge(BaseHTTPRequestHandler):
    calls: ClassVar[list[dict]] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append(body)
        if self.path != "/v1/chat/completions" or self.headers.get("Authorization") != "Bearer sk-test":
            self.send_response(401)
            self.end_headers()
            return
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        if "best to worst" in system:  # ranking: longer candidates rank higher
            cands = re.findall(r"Candidate (\d+):\n(.*?)(?=\n\nCandidate|\Z)", user, re.S)
            reply = ",".join(n for n, _ in sorted(cands, key=lambda c: -len(c[1])))
        else:  # pointwise: 10 if the response mentions "refund", else 2
            reply = "10" if "refund" in user.split("Response:")[-1] else "2"
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


@pytest.fixture
def judge_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    _Judge.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_pointwise_judge_scores_and_caches(judge_url: str, tmp_path) -> None:
    spec = LlmJudgeSpec(base_url=judge_url, model="judge", api_key_env="JUDGE_KEY", cache_path=str(tmp_path / "c.db"))
    scorer = build_scorer(spec)
    prompts = ["Where is my money?"] * 3
    assert scorer(["I issued a refund.", "Please wait.", "I issued a refund."], prompts=prompts) == [1.0, 0.2, 1.0]
    assert len(_Judge.calls) == 2  # the repeated pair was answered from the cache
    again = build_scorer(spec)  # a new process-alike reads the SQLite cache
    assert again(["Please wait."], prompts=prompts[:1]) == [0.2]
    assert len(_Judge.calls) == 2
    assert _Judge.calls[0]["model"] == "judge" and _Judge.calls[0]["temperature"] == 0


def test_ranking_judge_ranks_each_prompts_candidates_together(judge_url: str) -> None:
    scorer = build_scorer(LlmJudgeSpec(base_url=judge_url, model="j", api_key_env="JUDGE_KEY", mode="ranking"))
    completions = ["a", "abc", "ab", "xy", "x"]
    prompts = ["p1", "p1", "p1", "p2", "p2"]
    assert scorer(completions, prompts=prompts) == [0.0, 1.0, 0.5, 1.0, 0.0]
    assert len(_Judge.calls) == 2  # one request per prompt's group


def test_judge_errors_are_clear(judge_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ScorerConfigError, match="NOPE_KEY is not set"):
        build_scorer(LlmJudgeSpec(base_url=judge_url, model="j", api_key_env="NOPE_KEY"))
    monkeypatch.setenv("WRONG", "sk-wrong")
    scorer = build_scorer(LlmJudgeSpec(base_url=judge_url, model="j", api_key_env="WRONG"))
    with pytest.raises(ScorerConfigError, match=r"llm_judge at .* failed: .*401"):
        scorer(["x"], prompts=["p"])


def test_a_round_hands_the_judge_each_prompts_candidates_together_across_temperatures(judge_url: str) -> None:
    """The generate stage samples per (strategy, temperature); scored, a prompt's candidates sit together, so a
    ranking judge ranks all k of them in one request (not one ranking per temperature, incomparable)."""
    from types import SimpleNamespace

    from learners.progress import Reporter
    from learners.rewards.composite import CompositeScorer
    from learners.tao import Prompt, Round

    class Generator:  # k/2 answers per prompt and temperature, longer at the higher temperature
        def generate(self, texts: list[str], n: int, temperature: float, **kw: object) -> list[list[str]]:
            return [[f"{t}-{temperature}-{'x' * (j + int(temperature * 10))}" for j in range(n)] for t in texts]

    spec = LlmJudgeSpec(base_url=judge_url, model="j", api_key_env="JUDGE_KEY", mode="ranking")
    r = Round.__new__(Round)  # the generate stage's sampling alone
    r.cfg = SimpleNamespace(strategies=["plain"], temperatures=[0.5, 1.0], max_new_tokens=4)
    r.render = lambda prompt, strategy: prompt
    r.scorer = CompositeScorer([build_scorer(spec)])
    r.reporter = Reporter()
    prompts = [Prompt(hash=f"h{i}", prompt=f"p{i}", task_type="t", metadata={}) for i in range(2)]
    out: dict[str, list[dict]] = {p.hash: [] for p in prompts}
    r._sample(Generator(), prompts, 4, out)
    assert len(_Judge.calls) == 2  # one ranking per prompt, of its 4 candidates from both temperatures
    for p in prompts:
        got = out[p.hash]
        assert {c["temperature"] for c in got} == {0.5, 1.0} and len(got) == 4
        assert sorted(c["reward"] for c in got) == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
