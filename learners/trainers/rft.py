"""Rejection-sampling fine-tuning (expert iteration): SFT, loss on the completion only, on each prompt's verified best
candidates. No labels: what passed the verifiers is the target. Labeled SFT in the bench uses the same trainer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from learners.exceptions import LearnerError
from learners.trainers.common import fit, load_model


def train_rft(
    cfg: Any,
    *,
    base_model: str,
    parent: Path | None,
    examples: list[dict[str, str]],
    device: str,
    dtype: Any,
    out: Path,
    seed: int,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Rejection-sampling fine-tuning: SFT (loss on the completion only) on each prompt's verified best candidates."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    if not examples:
        raise LearnerError("no candidate passed the reward threshold: nothing for rejection-sampling fine-tuning")
    model, tokenizer = load_model(base_model, parent, device, dtype)
    data = Dataset.from_list([{"prompt": e["prompt"], "completion": e["completion"]} for e in examples])
    return fit(SFTTrainer, SFTConfig, cfg, model=model, tokenizer=tokenizer, data=data, parent=parent, device=device,
               steps=cfg.rft_steps or cfg.steps, seed=seed, extra={"completion_only_loss": True}, out=out,
               progress=progress, prefix="rft_")  # fmt: skip
