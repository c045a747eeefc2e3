"""The update of a TAO round: TRL with a PEFT LoRA adapter: online GRPO, DPO on stored pairs, or RFT (SFT on the
verified best candidates), RFT then GRPO.

Training continues the parent adapter (the one the gateway serves) when there is one, else a fresh LoRA on the
base. KL: GRPO's `beta` is `learner.kl_beta` (0.04; the installed TRL defaults to 0, which lets rounds drift without
bound) and the reference is the parent: for a PEFT model TRL computes reference log-probs with a frozen "ref"
adapter copied from the trainable one (with no adapter loaded, with adapters disabled, i.e. the base).
`_pin_reference` makes that copy the parent's weights explicitly, which matters after RFT has already moved the
trainable adapter. Only the trained "default" adapter is saved: the "ref" copy is TRL's bookkeeping.

Extra TRL settings (`learner.trl`) go into whichever of TRL's config classes know them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from learners.exceptions import LearnerError
from learners.rewards.composite import CompositeScorer

log = logging.getLogger(__name__)


def reward_function(scorer: CompositeScorer) -> Callable[..., list[float | None]]:
    """The scorers as a TRL reward function.

    Dataset columns arrive as kwargs: `source` (the prompt as the scorers see it in the score stage, JSON),
    `task_type` and `metadata` (JSON text: rows whose metadata differ in type cannot share an Arrow column).
    A completion no scorer applies to gets None, which TRL leaves out of the group baseline (advantage 0),
    rather than 0.0, which would push it down.
    """

    def taoflow_reward(
        prompts: list[Any], completions: list[Any], task_type: list[str], metadata: list[str], **kw: Any
    ) -> list[float | None]:
        texts = [c if isinstance(c, str) else str(c[-1].get("content", "")) for c in completions]
        sources = [json.loads(s) for s in kw["source"]] if "source" in kw else list(prompts)
        meta = [json.loads(m) if isinstance(m, str) else m for m in metadata]
        parts = scorer.rule_parts(texts, prompts=sources, task_types=list(task_type), metadata=meta)
        return [scorer.compose(p).reward for p in parts]

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


def lora_config(cfg: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        target_modules=cfg.lora_target_modules,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )


def _model(base_model: str, start: Path | None, device: str, dtype: Any) -> tuple[Any, Any]:
    """(model, tokenizer): the `start` adapter made trainable, or the bare base (the trainer adds a new LoRA)."""
    from learners.generation import load_policy

    return load_policy(base_model, start, device=device, dtype=dtype, trainable=start is not None)


def _config(config_cls: Any, base: dict[str, Any], trl: dict[str, Any]) -> Any:
    """`config_cls(**base, **overrides)`, taking from `learner.trl` only the fields this class has."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    try:
        return config_cls(**{**base, **{k: v for k, v in trl.items() if k in names}})
    except (TypeError, ValueError) as exc:
        raise LearnerError(f"learner.trl for {config_cls.__name__}: {exc}") from None


def check_trl_overrides(trl: dict[str, Any], mode: str) -> None:
    """Every key of `learner.trl` must belong to a config class this mode uses (a typo is an error)."""
    from trl import DPOConfig, GRPOConfig, SFTConfig

    classes: dict[str, list[Any]] = {
        "grpo": [GRPOConfig],
        "offline": [DPOConfig],
        "rft": [SFTConfig],
        "rft+grpo": [SFTConfig, GRPOConfig],
    }
    names = {f.name for c in classes[mode] for f in dataclasses.fields(c)}
    unknown = sorted(set(trl) - names)
    if unknown:
        raise LearnerError(
            f"learner.trl has {unknown}, which no TRL config of mode {mode!r} "
            f"({', '.join(c.__name__ for c in classes[mode])}) accepts; check the spelling against TRL's docs"
        )


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


def save_adapter(model: Any, out: Path) -> None:
    """Only the trained adapter: a PEFT model that carries TRL's frozen "ref" copy would save it too."""
    names = list(getattr(model, "peft_config", {}) or {})
    if "default" in names:
        model.save_pretrained(str(out), selected_adapters=["default"])
    else:
        model.save_pretrained(str(out))


def _finish(trainer: Any, out: Path, prefix: str = "") -> dict[str, float]:
    save_adapter(trainer.model, out)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    metrics: dict[str, float] = {f"{prefix}train_steps": float(trainer.state.global_step)}
    if logs:
        metrics[f"{prefix}train_loss_last"] = float(logs[-1]["loss"])
        for key in ("reward", "rewards/taoflow_reward/mean"):
            vals = [float(h[key]) for h in logs if key in h]
            if vals:
                metrics[f"{prefix}train_reward_first"], metrics[f"{prefix}train_reward_last"] = vals[0], vals[-1]
                break
        kls = [float(h["kl"]) for h in logs if "kl" in h]
        if kls:
            metrics[f"{prefix}train_kl_last"] = kls[-1]
        lengths = [float(h["completions/mean_length"]) for h in logs if "completions/mean_length" in h]
        if lengths:  # GRPO samples its own completions: their tokens are part of the round's compute
            batch = float(trainer.args.per_device_train_batch_size)
            metrics[f"{prefix}train_generated_tokens"] = round(sum(lengths) * batch)
    return metrics


