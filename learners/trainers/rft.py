"""Rejection-sampling fine-tuning (expert iteration): SFT, loss on the completion only, on each prompt's verified best
candidates. No labels: what passed the verifiers is the target. Labeled SFT in the bench uses the same trainer."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from learners.exceptions import LearnerError
from learners.trainers.common import Progress, common_args, finish, load_model, lora_config, quiet, trl_config


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
    with tempfile.TemporaryDirectory(prefix="taoflow-rft-") as tmp:
        base = {
            **common_args(cfg, device, tmp, cfg.rft_steps or cfg.steps, seed),
            "per_device_train_batch_size": cfg.batch_prompts,
            "max_length": 1024,
            "completion_only_loss": True,
        }
        args = trl_config(SFTConfig, base, cfg.trl)
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=None if parent else lora_config(cfg),
            callbacks=[Progress(progress)],
        )
        quiet(trainer).train()
        return finish(trainer, out, "rft_")
