"""Offline DPO on stored candidates: for each informative prompt its best response is chosen over its worst."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from learners.exceptions import LearnerError
from learners.trainers.common import Progress, common_args, finish, load_model, lora_config, quiet, trl_config


def train_offline(
    cfg: Any,
    *,
    base_model: str,
    parent: Path | None,
    pairs: list[dict[str, Any]],
    device: str,
    dtype: Any,
    out: Path,
    seed: int,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """DPO on stored candidates: for each informative prompt its best response is chosen over its worst."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    if not pairs:
        raise LearnerError("no preference pairs to train on")
    model, tokenizer = load_model(base_model, parent, device, dtype)
    data = Dataset.from_list([{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs])
    with tempfile.TemporaryDirectory(prefix="taoflow-dpo-") as tmp:
        base = {
            **common_args(cfg, device, tmp, cfg.steps, seed),
            "per_device_train_batch_size": cfg.batch_prompts,
            "max_length": 1024,
        }
        args = trl_config(DPOConfig, base, cfg.trl)
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=None if parent else lora_config(cfg),
            callbacks=[Progress(progress)],
        )
        quiet(trainer).train()
        return finish(trainer, out)
