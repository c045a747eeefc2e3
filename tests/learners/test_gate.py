"""The gate's statistics: the split by the underlying question, the decision, and its false-publish rate."""

from __future__ import annotations

import json
import random
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from learners.gate import decide, normalise, score_pairs, spent_alpha, split_prompts
from learners.rewards.composite import CompositeScorer
from learners.rewards.registry import build_scorer
from learners.rewards.specs import LlmJudgeSpec
from learners.tao import Prompt


def test_prompts_that_differ_only_by_ids_spacing_or_case_share_a_side() -> None:
    same = ["Order 4821: What is 12 + 7?", "order 99120:   what is 12+7 ?", "ORDER 5555: What is 12 +7?"]
    others = [f"Order {1000 + i}: What is {i} + {i + 20}?" for i in range(40)]
    assert len({normalise(p) for p in same}) == 1
    for seed in range(5):
        s = split_prompts(same + others, fraction=0.3, trained=set(), seed=seed)
        sides = {0 if i in s.heldout else 1 if i in s.train else 2 for i in range(3)}
        assert sides in ({0, 2}, {1}), "one question is held out (evaluated once) or trained on, never both"


def test_nothing_near_a_heldout_prompt_is_trained_on() -> None:
    long = (
        "please check the delivery status of the parcel that was shipped to paris last week for customer {} "
        "and tell me when it will arrive at the address we gave you, thanks"
    )
    near = [long.format(n) for n in ("12", "13", "14")]  # short numbers are content: distinct questions, near texts
    far = [f"what is the capital of country number {i} in the list" + " and more" * (i % 3) for i in range(30)]
    prompts = near + far
    for seed in range(10):
        s = split_prompts(prompts, fraction=0.3, trained=set(), seed=seed)
        if any(i < 3 for i in s.heldout):
            assert not any(i < 3 for i in s.train), s
            assert s.near_duplicates_dropped >= 3 - sum(i < 3 for i in s.heldout)


def test_the_heldout_draw_is_fresh_per_round_and_never_takes_a_trained_question() -> None:
    prompts = [f"What is {i} + {i * 3}?" for i in range(50)]
    from learners.gate import question_key

    trained = {question_key(p) for p in prompts[:30]}
    draws = [set(split_prompts(prompts, fraction=0.2, trained=trained, seed=s).heldout) for s in range(3)]
    for d in draws:
        assert d and all(i >= 30 for i in d)
    assert len({frozenset(d) for d in draws}) > 1, "each round draws its own held-out set"


def test_every_task_type_gets_heldout_questions_however_few_it_has() -> None:
    """Stratified by task type: a task type with a handful of questions among many of another is still gated."""
    prompts = [f"What is {i} + {i * 3}?" for i in range(95)] + [f"Reverse the letters {c} {c}x" for c in "abcde"]
    groups = ["math"] * 95 + ["reverse"] * 5
    for seed in range(20):
        s = split_prompts(prompts, fraction=0.1, trained=set(), seed=seed, groups=groups)
        held = [groups[i] for i in s.heldout]
        assert held.count("reverse") >= 1 and held.count("math") >= 9, held
        assert any(groups[i] == "reverse" for i in s.train), "one held out of five leaves the rest to train on"
    # a task type with one question stays in training (nothing would be left of it)
    s = split_prompts([*prompts[:95], "Reverse the letters a b"], fraction=0.1, trained=set(), seed=0,
                      groups=[*groups[:95], "reverse"])  # fmt: skip
    assert 95 in s.train


def test_the_gate_refuses_a_per_task_regression_even_when_the_pooled_gain_is_positive() -> None:
    rng = random.Random(0)
    current = [0.0] * 60 + [1.0] * 20  # math: 60 prompts the parent fails; json: 20 it passes
    new = [1.0] * 60 + [1.0 if rng.random() < 0.5 else 0.0 for _ in range(20)]  # math solved, json halved
    tasks = ["math"] * 60 + ["json"] * 20
    d = decide(current, new, tasks, alpha=0.1, margin=0.0, task_margin=0.05, seed=0)
    assert d.metrics["gain"] > 0.5 and d.metrics["gain_lcb"] > 0, "the pooled gain alone would publish"
    assert not d.publish
    assert "task json" in d.reason and d.metrics["task.json.gain"] < -0.05 and d.metrics["task.math.gain"] == 1.0
    ok = decide(current, [1.0] * 80, tasks, alpha=0.1, margin=0.0, task_margin=0.05, seed=0)
    assert ok.publish, ok.reason


