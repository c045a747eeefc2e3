"""The benchmark's task suite: splits disjoint by the underlying question, label-free verifiers, and a GRPO update
on fewer prompts than a step takes."""

from __future__ import annotations

from learners.tasks import (
    TASK_TYPES,
    arithmetic_reward,
    disjoint_questions,
    json_record_reward,
    question_id,
    reverse_reward,
    task_answer,
    task_prompt,
)


def test_splits_never_share_an_underlying_question_and_skip_the_excluded_ones() -> None:
    warm = disjoint_questions({"warm": 300}, seed=1)["warm"]
    splits = disjoint_questions({"train": 200, "eval": 200}, seed=2, exclude=warm)
    for task in TASK_TYPES:
        ids = {name: {question_id(task, q) for q in qs[task]} for name, qs in {**splits, "warm": warm}.items()}
        assert all(len(ids[name]) == len(qs[task]) for name, qs in {**splits, "warm": warm}.items())
        assert not ids["train"] & ids["eval"] and not ids["warm"] & (ids["train"] | ids["eval"])
    # 12 + 7 and 7 + 12 are one question: an eval sum is never a warm-up sum in the other order
    assert question_id("arith", (12, 7)) == question_id("arith", (7, 12))
    assert all(len(str(x)) in (2, 3) for q in splits["eval"]["arith"] for x in q)


def test_each_verifier_accepts_the_answer_and_rejects_near_misses_without_a_label() -> None:
    cases = {"arith": (123, 45), "json": ("fig", 37), "reverse": ("k", "m", "x", "q")}
    verifiers = {"arith": arithmetic_reward, "json": json_record_reward, "reverse": reverse_reward}
    wrong = {"arith": " 167", "json": ' {"item": "fig", "qty": "37"}', "reverse": " k m x q"}
    for task, q in cases.items():
        prompt = task_prompt(task, q, 4821)
        got = verifiers[task]([f" {task_answer(task, q)}", wrong[task]], prompts=[prompt, prompt])
        assert got == [1.0, 0.0], (task, got)
        assert verifiers[task](["x"], prompts=["hello"]) == [None]  # the scorer does not apply elsewhere
    extra = ' {"item": "fig", "qty": 37, "note": 1}'
    assert json_record_reward([extra], prompts=[task_prompt("json", ("fig", 37), 1)]) == [0.0]


def test_grpo_on_fewer_prompts_than_a_step_takes_still_makes_its_steps(tmp_path, warm_model) -> None:
    """One informative prompt and batch_prompts=4: TRL's sampler used to yield no batch and the round published an
    untrained adapter after 0 steps."""
    from learners.rewards.composite import CompositeScorer
    from learners.rewards.registry import build_scorer
    from learners.rewards.specs import ArithmeticSpec
    from learners.trainers.grpo import train_grpo
    from tests.learners.conftest import learner_settings

    cfg = learner_settings(tmp_path / "d", warm_model, k=2, steps=2, batch_prompts=4).learner
    rows = [{"prompt": "What is 3 + 4?", "source": "What is 3 + 4?", "task_type": "math", "metadata": {}}]
    scorer = CompositeScorer([build_scorer(ArithmeticSpec())])
    metrics = train_grpo(
        cfg, base_model=str(warm_model), parent=None, rows=rows, scorer=scorer, device="cpu", dtype=None,
        out=tmp_path / "out", temperature=1.0, seed=0,
    )  # fmt: skip
    assert metrics["train_steps"] == 2
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
