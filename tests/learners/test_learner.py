"""The learner made worthy of a benchmark: RFT, the KL reference, lineage that follows serving, the review's bugs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from learners.exceptions import LearnerError
from learners.records import RecordSink
from learners.tao import Round, run_round
from learners.tasks import arithmetic_prompts
from tests.learners.conftest import announce, land_prompts, land_rows, learner_settings, make_adapter

ALWAYS = {"gate_margin": -1.0, "gate_task_margin": 1.0}  # the gate passes: these tests are about training


def test_a_round_over_mixed_chat_and_text_prompts_with_metadata_of_varying_types_trains(tmp_path, warm_model) -> None:
    settings = learner_settings(tmp_path / "d", warm_model, **ALWAYS)
    items: list[tuple[object, str, dict]] = []
    for i, p in enumerate(arithmetic_prompts(40, seed=21)):
        prompt = [{"role": "user", "content": p}] if i % 2 else p
        items.append((prompt, "math", {"source": i} if i % 3 else {"source": f"crm-{i}", "tags": ["a"]}))
    land_rows(settings, items)
    result = run_round(settings)
    assert result.status == "published", result  # it crashed in Dataset.from_list before
    assert result.metrics["train_steps"] == 4 and result.metrics["grpo_rows"] > 0


def test_rft_round_trains_on_verified_best_candidates_and_the_manifest_says_how(tmp_path, warm_model) -> None:
    settings = learner_settings(tmp_path / "d", warm_model, mode="rft", **ALWAYS)
    land_prompts(settings, arithmetic_prompts(40, seed=22))
    result = run_round(settings)
    assert result.status == "published", result
    m = result.metrics
    assert m["rft_examples"] > 0 and m["rft_train_steps"] == 4
    manifest = json.loads((settings.core.adapters_dir / result.adapter / "manifest.json").read_text())
    assert manifest["mode"] == "rft" and [s["type"] for s in manifest["scorers"]] == ["arithmetic"]
    assert manifest["training"]["kl_beta"] == 0.04 and manifest["training"]["reward_threshold"] == 0.5
    assert set(manifest["libraries"]) >= {"torch", "transformers", "trl", "peft"}
    assert len(manifest["base_model_sha256"]) == 64
    assert manifest["prompts"]["trained"] and manifest["prompts"]["heldout"]
    assert not set(manifest["prompts"]["trained"]) & set(manifest["prompts"]["heldout"])
    assert manifest["gate"]["temperature"] == 1.0
    assert manifest["gate"]["alpha"] == pytest.approx(0.1 * 6 / 3.14159**2, 1e-3)


def test_adaptive_k_samples_failed_prompts_again_and_counts_them(tmp_path, warm_model) -> None:
    settings = learner_settings(tmp_path / "d", warm_model, mode="rft", k_max=12, **ALWAYS)
    # easy sums the warm model often gets right, and hard ones it rarely does
    land_prompts(settings, arithmetic_prompts(20, seed=23) + arithmetic_prompts(20, seed=23, low=10, high=99))
    with RecordSink(settings, prefer_kafka=False) as sink:
        rnd = Round(settings, sink)
        train, _ = rnd.split(rnd.select())
        cands = rnd.generate(train)
    m = rnd.metrics
    assert m["prompts_resampled"] > 0 and m["candidates_extra"] > 0
    sizes = sorted({len(c) for c in cands.values()})
    assert sizes[0] == 4 and sizes[-1] == 12, sizes
    failed_at_max = sum(1 for c in cands.values() if len(c) == 12 and max(x["reward"] for x in c) < 0.5)
    assert m["prompts_failed_at_k_max"] == failed_at_max


def _logits(model, tok, text: str):
    import torch

    enc = tok([text], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**enc).logits


def test_the_kl_reference_is_the_served_parent_even_after_rft_moved_the_adapter(tmp_path, warm_model) -> None:
    import torch
    from trl.trainer.utils import use_adapter  # what GRPOTrainer calls for the reference

    from learners.generation import load_policy
    from learners.rewards.composite import CompositeScorer
    from learners.rewards.registry import build_scorer
    from learners.rewards.specs import ArithmeticSpec
    from learners.trainers.grpo import build_grpo

    settings = learner_settings(tmp_path / "d", warm_model)
    parent = make_adapter(settings, "parent", noise=0.05, seed=1)
    moved = make_adapter(settings, "moved", noise=0.05, seed=2)  # what RFT left as the starting point
    text = "What is 3 + 4?"
    rows = [{"prompt": text, "source": text, "task_type": "math", "metadata": {}}]
    trainer = build_grpo(
        settings.learner, base_model=str(warm_model), parent=parent, start=moved, rows=rows,
        scorer=CompositeScorer([build_scorer(ArithmeticSpec(type="arithmetic"))]), device="cpu", dtype=None,
        work_dir=str(tmp_path / "w"), temperature=1.0, seed=0,
    )  # fmt: skip
    model = trainer.model
    assert trainer.beta == 0.04, "the installed TRL defaults beta to 0: we set it"
    assert "ref" in model.peft_config, "TRL keeps a frozen copy of the adapter as the reference (what we rely on)"
    tok = trainer.processing_class
    with use_adapter(model, adapter_name="ref"):
        ref = _logits(model, tok, text)
    want = _logits(load_policy(str(warm_model), parent, device="cpu", dtype=None)[0], tok, text)
    start = _logits(load_policy(str(warm_model), moved, device="cpu", dtype=None)[0], tok, text)
    base = _logits(load_policy(str(warm_model), None, device="cpu", dtype=None)[0], tok, text)
    assert torch.allclose(ref, want, atol=1e-5)
    assert not torch.allclose(ref, start, atol=1e-3) and not torch.allclose(ref, base, atol=1e-3)
    # with no parent (a fresh lineage) the reference is the base
    fresh = build_grpo(
        settings.learner, base_model=str(warm_model), parent=None, start=moved, rows=rows,
        scorer=CompositeScorer([build_scorer(ArithmeticSpec(type="arithmetic"))]), device="cpu", dtype=None,
        work_dir=str(tmp_path / "w2"), temperature=1.0, seed=0,
    )  # fmt: skip
    with use_adapter(fresh.model, adapter_name="ref"):
        assert torch.allclose(_logits(fresh.model, tok, text), base, atol=1e-5)


def test_a_scorer_answering_none_leaves_the_completion_out_instead_of_rewarding_zero() -> None:
    from learners.rewards.composite import CompositeScorer
    from learners.rewards.registry import build_scorer
    from learners.rewards.specs import ArithmeticSpec
    from learners.trainers.common import reward_function

    fn = reward_function(CompositeScorer([build_scorer(ArithmeticSpec(type="arithmetic"))]))
    prompts = ["What is 1 + 2?", "hello there"]
    out = fn(prompts=prompts, completions=["3", "3"], task_type=["math"] * 2, metadata=['{"a": 1}', "{}"],
             source=[json.dumps(p) for p in prompts])  # fmt: skip
    assert out == [1.0, None]  # TRL gives a None reward no advantage; 0.0 would have pushed the completion down


def test_a_second_dpo_round_publishes_only_what_the_manifest_hashes(tmp_path, warm_model) -> None:
    settings = learner_settings(tmp_path / "d", warm_model, mode="offline", **ALWAYS)
    land_prompts(settings, arithmetic_prompts(40, seed=24))
    first = run_round(settings)
    assert first.status == "published", first
    announce(settings, first.adapter, "promoted")
    second = run_round(settings)
    assert second.status == "published", second
    root = settings.core.adapters_dir / second.adapter
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["parent_adapter"] == first.adapter
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {"manifest.json"}
    assert on_disk == set(manifest["files"]), "every published file is hashed"
    assert not (root / "ref").exists(), "TRL's frozen reference copy is not part of the adapter"


def test_changing_lora_r_against_a_served_parent_is_an_error_that_says_what_to_do(tmp_path, warm_model) -> None:
    settings = learner_settings(tmp_path / "d", warm_model, lora_r=16)
    land_prompts(settings, arithmetic_prompts(20, seed=25))
    make_adapter(settings, "p8", r=8)
    announce(settings, "p8", "published", "promoted")
    with pytest.raises(LearnerError, match=r"lora_r=8 \(learner.lora_r is 16\).*Set those settings back"):
        run_round(settings)


def test_lineage_follows_serving_and_never_continues_a_rolled_back_adapter(tmp_path, warm_model) -> None:
    settings = learner_settings(tmp_path / "d", warm_model)
    land_prompts(settings, arithmetic_prompts(20, seed=26))
    for name in ("a", "b", "c"):
        make_adapter(settings, name)
    announce(settings, "a", "published", "promoted")
    announce(settings, "b", "published", "promoted", "rolled_back")  # the gateway found b worse and went back to a
    announce(settings, "c", "published")  # a canary, not (yet) served
    with RecordSink(settings, prefer_kafka=False) as sink:
        assert Round(settings, sink).parent_name == "a"
        announce(settings, "a", "rolled_back")
        assert Round(settings, sink).parent_name is None, "a rolled-back incumbent falls back to the base"


def test_task_quotas_bound_each_task_type_in_selection(tmp_path, warm_model) -> None:
    settings = learner_settings(tmp_path / "d", warm_model, task_quotas={"math": 10, "default": 4})
    land_prompts(settings, arithmetic_prompts(30, seed=27))
    land_prompts(settings, [f"Say hello number {i}" for i in range(30)], task_type="chat")
    with RecordSink(settings, prefer_kafka=False) as sink:
        rnd = Round(settings, sink)
        prompts = rnd.select()
    assert sorted(p.task_type for p in prompts) == ["chat"] * 4 + ["math"] * 10
    assert rnd.metrics["task.math.selected"] == 10 and rnd.metrics["task.chat.selected"] == 4


class _NoOpRound(Round):
    """A round whose update is a zero LoRA (B = 0): the new adapter answers exactly as its parent."""

    def train(self, sets, out: Path) -> None:
        from peft import get_peft_model

        from learners.generation import load_policy
        from learners.trainers.common import lora_config, save_adapter

        model, _ = load_policy(self.base_model, None, device="cpu", dtype=None, trainable=True)
        save_adapter(get_peft_model(model, lora_config(self.cfg)), out)


def test_no_op_rounds_end_to_end_are_refused_and_spend_alpha(tmp_path, warm_model) -> None:
    settings = learner_settings(tmp_path / "d", warm_model, gate_samples=2)
    land_prompts(settings, arithmetic_prompts(60, seed=28))
    results = []
    for _ in range(2):
        with RecordSink(settings, prefer_kafka=False) as sink:
            results.append(_NoOpRound(settings, sink).run())
    assert [r.status for r in results] == ["gated_out", "gated_out"], results
    first, second = (r.metrics for r in results)
    assert first["gain"] == 0.0, "the same seed for both policies: a no-op adapter samples exactly as its parent"
    assert (first["gate_round_index"], second["gate_round_index"]) == (1, 2)
    assert second["gate_alpha"] == pytest.approx(first["gate_alpha"] / 4)


def test_the_reward_model_reads_a_chat_through_its_chat_template(tmp_path) -> None:
    import torch

    from learners.models import make_tiny_reward_model
    from learners.rewards.reward_model import RewardModel

    rm = RewardModel(str(make_tiny_reward_model(tmp_path / "rm")))
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2 + 2?"}]
    assert rm.texts([chat], ["4"]) == [("system: be brief\nuser: what is 2 + 2?\nassistant: 4\n", None)]
    enc = rm.tokenizer(["system: be brief\nuser: what is 2 + 2?\nassistant: 4\n"], return_tensors="pt")
    with torch.no_grad():
        want = torch.sigmoid(rm.model(**enc).logits[:, 0]).item()
    assert rm(["4"], prompts=[chat]) == [pytest.approx(want)]
