"""LLM-as-judge scorer through any OpenAI-compatible chat endpoint: pointwise, or ranking a prompt's candidates.

Requests of one call go out concurrently (`concurrency` in flight) and verdicts are cached by content, in
memory or in a SQLite file, so a repeated (prompt, response) costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from learners.exceptions import ScorerConfigError
from learners.rewards.specs import LlmJudgeSpec

log = logging.getLogger(__name__)

POINTWISE = (
    "You grade responses. Rubric: {rubric}\n"
    "Reply with a single integer score from 0 (worst) to 10 (best) and nothing else."
)
RANKING = (
    "You compare candidate responses to the same request. Rubric: {rubric}\n"
    "Reply with the candidate numbers from best to worst, comma separated (e.g. 2,1,3), and nothing else."
)
_INT = re.compile(r"\d+")


def _text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in prompt)


def parse_score(reply: str) -> float | None:
    """A 0-10 verdict as a reward in [0, 1]; None when the reply holds no number.

    >>> parse_score("7"), parse_score("Score: 10/10"), parse_score("no idea")
    (0.7, 1.0, None)
    """
    m = _INT.search(reply)
    return None if m is None else min(10, int(m.group())) / 10


def parse_ranking(reply: str, n: int) -> list[float] | None:
    """A best-to-worst order of n candidates as rewards (best 1.0, worst 0.0); unranked ones share the rest.
    None when there is nothing to rank: one candidate alone is neither better nor worse than anything.

    >>> parse_ranking("2, 1, 3", 3)
    [0.5, 1.0, 0.0]
    >>> parse_ranking("2", 3)
    [0.25, 1.0, 0.25]
    >>> parse_ranking("1", 1) is None
    True
    """
    if n < 2:
        return None
    order: list[int] = []
    for tok in _INT.findall(reply):
        i = int(tok) - 1
        if 0 <= i < n and i not in order:
            order.append(i)
    if not order:
        return None
    rewards = [0.0] * n
    for rank, i in enumerate(order):
        rewards[i] = 1 - rank / (n - 1)
    rest = [i for i in range(n) if i not in order]
    if rest:  # the unranked tie below the ranked ones: the mean of the ranks left
        mean = sum(1 - r / (n - 1) for r in range(len(order), n)) / len(rest)
        for i in rest:
            rewards[i] = mean
    return rewards


class _Cache:
    """Verdicts by content hash: a dict, or a SQLite file shared across rounds and processes."""

    def __init__(self, path: str | None) -> None:
        self.mem: dict[str, str] = {}
        self.lock = threading.Lock()
        self.db = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.db = sqlite3.connect(path, check_same_thread=False)
            self.db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, reply TEXT NOT NULL)")
            self.db.commit()

    def get(self, key: str) -> str | None:
        with self.lock:
            if key in self.mem:
                return self.mem[key]
            if self.db is not None:
                row = self.db.execute("SELECT reply FROM verdicts WHERE key = ?", (key,)).fetchone()
                if row:
                    self.mem[key] = row[0]
                    return str(row[0])
        return None

    def put(self, key: str, reply: str) -> None:
        with self.lock:
            self.mem[key] = reply
            if self.db is not None:
                self.db.execute("INSERT OR REPLACE INTO verdicts VALUES (?, ?)", (key, reply))
                self.db.commit()


class LlmJudge:
    """The scorer function for an `llm_judge` spec."""

    def __init__(self, spec: LlmJudgeSpec) -> None:
        import httpx

        self.spec = spec
        headers = {}
        if spec.api_key_env:
            key = os.environ.get(spec.api_key_env)
            if not key:
                raise ScorerConfigError(f"llm_judge: environment variable {spec.api_key_env} is not set")
            headers["Authorization"] = f"Bearer {key}"
        self.client = httpx.Client(base_url=spec.base_url.rstrip("/"), headers=headers, timeout=spec.timeout_s)
        self.cache = _Cache(spec.cache_path)
        self.requests = 0
        self.cache_hits = 0

    def _ask(self, system: str, user: str) -> str:
        key = hashlib.sha256(json.dumps([self.spec.model, system, user]).encode()).hexdigest()
        cached = self.cache.get(key)
        if cached is not None:
            self.cache_hits += 1
            return cached
        import httpx

        body = {"model": self.spec.model, "temperature": 0, "max_tokens": 64,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}  # fmt: skip
        try:
            resp = self.client.post("/chat/completions", json=body)
            resp.raise_for_status()
            reply = str(resp.json()["choices"][0]["message"]["content"] or "")
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            raise ScorerConfigError(f"llm_judge at {self.spec.base_url} failed: {exc}") from None
        self.requests += 1
        self.cache.put(key, reply)
        return reply

    def __call__(self, completions: list[str], *, prompts: list[Any], **kwargs: Any) -> list[float | None]:
        rubric = self.spec.rubric
        out: list[float | None] = [None] * len(completions)
        with ThreadPoolExecutor(max_workers=self.spec.concurrency) as pool:
            if self.spec.mode == "pointwise":
                system = POINTWISE.format(rubric=rubric)
                users = [f"Request:\n{_text(p)}\n\nResponse:\n{c}" for p, c in zip(prompts, completions, strict=True)]
                unique = list(dict.fromkeys(users))  # a repeated (prompt, response) is asked once
                replies = dict(zip(unique, pool.map(lambda u: self._ask(system, u), unique), strict=True))
                return [parse_score(replies[u]) for u in users]
            # ranking: candidates of one prompt sit next to each other; rank each group in one request
            groups: list[list[int]] = []
            for i, p in enumerate(prompts):
                if groups and prompts[groups[-1][0]] == p:
                    groups[-1].append(i)
                else:
                    groups.append([i])
            system = RANKING.format(rubric=rubric)

            def rank(group: list[int]) -> list[float] | None:
                if len(group) < 2:  # a group of one cannot be ranked: no request, no reward (the scorer abstains)
                    return None
                listing = "\n\n".join(f"Candidate {n + 1}:\n{completions[i]}" for n, i in enumerate(group))
                reply = self._ask(system, f"Request:\n{_text(prompts[group[0]])}\n\n{listing}")
                return parse_ranking(reply, len(group))

            for group, rewards in zip(groups, pool.map(rank, groups), strict=True):
                if rewards is not None:
                    for i, r in zip(group, rewards, strict=True):
                        out[i] = r
        return out
