"""The SQL views and `taoflow report` on a DuckDB file filled by the real pipeline (SDK-shaped events through the
embedded broker, the stream worker, the lander), every number checked against a computation made here."""

from __future__ import annotations

import json
import math
import random
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from kafka import KafkaProducer

from learners.records import RecordSink, file_owned
from schemas import AdapterEvent
from taoflow.broker import EmbeddedBroker
from taoflow.cli import cli
from taoflow.settings import Settings
from tests.conftest import free_port
from tests.streams.harness import settings_for, start_worker, stop, wait_for, worker_env

pytestmark = [pytest.mark.broker, pytest.mark.slow]

N = 240
START = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict]]:
    """Runs the pipeline once over planted data; yields the data dir and what was planted."""
    tmp = tmp_path_factory.mktemp("views")
    broker = EmbeddedBroker(Settings(overrides={"broker": {"port": free_port(), "partitions": 2}})).start()
    data = tmp / "data"
    metrics_port = free_port()
    env = worker_env(broker.bootstrap, data, "views", TAOFLOW_STREAM_METRICS_PORT=str(metrics_port))
    worker = start_worker(env, tmp / "worker.log")
    rng = random.Random(5)
    planted: dict = {"interactions": [], "feedback": {}, "bad": 0, "metrics_port": metrics_port}
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    try:
        for i in range(N):
            task = "qa" if i % 3 else "code"
            op = rng.choice(["a", "b"] if task == "qa" else ["a", "c"])
            adapter = "ad1" if i >= N // 2 else None
            r = round(rng.random() * (0.8 if adapter else 0.5), 3)
            ts = START + timedelta(seconds=i * 30)  # 2 hours of traffic, 3 hourly buckets
            ev = {"event_id": f"v-{i}", "ts": ts.isoformat(), "agent_id": "t", "task_type": task, "operator": op,
                  "prompt": f"q{i}", "response": f"a{i}", "adapter": adapter, "latency_ms": 1.0,
                  "metadata": {"r": r}}  # fmt: skip
            producer.send("taoflow.interactions", key=ev["event_id"].encode(), value=json.dumps(ev).encode())
            planted["interactions"].append({**ev, "r": r, "ts": ts})
            if i % 6 == 0:
                value = float(i % 12 == 0)
                fb_ts = (ts + timedelta(seconds=1)).isoformat()
                fb = {"event_id": f"f-{i}", "interaction_id": ev["event_id"], "ts": fb_ts, "kind": "task_success",
                      "value": value, "metadata": {}}  # fmt: skip
                producer.send("taoflow.feedback", key=ev["event_id"].encode(), value=json.dumps(fb).encode())
                planted["feedback"][ev["event_id"]] = (value, ts + timedelta(seconds=1))
        for j in range(12):
            producer.send("taoflow.interactions", key=f"bad-{j}".encode(), value=b'{"event_id": "bro')
            planted["bad"] += 1
        producer.flush()
        settings = Settings(overrides={"core": {"data_dir": data}, "kafka": {"bootstrap": broker.bootstrap}})
        # the learner's rows travel to the lander over Kafka once it owns the file (before, the learner writes the
        # file itself): wait for it, so they are landed (and counted in its metrics) as in production
        deadline = time.monotonic() + 120
        while not file_owned(settings) and time.monotonic() < deadline:
            time.sleep(0.2)
        with RecordSink(settings) as sink:
            assert sink.via == "kafka"
            for k, (status, before, after) in enumerate((("gated_out", 0.3, 0.28), ("published", 0.3, 0.45))):
                sink.write("tao_rounds", [{
                    "round_id": f"r{k}", "status": status, "stage": "gate" if k == 0 else "publish",
                    "started_at": (START + timedelta(minutes=40 * k)).isoformat(),
                    "finished_at": (START + timedelta(minutes=40 * k, seconds=12.5)).isoformat(),
                    "base_model": "m", "parent_adapter": None, "adapter": "ad1" if k else None, "mode": "grpo",
                    "k": 8, "prompts": 50, "heldout": 12, "timings": {"select": 0.1, "generate": 4.0, "train": 6.0},
                    "metrics": {"candidates": 400, "prompts_uniform_skipped": 9, "heldout_reward_current": before,
                                "heldout_reward_new": after, "gain": after - before, "gain_lcb": (after - before) / 2},
                    "error": None, "seq": 1,
                }])  # fmt: skip
            for action, minutes in (("published", 55), ("promoted", 61)):
                sink.adapter_event(AdapterEvent(adapter="ad1", action=action, base_model="m",
                                                ts=START + timedelta(minutes=minutes)))  # fmt: skip
        wait_for(data, "SELECT count(*) FROM final_scores", lambda r: r.rows[0][0] == N)
        wait_for(data, "SELECT count(*) FROM scores", lambda r: r.rows[0][0] == N + len(planted["feedback"]))
        # every score is one reward, and every reward one utility update (a hop later than the score)
        wait_for(data, "SELECT count(*) FROM utility_history",
                 lambda r: r.rows[0][0] == N + len(planted["feedback"]))  # fmt: skip
        wait_for(data, "SELECT count(*) FROM dead_letters", lambda r: r.rows[0][0] == planted["bad"])
        wait_for(data, "SELECT count(*) FROM round_history", lambda r: r.rows[0][0] == 2)
        wait_for(data, "SELECT count(*) FROM adapters", lambda r: r.rows[0][0] == 2)
        yield data, planted
    finally:
        producer.close()
        stop(worker)
        broker.stop()


