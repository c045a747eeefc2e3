"""Online GRPO: the scorers are the reward; GRPO samples its own completions (through TRL's vLLM integration with the
vLLM backend), its KL reference is the parent adapter (`common.pin_reference`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from learners.exceptions import LearnerError
from learners.rewards.composite import CompositeScorer
from learners.trainers.common import (
    Progress,
    common_args,
    finish,
    load_model,
    lora_config,
    pin_reference,
    quiet,
    reward_function,
    trl_config,
)

log = logging.getLogger(__name__)


def _vllm_installed() -> bool:
    if "vllm" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def grpo_sampling(cfg: Any) -> dict[str, Any]:
    """GRPOConfig fields for how GRPO samples its completions, only those this TRL has.

    Explicit sampling (top_k off in this TRL's terms, no repetition penalty, top_p 1, min_p 0), so a model's
    generation_config does not change what GRPO trains on. With the vLLM backend and vLLM installed, TRL samples
    through vLLM (`learner.grpo_vllm_mode`): `colocate` (default) builds TRL's own engine in the training process,
    on the training GPU, taking `vllm_gpu_memory_utilization` of it; `server` uses a `trl vllm-serve --model BASE`
    server at `vllm_server_host:vllm_server_port` (TRL's server, which takes weight updates; `vllm serve` does
    not), started on GPUs training does not use; `off` samples with transformers. Either way TRL merges the LoRA
    into the engine's weights after each step. `learner.trl` overrides any of these."""
    from trl import GRPOConfig

    fields = {f.name: f for f in dataclasses.fields(GRPOConfig)}
    out: dict[str, Any] = {"top_p": 1.0, "repetition_penalty": 1.0, "min_p": 0.0}
    if "top_k" in fields:
        out["top_k"] = fields["top_k"].default  # "off": 0 in current TRL, None in older ones
    mode = getattr(cfg, "grpo_vllm_mode", "off")
    if cfg.backend == "vllm" and mode != "off":
        if not _vllm_installed():
            log.warning("grpo_vllm_mode %s, but vLLM is not installed: GRPO samples with transformers", mode)
        else:
            out.update(use_vllm=True, vllm_mode=mode)
            if mode == "colocate":
                out["vllm_gpu_memory_utilization"] = cfg.vllm_gpu_memory_utilization
            else:
                out.update(vllm_server_host=cfg.vllm_server_host, vllm_server_port=cfg.vllm_server_port)
    missing = sorted(set(out) - set(fields))
    if missing:
        log.warning("this TRL's GRPOConfig has no %s: left to TRL's defaults", ", ".join(missing))
    return {k: v for k, v in out.items() if k in fields}


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
    model, tokenizer = load_model(base_model, start, device, dtype)
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
        **common_args(cfg, device, work_dir, cfg.steps, seed),
        "num_generations": cfg.k,
        # fewer rows than a step's prompts would leave TRL's sampler nothing to yield: it stops at step 0
        "per_device_train_batch_size": cfg.k * min(cfg.batch_prompts, len(rows)),
        "max_completion_length": cfg.max_new_tokens,
        "temperature": temperature,
        "beta": cfg.kl_beta,
        **grpo_sampling(cfg),
    }
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_function(scorer),
        args=trl_config(GRPOConfig, base, cfg.trl),
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=None if start else lora_config(cfg),
        callbacks=[Progress(progress)],
    )
    pin_reference(trainer.model, parent)
    return trainer


def train_grpo(cfg: Any, *, out: Path, **kwargs: Any) -> dict[str, float]:
    """Online GRPO (`build_grpo`'s arguments); the scorers are the reward. Saves the adapter to `out`."""
    with tempfile.TemporaryDirectory(prefix="taoflow-grpo-") as tmp:
        trainer = build_grpo(cfg, work_dir=tmp, **kwargs)
        quiet(trainer).train()
        if not trainer.state.global_step:
            raise LearnerError("GRPO made no optimizer step (its sampler yielded no batch): nothing to publish")
        return finish(trainer, out)