def test_prompts_no_scorer_applies_to_are_left_out_not_counted_as_zero() -> None:
    d = decide([1.0, None, 0.0, None], [1.0, None, 1.0, 0.5], ["a"] * 4, alpha=0.5, margin=-1, task_margin=1, seed=0)
    assert d.metrics["heldout_scored"] == 2 and d.metrics["heldout_unscorable"] == 2
    assert d.metrics["heldout_reward_current"] == 0.5 and d.metrics["heldout_reward_new"] == 1.0


def _noop_round(rng: random.Random, n: int = 40, samples: int = 2) -> tuple[list[float], list[float]]:
    """Held-out rewards of a parent and a no-op adapter (the same policy) under sampling: only noise differs."""
    ps = [rng.random() for _ in range(n)]  # each prompt's pass rate
    draw = lambda p: sum(rng.random() < p for _ in range(samples)) / samples  # noqa: E731
    return [draw(p) for p in ps], [draw(p) for p in ps]


def _false_publishes(rounds: int, policy: str, alpha: float, seed: int) -> int:
    rng, index, published = random.Random(seed), 1, 0
    for r in range(rounds):
        cur, new = _noop_round(rng)
        d = decide(cur, new, ["t"] * len(cur), alpha=spent_alpha(alpha, index, policy), margin=0.0,
                   task_margin=1.0, seed=r)  # fmt: skip
        if d.publish:
            published += 1
            index = 1  # a published adapter is the next parent: its own spending starts over
        else:
            index += 1
    return published


def test_false_publish_rate_over_200_no_op_rounds_stays_within_the_stated_level() -> None:
    """Without spending, a 90% gate publishes about 1 in 10 no-gain rounds; with basel spending the chance that a
    lineage ever publishes a no-gain adapter is at most alpha = 0.1, so 200 rounds publish at most one."""
    alpha = 0.1
    unspent = _false_publishes(200, "none", alpha, seed=1)
    spent = _false_publishes(200, "basel", alpha, seed=1)
    assert 8 <= unspent <= 40, f"the uncontrolled gate should show the problem: {unspent} false publishes"
    assert spent <= 1, f"{spent} no-op adapters published in 200 rounds"
    # the family-wise rate, estimated over independent 20-round lineages, is within alpha (plus sampling slack)
    lineages = [_false_publishes(20, "basel", alpha, seed=100 + i) > 0 for i in range(40)]
    assert sum(lineages) / len(lineages) <= alpha + 0.08


class _RankingJudge(BaseHTTPRequestHandler):
    """A judge over real HTTP: ranks the candidate holding the right answer to "What is a + b?" first."""

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][1]["content"]
        a, b = map(int, re.search(r"What is (\d+) \+ (\d+)\?", user).groups())  # type: ignore[union-attr]
        cands = re.findall(r"Candidate (\d+):\n(.*?)(?=\n\nCandidate|\Z)", user, re.S)
        reply = ",".join(n for n, text in sorted(cands, key=lambda c: c[1].strip() != str(a + b)))
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


@pytest.fixture
def judge_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RankingJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_a_ranking_judge_compares_the_two_policies_so_the_gate_can_publish(judge_url: str) -> None:
    spec = LlmJudgeSpec(type="llm_judge", base_url=judge_url, model="judge", mode="ranking", rubric="correct")
    scorer = CompositeScorer([build_scorer(spec)])
    prompts = [Prompt(str(i), f"What is {i} + {i}?", "math", {}) for i in range(12)]
    current = [[str(2 * i + 1)] for i in range(12)]  # the parent is wrong
    new = [[str(2 * i)] for i in range(12)]  # the new adapter is right
    cur, nw = score_pairs(scorer, prompts, current, new, seed=0)
    assert cur == [0.0] * 12 and nw == [1.0] * 12
    d = decide(cur, nw, ["math"] * 12, alpha=0.1, margin=0.0, task_margin=0.05, seed=0)
    assert d.publish, d.reason
    # alone, a response is a group of one: nothing to rank, so the judge abstains instead of giving 1.0
    assert scorer.rule_parts(["3"], prompts=["What is 1 + 2?"], task_types=["math"], metadata=[{}]) == [{}]