def final_rewards(planted: dict) -> list[dict]:
    """Each interaction's final reward and its time, as the scorer composition defines it (equal weights)."""
    out = []
    for ev in planted["interactions"]:
        fb = planted["feedback"].get(ev["event_id"])
        reward, ts = (ev["r"], ev["ts"]) if fb is None else ((ev["r"] + fb[0]) / 2, fb[1])
        out.append({**ev, "reward": reward, "final_ts": ts})
    return out


def q(data: Path, sql: str) -> list[dict]:
    from streams.sqlapi import query

    return query(sql, settings_for(data)).as_dicts()


def test_improvement_is_mean_reward_with_a_confidence_interval_per_hour_adapter_and_task_type(pipeline) -> None:
    data, planted = pipeline
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in final_rewards(planted):
        bucket = r["final_ts"].replace(minute=0, second=0, microsecond=0)
        groups[(bucket, r["adapter"] or "base", r["task_type"])].append(r["reward"])
    rows = q(data, "SELECT * FROM improvement")
    assert len(rows) == len(groups)
    for row in rows:
        vals = groups[(datetime.fromisoformat(row["bucket"]).astimezone(UTC), row["adapter"], row["task_type"])]
        mean = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        assert row["n"] == len(vals)
        assert row["mean_reward"] == pytest.approx(mean)
        assert row["ci_low"] == pytest.approx(mean - 1.96 * sd / math.sqrt(len(vals)))
        assert row["ci_high"] == pytest.approx(mean + 1.96 * sd / math.sqrt(len(vals)))


def test_operator_leaderboard_counts_picks_shares_and_rewards(pipeline) -> None:
    data, planted = pipeline
    picks: dict[tuple, int] = defaultdict(int)
    rewards: dict[tuple, list[float]] = defaultdict(list)
    for r in final_rewards(planted):
        picks[(r["task_type"], r["operator"])] += 1
        rewards[(r["task_type"], r["operator"])].append(r["reward"])
    per_task: dict[str, int] = defaultdict(int)
    for (task, _), n in picks.items():
        per_task[task] += n
    rows = q(data, "SELECT * FROM operator_leaderboard")
    utilities = {(r["task_type"], r["operator"]): r["utility"] for r in q(data, "SELECT * FROM utilities")}
    assert {(r["task_type"], r["operator"]) for r in rows} == set(picks)
    for row in rows:
        key = (row["task_type"], row["operator"])
        assert row["picks"] == picks[key]
        assert row["selection_share"] == pytest.approx(picks[key] / per_task[row["task_type"]])
        assert row["mean_reward"] == pytest.approx(sum(rewards[key]) / len(rewards[key]))
        assert row["rewarded"] == len(rewards[key])
        assert row["utility"] == pytest.approx(utilities[key])
    for task in per_task:
        ranked = [r for r in rows if r["task_type"] == task]
        assert [r["rank"] for r in ranked] == sorted(r["rank"] for r in ranked)
        assert ranked[0]["utility"] == max(r["utility"] for r in ranked)


