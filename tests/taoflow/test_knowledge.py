"""Portable knowledge: utilities learned on one base model seed another deployment's routing, which then follows its
own rewards (broker-free worker with real processors and a real DuckDB file, the real Router; the CLI round trip
through the real embedded broker)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from click.testing import CliRunner

from learners.actr import selection_probabilities
from schemas import Limits
from schemas import topics as names
from schemas.fast import fast_utility
from schemas.registry import export_json_schemas
from serving.router import Router
from streams import rewards
from streams.topics import REWARDS_INTERNAL
from taoflow import knowledge, report
from taoflow.cli import cli
from taoflow.settings import Settings
from tests.conftest import read_topic
from tests.streams.memory import Worker

NOW = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
# the SOAR-style set the README declares: a fast direct path, a reasoning path, a verify path
OPERATORS = {"math": [
    {"name": "direct", "template": "Answer with the result only: {prompt}"},
    {"name": "reason", "system_prompt": "Think step by step, then give the answer on the last line."},
    {"name": "verify", "system_prompt": "Answer, then check the answer and correct it if it is wrong."},
]}  # fmt: skip


def deployment(tmp_path: Path, name: str, **serve: Any) -> tuple[Worker, Settings]:
    """A fresh deployment on its own base model and data dir: the worker, and the settings the CLI would read."""
    model = str(tmp_path / "models" / name)
    worker = Worker(tmp_path / name)
    settings = Settings(overrides={"core": {"data_dir": tmp_path / name, "base_model": model},
                                   "serve": {"operators": OPERATORS, **serve}})  # fmt: skip
    return worker, settings


def learn(worker: Worker, task: str, rewards_by_op: dict[str, list[float]], tag: str) -> None:
    """Interactions served by each operator, interleaved, each scored with its planted reward."""
    docs: list[dict[str, Any] | bytes] = []
    longest = max(len(v) for v in rewards_by_op.values())
    for i in range(longest):
        for op, rs in rewards_by_op.items():
            if i < len(rs):
                docs.append({"event_id": f"{tag}-{op}-{i}", "ts": NOW.isoformat(), "agent_id": "a", "task_type": task,
                             "operator": op, "prompt": f"q{i}", "response": "r", "metadata": {"r": rs[i]}})  # fmt: skip
    worker.send_batch(names.INTERACTIONS, docs)


def apply_seeds(worker: Worker, records: list[tuple[bytes, bytes]]) -> list[dict[str, Any]]:
    """Hand records to the worker's rewards processor as Kafka would, land its outputs; the UtilityEvents made."""
    batch = [worker.produce(REWARDS_INTERNAL, key, value) for key, value in records]
    out = worker.ctx.outbox()
    rewards.process_batch(worker.ctx, out, batch)
    made = [worker.produce(t, k, v) for t, msgs in out.msgs.items() for k, v, _ in msgs if v is not None]
    worker.land(made)
    return [orjson.loads(r.value) for r in made if r.topic == names.UTILITIES]


def router_for(worker: Worker, settings: Settings) -> Router:
    """The gateway's router, fed every UtilityEvent the worker published, as the gateway reads them."""
    cfg = settings.stream
    router = Router(settings.serve, initial_utility=cfg.initial_utility, noise_s=cfg.noise_s, alpha=cfg.alpha, seed=0)
    for rec in worker.log[names.UTILITIES]:
        u = fast_utility(rec.value, Limits())
        assert u is not None
        router.update_utility(u["task_type"], u["operator"], u["utility"], u["n"], u["last_reward"], live=True)
    return router


def choice(router: Router, task: str, noise_s: float) -> dict[str, float]:
    """The router's probability of choosing each strategy (ACT-R's softmax over its utilities)."""
    return selection_probabilities({o.spec.name: router.utility(task, o.name) for o in router.operators(task)},
                                   noise_s)  # fmt: skip


def order(probabilities: dict[str, float]) -> list[str]:
    return sorted(probabilities, key=lambda k: -probabilities[k])