def pin_reference(model: Any, parent: Path | None) -> bool:
    """Make TRL's frozen "ref" adapter the parent (or, with no parent, a zero adapter: the base). Returns whether
    the model has one. TRL copies the trainable adapter at construction, which is the parent only if nothing has
    trained it yet in this round (RFT has, in mode rft+grpo)."""
    if "ref" not in (getattr(model, "peft_config", None) or {}):
        return False
    import torch

    if parent is None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".ref." in name and "lora_B" in name:
                    p.zero_()
        return True
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(str(parent / "adapter_model.safetensors")), adapter_name="ref")
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise LearnerError(f"the parent adapter {parent} does not fit the model's LoRA layers: {missing[:3]}")
    return True


def build_grpo(
    cfg: Any,
    *,
    base_model: str,
    parent: Path | None,
    rows: list[dict[str, Any]],
    scorer: CompositeScorer,
    device: str,
    dtype: Any,
    work_dir: str,
    temperature: float,
    seed: int,
    start: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> Any:
    """The GRPO trainer, its KL reference pinned to the parent (see the module docstring); `train_grpo` runs it.

    `rows`: {"prompt": text exactly as the model sees it (strategy applied, chat template rendered), "source",
    "task_type", "metadata"}. `start`: the adapter to continue (default: the parent).
    """
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    if not rows:
        raise LearnerError("no prompts to train on")
    start = start or parent
    model, tokenizer = _model(base_model, start, device, dtype)
    data = Dataset.from_list(
        [
            {
                "prompt": r["prompt"],
                "source": json.dumps(r["source"]),
                "task_type": r["task_type"],
                "metadata": json.dumps(r["metadata"], sort_keys=True, default=str),
            }
            for r in rows
        ]
    )
    base = {
        **_common(cfg, device, work_dir, cfg.steps, seed),
        "num_generations": cfg.k,
        # fewer rows than a step's prompts would leave TRL's sampler nothing to yield: it stops at step 0
        "per_device_train_batch_size": cfg.k * min(cfg.batch_prompts, len(rows)),
        "max_completion_length": cfg.max_new_tokens,
        "temperature": temperature,
        "beta": cfg.kl_beta,
    }
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_function(scorer),
        args=_config(GRPOConfig, base, cfg.trl),
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=None if start else lora_config(cfg),
        callbacks=[_Progress(progress)],
    )
    pin_reference(trainer.model, parent)
    return trainer


def train_grpo(cfg: Any, *, out: Path, **kwargs: Any) -> dict[str, float]:
    """Online GRPO (`build_grpo`'s arguments); the scorers are the reward. Saves the adapter to `out`."""
    with tempfile.TemporaryDirectory(prefix="taoflow-grpo-") as tmp:
        trainer = build_grpo(cfg, work_dir=tmp, **kwargs)
        _quiet(trainer).train()
        if not trainer.state.global_step:
            raise LearnerError("GRPO made no optimizer step (its sampler yielded no batch): nothing to publish")
        return _finish(trainer, out)


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
    model, tokenizer = _model(base_model, parent, device, dtype)
    data = Dataset.from_list([{"prompt": e["prompt"], "completion": e["completion"]} for e in examples])
    with tempfile.TemporaryDirectory(prefix="taoflow-rft-") as tmp:
        base = {
            **_common(cfg, device, tmp, cfg.rft_steps or cfg.steps, seed),
            "per_device_train_batch_size": cfg.batch_prompts,
            "max_length": 1024,
            "completion_only_loss": True,
        }
        args = _config(SFTConfig, base, cfg.trl)
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=None if parent else lora_config(cfg),
            callbacks=[_Progress(progress)],
        )
        _quiet(trainer).train()
        return _finish(trainer, out, "rft_")


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
    model, tokenizer = _model(base_model, parent, device, dtype)
    data = Dataset.from_list([{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs])
    with tempfile.TemporaryDirectory(prefix="taoflow-dpo-") as tmp:
        base = {
            **_common(cfg, device, tmp, cfg.steps, seed),
            "per_device_train_batch_size": cfg.batch_prompts,
            "max_length": 1024,
        }
        args = _config(DPOConfig, base, cfg.trl)
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=None if parent else lora_config(cfg),
            callbacks=[_Progress(progress)],
        )
        _quiet(trainer).train()
        return _finish(trainer, out)