def test_round_history_freshness_and_dead_letter_rate(pipeline) -> None:
    data, planted = pipeline
    rounds = q(data, "SELECT * FROM round_history")
    assert [r["decision"] for r in rounds] == ["gated_out", "published"]
    assert rounds[1]["reward_before"] == 0.3 and rounds[1]["reward_after"] == 0.45
    assert rounds[1]["gain"] == pytest.approx(0.15) and rounds[1]["gain_lower_bound"] == pytest.approx(0.075)
    assert rounds[1]["candidates"] == 400 and rounds[1]["prompts_without_signal"] == 9
    assert rounds[1]["seconds"] == pytest.approx(12.5) and rounds[1]["train_s"] == 6.0
    assert rounds[1]["adapter"] == "ad1"
    fresh = {r["table_name"]: r for r in q(data, "SELECT * FROM freshness")}
    assert fresh["interactions"]["rows"] == N and fresh["feedback"]["rows"] == len(planted["feedback"])
    assert fresh["dead_letters"]["rows"] == planted["bad"]
    assert 0 <= fresh["interactions"]["seconds_since_landing"] < 600
    dl = {r["source_topic"]: r for r in q(data, "SELECT * FROM dead_letter_rate")}
    assert dl["taoflow.interactions"]["accepted"] == N and dl["taoflow.interactions"]["dead_letters"] == planted["bad"]
    assert dl["taoflow.interactions"]["rate"] == pytest.approx(planted["bad"] / (N + planted["bad"]))
    assert dl["taoflow.feedback"]["rate"] == 0


