"""Offline DPO on stored candidates: for each informative prompt its best response is chosen over its worst."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from learners.exceptions import LearnerError
from learners.trainers.common import fit, load_model


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
    return fit(DPOTrainer, DPOConfig, cfg, model=model, tokenizer=tokenizer, data=data, parent=parent, device=device,
               steps=cfg.steps, seed=seed, extra={}, out=out, progress=progress)  # fmt: skip
