"""Adapter hot-swap under load: 8 clients send continuously while an adapter is published (canary), promoted
and rolled back. No request fails, traffic switches at the expected points, and every response was produced
by exactly the adapter the router chose for it (checked against each adapter's own greedy answers).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import openai
import pytest
from kafka import KafkaProducer

from schemas import AdapterEvent, UtilityEvent
from serving.backends import GenRequest, TransformersBackend
from taoflow.broker import EmbeddedBroker
from taoflow.settings import Settings
from tests.conftest import read_topic
from tests.serving.harness import noise_adapter, running_gateway

pytestmark = [pytest.mark.broker, pytest.mark.slow]

TASK = "swap"
PROMPTS = [f"Order {i}: What is {i} + {i + 1}?" for i in range(4)]


async def _references(base: Path, adapter: Path) -> dict[tuple[str | None, str], str]:
    """Each prompt's greedy answer from the base and from the adapter, computed apart from the gateway."""
    b = TransformersBackend(str(base), "cpu")
    await b.start()
    await b.load_adapter("swap-a", str(adapter))
    out = {}
    for name in (None, "swap-a"):
        for p in PROMPTS:
            req = GenRequest(messages=[{"role": "user", "content": p}], adapter=name, max_tokens=6, temperature=0)
            out[(name, p)] = (await b.generate(req)).text
    await b.close()
    return out


def test_publish_promote_rollback_under_load_fails_nothing_and_serves_the_routed_adapter(
    fresh_broker: EmbeddedBroker, tmp_path: Path, warm_model: Path
) -> None:
    data = tmp_path / "data"
    adapter = noise_adapter(warm_model, data / "adapters" / "swap-a", seed=7)
    refs = asyncio.run(_references(warm_model, adapter))
    assert all(refs[(None, p)] != refs[("swap-a", p)] for p in PROMPTS), "the adapter must answer differently"
    settings = Settings(overrides={
        "core": {"data_dir": data, "base_model": str(warm_model)},
        "kafka": {"bootstrap": fresh_broker.bootstrap},
        "serve": {"max_tokens": 6, "canary_fraction": 0.3, "watch_fraction": 0.3, "promote_after": 10},
    })  # fmt: skip
    producer = KafkaProducer(bootstrap_servers=fresh_broker.bootstrap)

    counts: dict[str, int] = {}

    def utility(op: str, u: float, n: int) -> None:
        counts[op] = n
        ev = UtilityEvent(task_type=TASK, operator=op, utility=u, n=n, last_reward=u)
        producer.send("taoflow.utilities", key=f"{TASK}/{op}".encode(), value=ev.to_json_bytes())
        producer.flush()

    def rewards(op: str, reward: float, k: int) -> None:
        """k rewards of an operator, as the stream reports them (each update carries the reward it folded in)."""
        for _ in range(k):
            utility(op, reward, counts.get(op, 0) + 1)

    results: list[dict] = []
    failures: list[str] = []
    stop = threading.Event()

    with running_gateway(settings, TransformersBackend(str(warm_model), "cpu")) as (url, gw):

        def client(i: int) -> None:
            c = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
            n = 0
            while not stop.is_set():
                prompt = PROMPTS[(i + n) % len(PROMPTS)]
                n += 1
                try:
                    raw = c.chat.completions.with_raw_response.create(
                        model="taoflow", messages=[{"role": "user", "content": prompt}], max_tokens=6, temperature=0,
                        extra_headers={"X-Taoflow-Task-Type": TASK},
                    )  # fmt: skip
                    body = raw.parse()
                    extra = body.model_extra
                    results.append({"t": time.monotonic(), "prompt": prompt, "text": body.choices[0].message.content,
                                    "adapter": extra["taoflow"]["adapter"], "header": raw.headers["x-taoflow-adapter"],
                                    "iid": extra["interaction_id"]})  # fmt: skip
                except Exception as exc:  # any failure is a test failure; keep going to count them all
                    failures.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(8)]
        for t in threads:
            t.start()

        def wait(pred, what: str, timeout: float = 120) -> float:
            deadline = time.monotonic() + timeout
            while not pred():
                assert time.monotonic() < deadline, f"timed out waiting for {what}; failures: {failures[:3]}"
                time.sleep(0.1)
            return time.monotonic()

        wait(lambda: len(results) >= 16, "traffic on the base")
        utility("default@base", 0.5, 10)
        t_publish = time.monotonic()
        publish = AdapterEvent(adapter="swap-a", action="published", base_model=str(warm_model), path=str(adapter))
        producer.send("taoflow.adapters", key=publish.key(), value=publish.to_json_bytes())
        producer.flush()
        wait(lambda: gw.router.canary == "swap-a", "the canary")
        t_canary = time.monotonic()
        wait(
            lambda: (
                sum(r["adapter"] == "swap-a" for r in results if r["t"] > t_canary + 0.5) >= 5
                and sum(r["adapter"] is None for r in results if r["t"] > t_canary + 0.5) >= 5
            ),
            "canary traffic",
        )

        rewards("default@swap-a", 1.0, 12)  # the canary's rewards beat the incumbent's, same time, same strategy
        rewards("default@base", 0.0, 12)
        t_promote = wait(lambda: gw.router.incumbent == "swap-a", "the promotion")
        wait(lambda: sum(r["t"] > t_promote + 1 for r in results) >= 16, "traffic after the promotion")

        rewards("default@swap-a", 0.0, 12)  # then, watched, it does worse than the base it replaced
        rewards("default@base", 1.0, 12)
        t_rollback = wait(lambda: gw.router.incumbent is None and "swap-a" not in gw.backend.adapters, "the rollback")
        wait(lambda: sum(r["t"] > t_rollback + 1 for r in results) >= 16, "traffic after the rollback")
        stop.set()
        for t in threads:
            t.join(120)
        audit = list(gw.audit)

    assert not failures, failures[:5]
    assert len(results) >= 60
    # every response came from exactly the adapter the router chose: its text is that adapter's own answer
    for r in results:
        assert r["header"] == (r["adapter"] or "base")
        assert r["text"] == refs[(r["adapter"], r["prompt"])], r
    assert all(a["routed"] == a["served"] for a in audit), [a for a in audit if a["routed"] != a["served"]][:3]
    assert {a["iid"] for a in audit} >= {r["iid"] for r in results}
    # traffic switched at the expected points
    assert all(r["adapter"] is None for r in results if r["t"] < t_publish)
    canary = [r["adapter"] for r in results if t_canary + 0.5 < r["t"] < t_promote]
    assert "swap-a" in canary and None in canary  # canary: a share, not all
    # promoted: it serves the traffic, the base it replaced keeps its watch share
    watched = [r["adapter"] for r in results if t_promote + 1 < r["t"] < t_rollback - 0.5]
    assert watched.count("swap-a") > len(watched) / 2, watched
    assert all(r["adapter"] is None for r in results if r["t"] > t_rollback + 1)
    # every transition is recorded on taoflow.adapters
    events = [json.loads(r.value) for r in read_topic(fresh_broker.bootstrap, "taoflow.adapters", 6, timeout=30)]
    assert [e["action"] for e in events if e["adapter"] == "swap-a"] == [
        "published", "loaded", "canary", "promoted", "rolled_back", "unloaded",
    ]  # fmt: skip
    producer.close()
