"""What every trainer shares: the scorers as a TRL reward, the LoRA, the policy to train, TRL config assembly with
`learner.trl` overrides, the arguments common to all, saving only the trained adapter, the metrics of a run, and the
KL reference pinned to the parent."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from learners.exceptions import LearnerError
from learners.generation import load_policy
from learners.rewards.composite import CompositeScorer


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


class Progress:
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


def load_model(base_model: str, start: Path | None, device: str, dtype: Any) -> tuple[Any, Any]:
    """(model, tokenizer): the `start` adapter made trainable, or the bare base (the trainer adds a new LoRA)."""
    return load_policy(base_model, start, device=device, dtype=dtype, trainable=start is not None)


def trl_config(config_cls: Any, base: dict[str, Any], trl: dict[str, Any]) -> Any:
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


def common_args(cfg: Any, device: str, out_dir: str, steps: int, seed: int) -> dict[str, Any]:
    return {
        "output_dir": out_dir,
        "max_steps": steps,
        "learning_rate": cfg.learning_rate,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "seed": seed,
        "use_cpu": device == "cpu",
        "bf16": device.startswith("cuda") and bf16(),
        "disable_tqdm": True,
    }


def bf16() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def quiet(trainer: Any) -> Any:
    """Progress goes through our reporter: drop the callback that prints every log dict to stdout."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def save_adapter(model: Any, out: Path, state_dict: dict[str, Any] | None = None) -> None:
    """Only the trained adapter: a PEFT model that carries TRL's frozen "ref" copy would save it too."""
    names = list(getattr(model, "peft_config", {}) or {})
    extra = {} if state_dict is None else {"state_dict": state_dict}
    if "default" in names:
        model.save_pretrained(str(out), selected_adapters=["default"], **extra)
    else:
        model.save_pretrained(str(out), **extra)


def _save_trained(trainer: Any, out: Path) -> None:
    """The adapter, written once: under `accelerate launch` by the main process, FSDP's shards gathered first."""
    acc = getattr(trainer, "accelerator", None)
    if acc is None or acc.num_processes <= 1:
        save_adapter(trainer.model, out)
        return
    state = acc.get_state_dict(trainer.model_wrapped) if getattr(trainer, "is_fsdp_enabled", False) else None
    if acc.is_main_process:
        save_adapter(acc.unwrap_model(trainer.model), out, state)
    acc.wait_for_everyone()


def finish(trainer: Any, out: Path, prefix: str = "") -> dict[str, float]:
    _save_trained(trainer, out)
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


def fit(trainer_cls: Any, config_cls: Any, cfg: Any, *, model: Any, tokenizer: Any, data: Any, parent: Path | None,
        device: str, steps: int, seed: int, extra: dict[str, Any], out: Path, progress: Callable[[int], None] | None,
        prefix: str = "") -> dict[str, float]:  # fmt: skip
    """Train an offline TRL trainer (SFT, DPO) on `data` for `steps`, a new LoRA unless continuing `parent`; save
    the adapter to `out` and return the run's metrics (`finish`)."""
    with tempfile.TemporaryDirectory(prefix="taoflow-train-") as tmp:
        base = {**common_args(cfg, device, tmp, steps, seed), "per_device_train_batch_size": cfg.batch_prompts,
                "max_length": 1024, **extra}  # fmt: skip
        trainer = trainer_cls(
            model=model,
            args=trl_config(config_cls, base, cfg.trl),
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=None if parent else lora_config(cfg),
            callbacks=[Progress(progress)],
        )
        quiet(trainer).train()
        return finish(trainer, out, prefix)
