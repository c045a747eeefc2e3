"""TAO rounds on the tiny model, on CPU: stages recorded, the gate, publishing, crashes in every stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from learners.exceptions import LearnerError
from learners.progress import STAGES
from learners.records import RecordSink
from learners.recovery import recover
from learners.state import learner_dir, round_lock
from learners.tao import Round, run_round
from learners.tasks import arithmetic_prompts
from tests.learners.conftest import announce, land_prompts, learner_settings

ROOT = Path(__file__).parents[2]


def rows(settings, sql: str) -> list[tuple]:
    con = duckdb.connect(str(settings.core.duckdb_path), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_round_publishes_a_recorded_adapter_and_the_next_round_continues_from_it(tmp_path, warm_model) -> None:
    # the gate always passes here
    settings = learner_settings(tmp_path / "d", warm_model, gate_margin=-1.0, gate_task_margin=1.0)
    land_prompts(settings, arithmetic_prompts(60, seed=3))

    first = run_round(settings)

    assert first.status == "published", first
    adapter = settings.core.adapters_dir / first.adapter
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["round_id"] == first.round_id and manifest["base_model"] == str(warm_model)
    import hashlib

    for name, digest in manifest["files"].items():
        assert hashlib.sha256((adapter / name).read_bytes()).hexdigest() == digest
    assert "adapter_model.safetensors" in manifest["files"]
    (status, stage, timings, metrics, prompts, heldout) = rows(
        settings, "SELECT status, stage, timings, metrics, prompts, heldout FROM tao_rounds"
    )[0]
    assert (status, stage) == ("published", "publish")
    assert set(json.loads(timings)) == set(STAGES)
    metrics = json.loads(metrics)
    for key in ("heldout_reward_current", "heldout_reward_new", "gain_lcb", "prompts_uniform_skipped", "candidates"):
        assert key in metrics
    dropped = metrics["heldout_duplicates_dropped"] + metrics["train_near_heldout_dropped"]
    assert prompts + heldout + dropped == 60 and heldout > 0
    # k candidates for every training prompt (more for those whose first k failed), each with its reward
    total = prompts * 4 + metrics["candidates_extra"]
    assert rows(settings, "SELECT count(*), count(DISTINCT prompt_hash), count(reward) FROM tao_candidates")[0] == (
        total, prompts, total,
    )  # fmt: skip
    assert rows(settings, "SELECT adapter, action, sha256 FROM adapters") == [
        (first.adapter, "published", manifest["sha256"])
    ]
    assert not any(p.name.startswith(".staging") for p in settings.core.adapters_dir.iterdir())

    second = run_round(settings)  # the gateway has not promoted the first adapter: it is a canary, not a parent
    announce(settings, first.adapter, "promoted")
    third = run_round(settings)
    assert second.status == third.status == "published"
    parents = dict(rows(settings, "SELECT round_id, parent_adapter FROM tao_rounds"))
    assert parents == {first.round_id: None, second.round_id: None, third.round_id: first.adapter}


def test_gate_refuses_a_deliberately_bad_adapter(tmp_path, warm_model) -> None:
    """An adapter whose LoRA weights are noise answers worse than the base; the gate says so, with numbers."""
    import torch
    from peft import LoraConfig, get_peft_model

    from learners.generation import load_policy

    settings = learner_settings(tmp_path / "d", warm_model)
    model, _ = load_policy(str(warm_model), None, device="cpu", dtype=None, trainable=True)
    bad = get_peft_model(model, LoraConfig(r=8, lora_alpha=64, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in bad.named_parameters():
            if "lora_" in name:
                p.normal_(0, 1.0)
    bad_dir = tmp_path / "bad-adapter"
    bad.save_pretrained(bad_dir)

    heldout = [p for p in _prompts(settings, 120) if p.heldout] or _prompts(settings, 120)
    with RecordSink(settings, prefer_kafka=False) as sink:
        rnd = Round(settings, sink)
        passed = rnd.gate(heldout, bad_dir)

    m = rnd.metrics
    assert m["heldout_reward_current"] > 0.1, "the warm base must be weak but not useless for this test to mean much"
    assert not passed
    assert m["heldout_reward_new"] < m["heldout_reward_current"] and m["gain_lcb"] < 0


def _prompts(settings, n):
    import hashlib

    from learners.tao import Prompt, is_heldout

    out = []
    for p in arithmetic_prompts(n, seed=11):
        h = hashlib.sha256(p.encode()).hexdigest()
        out.append(Prompt(h, p, "math", {}, is_heldout(h, 0.2)))
    return out


def test_a_round_whose_candidates_all_score_the_same_is_skipped_with_the_count(tmp_path, warm_model) -> None:
    settings = learner_settings(tmp_path / "d", warm_model, scorers=[{"type": "length", "min_chars": 0}])
    land_prompts(settings, arithmetic_prompts(30, seed=4))
    result = run_round(settings)
    assert result.status == "skipped"
    assert "no signal" in result.error
    trained = rows(settings, "SELECT prompts FROM tao_rounds")[0][0]
    assert result.metrics["prompts_uniform_skipped"] == trained
    assert result.metrics["prompts_resampled"] == trained, "each got k_max candidates before it was given up"
    assert rows(settings, "SELECT count(*) FROM tao_candidates")[0][0] == trained * 8
    assert rows(settings, "SELECT status FROM tao_rounds") == [("skipped",)]


def test_offline_mode_trains_on_best_versus_worst_pairs(tmp_path, warm_model) -> None:
    settings = learner_settings(tmp_path / "d", warm_model, mode="offline", gate_margin=-1.0, gate_task_margin=1.0)
    land_prompts(settings, arithmetic_prompts(60, seed=5))
    result = run_round(settings)
    assert result.status == "published", result
    assert result.metrics["train_steps"] == 4
    assert rows(settings, "SELECT mode FROM tao_rounds") == [("offline",)]


def test_only_one_round_runs_at_a_time(tmp_path, warm_model) -> None:
    settings = learner_settings(tmp_path / "d", warm_model)
    land_prompts(settings, arithmetic_prompts(20, seed=6))
    with round_lock(settings), pytest.raises(LearnerError, match="another TAO round is running"):
        run_round(settings)


CHECKPOINTS = ["select", "generate", "score", "train", "gate", "publish:staged", "publish:renamed"]


def test_a_kill_in_any_stage_publishes_nothing_marks_the_round_failed_and_the_next_round_runs(
    tmp_path, warm_model
) -> None:
    settings = learner_settings(tmp_path / "d", warm_model, gate_margin=-1.0, gate_task_margin=1.0)
    land_prompts(settings, arithmetic_prompts(40, seed=7))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAOFLOW_")}
    env.update(settings.environ(), PYTHONPATH=str(ROOT), TAOFLOW_LOG_LEVEL="WARNING")
    paused = learner_dir(settings) / "paused-at"
    killed = []
    for point in CHECKPOINTS:
        paused.unlink(missing_ok=True)
        proc = subprocess.Popen(
            [sys.executable, "-m", "taoflow.cli", "tao", "run"], env={**env, "TAOFLOW_LEARNER_PAUSE_AT": point},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while not paused.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, f"the round never reached {point}"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        states = [json.loads(p.read_text()) for p in (learner_dir(settings) / "rounds").glob("*.json")]
        running = [s for s in states if s["status"] == "running"]
        assert len(running) == 1 and running[0]["stage"] == point.split(":")[0]
        killed.append((running[0]["round_id"], point))
        # nothing is published half-way: only adapters of committed rounds exist, never a staging directory
        published = {s["adapter"] for s in states if s["status"] == "published"}
        on_disk = (
            {p.name for p in settings.core.adapters_dir.glob("*")} if settings.core.adapters_dir.exists() else set()
        )
        assert on_disk - published <= {f"tao-{running[0]['round_id']}", f".staging-tao-{running[0]['round_id']}"}

        if point != CHECKPOINTS[-1]:
            # what the next round does first (run_round, below, after the last and hardest kill: an adapter renamed
            # into place but not committed); a whole round after each kill would only repeat that round
            with round_lock(settings):
                assert recover(settings, RecordSink(settings)) == [killed[-1][0]]
        else:
            result = run_round(settings)  # settles the killed round first, then runs its own
            assert result.status == "published", result
        final = dict(rows(settings, "SELECT round_id, status FROM tao_rounds"))
        assert final[killed[-1][0]] == "failed"
        on_disk = (
            {p.name for p in settings.core.adapters_dir.iterdir()} if settings.core.adapters_dir.exists() else set()
        )
        recorded = {r[0] for r in rows(settings, "SELECT adapter FROM adapters")}
        assert on_disk == recorded, "every adapter on disk is recorded, and only those"
    assert final[result.round_id] == "published" and result.adapter in on_disk
    errors = dict(rows(settings, "SELECT round_id, error FROM tao_rounds WHERE status = 'failed'"))
    for rid, point in killed:
        assert f"interrupted during {point.split(':')[0]}" in errors[rid]