def test_knowledge_moves_to_another_base_model_and_yields_to_its_own_rewards(tmp_path: Path) -> None:
    # model A: reasoning works best, the direct path worst; an adapter trained there is better still at reasoning
    a, settings_a = deployment(tmp_path, "model-a")
    learn(a, "math", {"reason@base": [0.9] * 30, "verify@base": [0.5] * 30, "direct@base": [0.2] * 30,
                      "reason@tao-a1": [1.0] * 10}, "a")  # fmt: skip
    a.con.close()
    doc = knowledge.export_knowledge(settings_a)
    path = tmp_path / "knowledge.json"
    path.write_text(knowledge.dumps(doc))
    schema = json.loads((export_json_schemas(tmp_path / "schemas")[-1]).read_text())
    assert schema["$id"].endswith("KnowledgeFile.schema.json")
    jsonschema.validate(json.loads(path.read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**json.loads(path.read_text()), "version": 2}, schema)
    exported = {(u.strategy, u.adapter): u for u in doc.utilities}
    assert exported[("reason", "tao-a1")].n == 10 and exported[("direct", None)].n == 30
    assert doc.learned_on.base_model == str(tmp_path / "models" / "model-a")
    assert [s.name for s in doc.operators["math"]] == ["direct", "reason", "verify"]

    # model B: a fresh deployment; before the import every strategy is equally likely
    b, settings_b = deployment(tmp_path, "model-b")
    noise = settings_b.stream.noise_s
    before = choice(router_for(b, settings_b), "math", noise)
    assert max(before.values()) - min(before.values()) < 1e-9
    plan = knowledge.plan_import(knowledge.load(path), settings_b)
    seeds = {s.operator: s for s in plan.seeds}
    assert set(seeds) == {"reason@base", "verify@base", "direct@base"}  # the adapter's utility seeds the base's
    assert seeds["reason@base"].exported_n == 40 and seeds["reason@base"].evidence == 4  # discount 0.1
    assert seeds["reason@base"].sources == ("reason@base", "reason@tao-a1")
    assert seeds["reason@base"].value == pytest.approx((0.9 * 30 + 1.0 * 10) / 40, abs=0.01)  # bias-corrected
    records = knowledge.seed_records(plan)
    published = apply_seeds(b, records)
    assert {(u["operator"], u["n"], u["imported"], u["last_reward"]) for u in published} == {
        ("reason@base", 4, 4, None), ("verify@base", 3, 3, None), ("direct@base", 3, 3, None)}  # fmt: skip
    start = choice(router_for(b, settings_b), "math", noise)
    assert order(start) == ["reason", "verify", "direct"]  # routing starts from the imported order
    assert start["reason"] > 0.5

    # the same file again changes nothing: each seed counts once
    assert apply_seeds(b, records) == [] and b.ctx.counters["duplicate_rewards"] == 3

    # on model B the direct path is best and reasoning worst: its own rewards take over
    learn(b, "math", {"reason@base": [0.1], "verify@base": [0.4], "direct@base": [0.9]}, "b0")
    assert order(choice(router_for(b, settings_b), "math", noise))[0] == "reason"  # one reward does not overturn it
    learn(b, "math", {"reason@base": [0.1] * 20, "verify@base": [0.4] * 20, "direct@base": [0.9] * 20}, "b1")
    final = choice(router_for(b, settings_b), "math", noise)
    assert order(final) == ["direct", "verify", "reason"] and final["direct"] > 0.5

    # the report shows imported vs learned evidence per operator
    b.con.close()
    data = report.gather(settings_b)
    shown = {e["operator"]: (e["learned"], e["imported"]) for e in data["evidence"]}
    assert shown == {"reason@base": (21, 4), "verify@base": (21, 3), "direct@base": (21, 3)}
    # re-exported, B's file keeps both apart, so knowledge passed on is discounted again where it lands
    again = {u.strategy: (u.n, u.imported) for u in knowledge.export_knowledge(settings_b).utilities}
    assert again == {"reason": (21, 4), "verify": (21, 3), "direct": (21, 3)}


def test_an_import_never_overrides_what_the_deployment_learned_itself(tmp_path: Path) -> None:
    b, _ = deployment(tmp_path, "model-b")
    learn(b, "math", {"verify@base": [0.3] * 5}, "own")
    own = b.sql("SELECT utility, n, imported FROM utilities WHERE operator = 'verify@base'")
    seeds = [
        knowledge.Seed("math", "verify@base", 0.95, 8, 80, ("verify@base",)),
        knowledge.Seed("math", "reason@base", 0.95, 8, 80, ("reason@base",)),
    ]
    published = apply_seeds(b, [s.record("e" * 32, NOW.timestamp()) for s in seeds])
    assert [u["operator"] for u in published] == ["reason@base"]
    assert b.ctx.counters["seeds_skipped"] == 1
    assert b.sql("SELECT utility, n, imported FROM utilities WHERE operator = 'verify@base'") == own
    # a malformed seed is dead-lettered with its reason, never folded in
    bad = orjson.dumps({"seed": True, "r": 0.5, "n": 0, "src": "import:x", "pos": 0, "iid": None, "ts": 1.0})
    assert apply_seeds(b, [(b"math/direct@base", bad)]) == []
    assert "integer n >= 1" in b.sql("SELECT error FROM dead_letters")[0][0]