def test_report_json_csv_and_table(pipeline) -> None:
    data, planted = pipeline
    env = {"TAOFLOW_DATA_DIR": str(data)}
    final = final_rewards(planted)
    res = CliRunner().invoke(cli, ["report", "--format", "json"], env=env, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["rewards"]["n"] == N
    assert doc["rewards"]["mean"] == pytest.approx(sum(r["reward"] for r in final) / N)
    assert [e["action"] for e in doc["adapter_events"]] == ["published", "promoted"]
    assert len(doc["rounds"]) == 2 and len(doc["leaderboard"]) == 4
    res = CliRunner().invoke(cli, ["report", "--format", "json", "--task-type", "code"], env=env)
    code = [r for r in final if r["task_type"] == "code"]
    doc = json.loads(res.stdout)
    assert doc["rewards"]["n"] == len(code) and {r["task_type"] for r in doc["leaderboard"]} == {"code"}
    since = (START + timedelta(hours=1)).isoformat()
    doc = json.loads(CliRunner().invoke(cli, ["report", "--format", "json", "--since", since], env=env).stdout)
    assert doc["rewards"]["n"] == sum(r["final_ts"] >= START + timedelta(hours=1) for r in final)
    res = CliRunner().invoke(cli, ["report", "--format", "csv"], env=env)
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "bucket,adapter,task_type,n,mean_reward,ci_low,ci_high"
    assert sum(int(line.split(",")[3]) for line in lines[1:]) == N
    res = CliRunner().invoke(cli, ["report"], env={**env, "COLUMNS": "160"})
    assert res.exit_code == 0
    out = res.stdout
    assert "Reward over time" in out and "Operator leaderboard" in out and "TAO rounds" in out
    assert "▲" in out and "★" in out and any(c in out for c in "▁▂▃▄▅▆▇█")
    assert "gated_out" in out and "published" in out
    res = CliRunner().invoke(cli, ["report", "--since", "yesterday-ish"], env=env)
    assert res.exit_code == 1 and "--since 'yesterday-ish'" in res.output


def test_dashboard_in_headless_chromium_draws_the_tables_numbers(pipeline, tmp_path: Path) -> None:
    """Debian's chromium signs in and loads the dashboard from the dashboard server alone (plotly.js included,
    under its Content-Security-Policy): one reward panel per task type with its interval band and the adapter
    markers, the numbers behind it matching the planted data, the tables filled; a screenshot is saved with the
    test's output."""
    from fastapi.testclient import TestClient

    from serving.dashboard import build_dashboard_app
    from streams.sqlapi import bucket_width
    from tests.serving.test_dashboard import plots, render, traces

    data, planted = pipeline
    settings = Settings(overrides={"core": {"data_dir": data}, "serve": {"admin_keys": ["sk-admin"]}})
    with TestClient(build_dashboard_app(settings)) as client:
        assert client.get("/dashboard/data").status_code == 401  # admin scope
        assert client.get("/dashboard?key=sk-admin").status_code == 400  # keys never travel in URLs
        doc = client.get("/dashboard/data", headers={"Authorization": "Bearer sk-admin"}).json()
    dom, log, shot = render(build_dashboard_app(settings), tmp_path, key="sk-admin")
    assert 'data-loaded="1"' in dom, dom[-2000:]
    assert "Content Security Policy" not in log and "Uncaught" not in log, log[-2000:]
    # the numbers: mean final reward, n and 95% interval per task type, adapter and bucket, computed here
    final = final_rewards(planted)
    first, last = min(r["final_ts"] for r in final), max(r["final_ts"] for r in final)
    width = bucket_width(first.isoformat(), last.isoformat(), 60)  # the dashboard's bucket count
    assert doc["bucket_seconds"] == width
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in final:
        start = datetime.fromtimestamp(r["final_ts"].timestamp() // width * width, UTC)
        groups[(r["task_type"], r["adapter"] or "base", start)].append(r["reward"])
    drawn = [(p["task_type"], s["name"], q) for p in doc["reward_panels"] for s in p["series"] for q in s["points"]]
    assert len([d for d in drawn if d[2]["y"] is not None]) == len(groups)
    for task, adapter, point in drawn:
        if point["y"] is None:
            continue
        vals = groups[(task, adapter, datetime.fromisoformat(point["x"]).astimezone(UTC))]
        mean = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        assert (point["n"], point["y"]) == (len(vals), pytest.approx(mean))
        assert point["ci_low"] == pytest.approx(mean - 1.96 * sd / math.sqrt(len(vals)))
    # the drawing: a plot per task type (reward, then utilities), each with a line and a band per adapter, a point
    # per bucket, and the published and promoted markers
    panels = plots(dom)
    assert sorted(p["task_type"] for p in doc["reward_panels"]) == ["code", "qa"]
    assert sorted(panels) == ["code", "qa"] and sorted(plots(dom, "utilities")) == ["code", "qa"]
    for panel in doc["reward_panels"]:
        drawn_traces = traces(panels[panel["task_type"]])
        buckets = [sum(q["y"] is not None for q in s["points"]) for s in panel["series"]]
        assert [t["points"] for t in drawn_traces if t["points"]] == buckets
        assert len([t for t in drawn_traces if t["fill"]]) == len(panel["series"])
        assert [t["symbols"] for t in drawn_traces if t["symbols"]] == [1, 1]  # published, promoted
        assert f"{panel['task_type']} · " in dom  # the panel's title
    assert "gated_out" in dom and "operator_leaderboard" not in dom  # the rounds table is filled
    assert "lander consumer lag: 0 records" in dom
    assert shot.exists() and shot.stat().st_size > 10_000


def test_worker_and_lander_expose_prometheus_metrics(pipeline) -> None:
    import httpx

    data, planted = pipeline
    worker = httpx.get(f"http://127.0.0.1:{planted['metrics_port']}/metrics").text
    assert f'taoflow_worker_events_total{{kind="interactions"}} {float(N)}' in worker
    assert f'taoflow_worker_events_total{{kind="dead_letters"}} {float(planted["bad"])}' in worker
    import re

    kinds = {k: float(v) for k, v in re.findall(r'taoflow_worker_events_total\{kind="(\w+)"\} ([\d.]+)', worker)}
    # feedback that arrived before its interaction is parked first, then joined
    assert kinds.get("feedback", 0) + kinds.get("feedback_parked", 0) == len(planted["feedback"])
    lander_url = json.loads((data / "lander.json").read_text())["url"]
    lander = httpx.get(f"{lander_url}/metrics").text
    assert f'taoflow_lander_rows_total{{table="interactions"}} {float(N)}' in lander
    assert 'taoflow_lander_rows_total{table="tao_rounds"} 2.0' in lander
    assert "taoflow_lander_batch_seconds_count" in lander and "taoflow_lander_lag_records" in lander
