"""Models without a hub: the tiny model and reward model load through from_pretrained and work."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from learners.exceptions import LearnerError, ScorerConfigError
from learners.models import load_causal_lm, make_tiny_reward_model
from learners.rewards import build_scorer
from learners.rewards.specs import RewardModelSpec
from taoflow.cli import cli


def test_make_tiny_cli_writes_a_loadable_model_that_generates(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["models", "make-tiny", str(tmp_path / "tiny"), "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tiny" / "config.json").exists() and (tmp_path / "tiny" / "tokenizer.json").exists()
    model, tok = load_causal_lm(tmp_path / "tiny")
    assert model.config.model_type == "llama"
    enc = tok(["What is 2 + 3?", "hi"], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert out.shape == (2, enc["input_ids"].shape[1] + 5)
    assert tok.decode(tok("What is 12 + 30? 42")["input_ids"]) == "What is 12 + 30? 42"  # lossless round trip
    again = CliRunner().invoke(cli, ["models", "make-tiny", str(tmp_path / "tiny")])
    assert again.exit_code == 1 and "is not empty" in again.output


def test_loading_a_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LearnerError, match="cannot load model"):
        load_causal_lm(tmp_path / "nothing-here")


def test_reward_model_scorer_scores_pairs_in_unit_interval(tmp_path: Path) -> None:
    path = make_tiny_reward_model(tmp_path / "rm")
    scorer = build_scorer(RewardModelSpec(path=str(path), batch_size=2))
    values = scorer(["4", "five", "{}"], prompts=["2+2?", "2+3?", "json"])
    assert len(values) == 3 and all(v is not None and 0.0 <= v <= 1.0 for v in values)
    assert len({round(v, 6) for v in values if v is not None}) > 1  # the model actually looked at the text
    with pytest.raises(ScorerConfigError, match="cannot be loaded"):
        build_scorer(RewardModelSpec(path=str(tmp_path / "missing")))