def test_strategies_not_configured_here_are_reported_with_their_definitions(tmp_path: Path) -> None:
    a, settings_a = deployment(tmp_path, "model-a")
    learn(a, "math", {"reason@base": [0.9] * 5, "direct@base": [0.2] * 5}, "a")
    a.con.close()
    doc = knowledge.export_knowledge(settings_a)
    only_direct = Settings(overrides={"core": {"data_dir": tmp_path / "c"},
                                      "serve": {"operators": {"default": [{"name": "direct"}]}}})  # fmt: skip
    plan = knowledge.plan_import(doc, only_direct, adapter="tao-c7")
    assert [s.operator for s in plan.seeds] == ["direct@tao-c7"]
    assert [s.name for s in plan.missing["math"]] == ["reason"]
    assert any("direct is defined differently" in d for d in plan.differing)  # the template differs there
    toml = plan.toml(only_direct)
    assert '[[serve.operators."math"]]\nname = "direct"' in toml
    assert 'name = "reason"\nsystem_prompt = "Think step by step' in toml
    import tomllib

    declared = tomllib.loads(toml)["serve"]["operators"]["math"]
    assert [o["name"] for o in declared] == ["direct", "reason"]


def invoke(args: list[str], data_dir: Path, bootstrap: str | None = None) -> Any:
    env = {"TAOFLOW_DATA_DIR": str(data_dir), "TAOFLOW_SERVE_OPERATORS": json.dumps(OPERATORS)}
    if bootstrap:
        env["TAOFLOW_KAFKA_BOOTSTRAP"] = bootstrap
    return CliRunner().invoke(cli, args, env=env)


def test_cli_round_trip_through_the_broker_and_one_line_errors(tmp_path: Path, broker: Any) -> None:
    a, _ = deployment(tmp_path, "model-a")
    learn(a, "math", {"reason@base": [0.9] * 10, "direct@base": [0.2] * 10}, "a")
    a.con.close()
    path = tmp_path / "k.json"
    result = invoke(["knowledge", "export", str(path)], tmp_path / "model-a")
    assert result.exit_code == 0, result.output
    assert "exported 2 utilities of 1 task type(s)" in result.output
    export_id = json.loads(path.read_text())["export_id"]

    b, settings_b = deployment(tmp_path, "model-b")
    result = invoke(["knowledge", "import", str(path)], tmp_path / "model-b", broker.bootstrap)
    assert result.exit_code == 0, result.output
    assert "math/reason@base: utility 0.900" in result.output and "sent 2 seed(s)" in result.output
    sent = [r for r in read_topic(broker.bootstrap, REWARDS_INTERNAL, expected=2, timeout=30)
            if orjson.loads(r.value)["src"] == f"import:{export_id}"]  # fmt: skip
    assert len(sent) == 2
    apply_seeds(b, [(r.key, r.value) for r in sent])  # what the running worker does with them
    assert order(choice(router_for(b, settings_b), "math", settings_b.stream.noise_s))[0] == "reason"

    result = invoke(["knowledge", "import", "--dry-run", str(path)], tmp_path / "model-b")
    assert result.exit_code == 0 and "dry run: 2 seed(s) not sent" in result.output

    for content, message in (
        ("{not json", "is not valid JSON at line 1 column 2"),
        (json.dumps({**json.loads(path.read_text()), "version": 2}), "version 2; this taoflow reads version 1 only: "
                                                                      "upgrade taoflow"),
        (json.dumps({"some": "thing"}), "is not a taoflow knowledge file"),
        (json.dumps({**json.loads(path.read_text()), "utilities": [{"task_type": "math"}]}), "field 'utilities.0.n'"),
    ):  # fmt: skip
        bad = tmp_path / "bad.json"
        bad.write_text(content)
        result = invoke(["knowledge", "import", str(bad)], tmp_path / "model-b", broker.bootstrap)
        assert result.exit_code == 1, result.output
        assert message in result.stderr and result.stderr.startswith("error: ")
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    result = invoke(["knowledge", "export", str(tmp_path / "x.json")], tmp_path / "empty")
    assert result.exit_code == 1 and "no outcome database" in result.stderr
