"""The RL update of a TAO round: TRL with a PEFT LoRA adapter, online GRPO or offline DPO.

Training continues from the currently published adapter when there is one, else starts a fresh LoRA on
the base model. Extra TRL settings (`learner.trl`) go straight into TRL's own config classes.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from learners.exceptions import LearnerError
from learners.rewards.composite import CompositeScorer

log = logging.getLogger(__name__)


def reward_function(scorer: CompositeScorer) -> Callable[..., list[float]]:
    """The scorers as a TRL reward function; dataset columns `task_type` and `metadata` arrive as kwargs."""

    def taoflow_reward(
        prompts: list[Any], completions: list[Any], task_type: list[str], metadata: list[dict[str, Any]], **_: Any
    ) -> list[float]:
        texts = [c if isinstance(c, str) else str(c[-1].get("content", "")) for c in completions]
        parts = scorer.rule_parts(texts, prompts=list(prompts), task_types=list(task_type), metadata=list(metadata))
        return [r if (r := scorer.compose(p).reward) is not None else 0.0 for p in parts]

    return taoflow_reward


class _Progress:
    """A transformers callback reporting optimizer steps."""

    def __new__(cls, report: Callable[[int], None] | None) -> Any:
        from transformers import TrainerCallback

        class Cb(TrainerCallback):  # type: ignore[misc]
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if report:
                    report(1)

        return Cb()


def _lora(cfg: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        target_modules=cfg.lora_target_modules,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )


def _model(base_model: str, parent: Path | None, device: str, dtype: Any) -> tuple[Any, Any, Any]:
    """(model, tokenizer, peft_config): the parent adapter made trainable, or the base with a new LoRA."""
    from learners.generation import load_policy

    model, tokenizer = load_policy(base_model, parent, device=device, dtype=dtype, trainable=parent is not None)
    return model, tokenizer, parent


def _common(cfg: Any, device: str, out_dir: str, steps: int, seed: int) -> dict[str, Any]:
    return {
        "output_dir": out_dir,
        "max_steps": steps,
        "learning_rate": cfg.learning_rate,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "seed": seed,
        "use_cpu": device == "cpu",
        "bf16": device.startswith("cuda") and _bf16(),
        "disable_tqdm": True,
    }


def _bf16() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def _quiet(trainer: Any) -> Any:
    """Progress goes through our reporter: drop the callback that prints every log dict to stdout."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def _finish(trainer: Any, out: Path) -> dict[str, float]:
    trainer.model.save_pretrained(str(out))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    metrics: dict[str, float] = {"train_steps": float(trainer.state.global_step)}
    if logs:
        metrics["train_loss_last"] = float(logs[-1]["loss"])
        for key in ("reward", "rewards/taoflow_reward/mean"):
            vals = [float(h[key]) for h in logs if key in h]
            if vals:
                metrics["train_reward_first"], metrics["train_reward_last"] = vals[0], vals[-1]
                break
    return metrics


def train_grpo(
    cfg: Any,
    *,
    base_model: str,
    parent: Path | None,
    rows: list[dict[str, Any]],
    scorer: CompositeScorer,
    device: str,
    dtype: Any,
    out: Path,
    temperature: float,
    seed: int,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Online GRPO on the round's informative prompts; the scorers are the reward. Saves the adapter to `out`."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    if not rows:
        raise LearnerError("no prompts to train on")
    model, tokenizer, parent_dir = _model(base_model, parent, device, dtype)
    data = Dataset.from_list(
        [{"prompt": r["text"], "task_type": r["task_type"], "metadata": r["metadata"]} for r in rows]
    )
    with tempfile.TemporaryDirectory(prefix="taoflow-grpo-") as tmp:
        kwargs = {
            **_common(cfg, device, tmp, cfg.steps, seed),
            "num_generations": cfg.k,
            "per_device_train_batch_size": cfg.k * cfg.batch_prompts,
            "max_completion_length": cfg.max_new_tokens,
            "temperature": temperature,
            **cfg.trl,
        }
        try:
            args = GRPOConfig(**kwargs)
        except TypeError as exc:
            raise LearnerError(f"learner.trl: {exc}") from None
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward_function(scorer),
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=None if parent_dir else _lora(cfg),
            callbacks=[_Progress(progress)],
        )
        _quiet(trainer).train()
        return _finish(trainer, out)


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
    model, tokenizer, parent_dir = _model(base_model, parent, device, dtype)
    data = Dataset.from_list([{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs])
    with tempfile.TemporaryDirectory(prefix="taoflow-dpo-") as tmp:
        kwargs = {
            **_common(cfg, device, tmp, cfg.steps, seed),
            "per_device_train_batch_size": cfg.batch_prompts,
            "max_length": 1024,
            **cfg.trl,
        }
        try:
            args = DPOConfig(**kwargs)
        except TypeError as exc:
            raise LearnerError(f"learner.trl: {exc}") from None
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=None if parent_dir else _lora(cfg),
            callbacks=[_Progress(progress)],
        )
        _quiet(trainer).train()
        return _finish(trainer, out)
