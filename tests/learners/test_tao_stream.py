"""The loop's learning half on real parts: agents emit through the SDK, the stream worker lands the prompts,
a TAO round reads them, and its rows and AdapterEvent travel over Kafka to the lander and to `taoflow.adapters`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from learners.tao import run_round
from learners.tasks import arithmetic_prompts
from taoflow.broker import EmbeddedBroker
from taoflow.emitter import Emitter
from tests.conftest import read_topic
from tests.learners.conftest import learner_settings
from tests.streams.harness import start_worker, stop, wait_for, worker_env

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_a_round_on_prompts_landed_by_the_stream_publishes_through_kafka(
    broker: EmbeddedBroker, tmp_path: Path, warm_model: Path
) -> None:
    data = tmp_path / "data"
    task = "arith-e2e"  # the session broker's topics hold other tests' events too
    settings = learner_settings(data, warm_model, bootstrap=broker.bootstrap, gate_margin=-1.0, task_types=[task])
    worker = start_worker(worker_env(broker.bootstrap, data, "tao-e2e"), tmp_path / "worker.log")
    try:
        prompts = arithmetic_prompts(50, seed=21)
        with Emitter(settings, agent_id="agents") as emitter:
            for p in prompts:  # what agents answered does not matter: TAO uses the prompts only
                emitter.emit_interaction(task_type=task, operator="direct", prompt=p, response="I am not sure.")
                emitter.emit_interaction(task_type=task, operator="direct", prompt=p, response="Twelve?")  # repeat
            emitter.flush(30)
        wait_for(data, f"SELECT count(*) FROM interactions WHERE task_type = '{task}'", lambda r: r.rows[0][0] == 100)

        result = run_round(settings)  # the lander owns the DuckDB file: the round's rows go through Kafka

        assert result.status == "published", result
        assert result.metrics["prompts_selected"] == 50  # de-duplicated by content
        done = wait_for(data, "SELECT status, prompts, heldout, timings FROM tao_rounds",
                        lambda r: r.rows and r.rows[0][0] == "published")  # fmt: skip
        _, n_train, n_heldout, timings = done.rows[0]
        m = result.metrics  # prompts of a held-out question beyond the one evaluated, or near one, are not trained on
        dropped = m["heldout_duplicates_dropped"] + m["train_near_heldout_dropped"]
        assert n_train + n_heldout + dropped == 50 and len(json.loads(timings)) == 6
        total = n_train * 4 + m["candidates_extra"]  # adaptive k: more candidates for prompts whose first k failed
        wait_for(data, "SELECT count(*) FROM tao_candidates", lambda r: r.rows[0][0] == total)
        wait_for(data, "SELECT adapter, action FROM adapters",
                 lambda r: r.rows == [[result.adapter, "published"]])  # fmt: skip
        events = [json.loads(r.value) for r in read_topic(broker.bootstrap, "taoflow.adapters", 50, timeout=10)]
        mine = [e for e in events if e["adapter"] == result.adapter]
        assert len(mine) == 1 and mine[0]["action"] == "published" and mine[0]["round_id"] == result.round_id
        assert (data / "adapters" / result.adapter / "manifest.json").exists()
    finally:
        stop(worker)
