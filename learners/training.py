"""The update of a TAO round: TRL with a PEFT LoRA adapter: online GRPO, DPO on stored pairs, or RFT (SFT on the
verified best candidates), RFT then GRPO.

Training continues the parent adapter (the one the gateway serves) when there is one, else a fresh LoRA on the
base. KL: GRPO's `beta` is `learner.kl_beta` (0.04; the installed TRL defaults to 0, which lets rounds drift without
bound) and the reference is the parent: for a PEFT model TRL computes reference log-probs with a frozen "ref"
adapter copied from the trainable one (with no adapter loaded, with adapters disabled, i.e. the base).
`_pin_reference` makes that copy the parent's weights explicitly, which matters after RFT has already moved the
trainable adapter. Only the trained "default" adapter is saved: the "ref" copy is TRL's bookkeeping.

Extra TRL settings (`learner.trl`) go into whichever of TRL's config classes know them.

Where training runs (`placement`): on CUDA, by default, in a child process (`python -m learners.training JOB`)
whose CUDA_VISIBLE_DEVICES names only the selected GPU (`learner.device`, `cuda:1` included). That is what
selects a GPU for the Trainer: without a distributed launcher it takes `cuda:0` and wraps the model in
DataParallel over every visible GPU, which TRL's trainers refuse, and CUDA_VISIBLE_DEVICES cannot change in a
process that has already used CUDA. The child also returns all of training's GPU memory when it exits. Several
GPUs: `learner.accelerate_config` runs the child under `accelerate launch` (DDP, DeepSpeed ZeRO-2, FSDP; examples
in deploy/accelerate/). On CPU training runs in the learner's process (`learner.train_process` says otherwise).

GRPO samples its own completions; with the vLLM backend it does so through TRL's vLLM integration (`grpo_sampling`:
colocated by default, or a `trl vllm-serve` server), where TRL merges the LoRA into the engine's weights after
each step. Sampling is explicit there too (top_k off, no repetition penalty), as in `learners.generation.Sampling`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from learners.exceptions import LearnerError
from learners.generation import cuda_index, load_policy, physical_gpu
from learners.rewards.composite import CompositeScorer
from learners.rewards.registry import build_scorer
from learners.rewards.specs import ScorerSpec

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


def _bf16() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def _quiet(trainer: Any) -> Any:
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


def _finish(trainer: Any, out: Path, prefix: str = "") -> dict[str, float]:
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
        **grpo_sampling(cfg),
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


# ---------------------------------------------------------------------------------------------------------------
# where training runs: inline, or a child process that sees only the selected GPU (under `accelerate launch`)

PROGRESS = "taoflow-train-progress"
_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RUN_ID")  # fmt: skip


@dataclass(frozen=True)
class Placement:
    """Where a round trains: `child` (a process of its own) or inline; `device` is the trainer's device in that
    process; `cuda_visible` the child's CUDA_VISIBLE_DEVICES; `accelerate_config` its `accelerate launch` config."""

    child: bool
    device: str
    cuda_visible: str | None = None
    accelerate_config: Path | None = None


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        return 1


def placement(cfg: Any, device: str) -> Placement:
    """Where training runs for `learner.train_process` and the resolved `device` (see the module docstring)."""
    import torch

    cuda = device.startswith("cuda")
    gpus = torch.cuda.device_count() if cuda else 0
    mode = getattr(cfg, "train_process", "auto")
    launch = getattr(cfg, "accelerate_config", None)
    if launch is not None:
        return Placement(True, "cuda" if cuda else device, None, Path(launch))
    if mode == "inline" or (mode == "auto" and not cuda):
        if cuda and gpus > 1 and _world_size() <= 1:
            raise LearnerError(
                f"learner.train_process 'inline' with {gpus} GPUs visible: the Trainer would wrap the model in "
                "DataParallel, which TRL's trainers refuse. Use train_process auto (a training process that sees only "
                f"{device}), start the learner with CUDA_VISIBLE_DEVICES naming one GPU, or set accelerate_config"
            )
        return Placement(False, device)
    if not cuda:
        return Placement(True, device)
    index = cuda_index(device) or 0
    visible = physical_gpu(index)
    if gpus > 1:
        log.info(
            "%d GPUs visible and no `accelerate launch`: training runs on GPU %d only (CUDA_VISIBLE_DEVICES=%s in the "
            "training process), as TRL's trainers refuse DataParallel; for several GPUs set learner.accelerate_config "
            "(DDP, DeepSpeed ZeRO-2, FSDP: deploy/accelerate/)",
            gpus, index, visible,
        )  # fmt: skip
    return Placement(True, "cuda", visible)


def child_command(place: Placement, job: Path) -> list[str]:
    if place.accelerate_config is not None:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(place.accelerate_config),
                "-m", "learners.training", str(job)]  # fmt: skip
    return [sys.executable, "-m", "learners.training", str(job)]


def child_env(place: Placement) -> dict[str, str]:
    """The learner's environment, less any launcher variables (a single-process child is not a rank; accelerate
    sets its own), with the selected GPU alone visible, and this process's import path (scorer callables)."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
    if place.cuda_visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = place.cuda_visible
    env["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in sys.path)
    return env


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if value is not None and type(value).__module__ == "torch":  # a torch.dtype
        return str(value).removeprefix("torch.")
    return value


def run_child(cmd: list[str], env: dict[str, str], progress: Callable[[int], None] | None) -> tuple[int, list[str]]:
    """Run the training process to its end: its progress lines drive `progress`, the rest is logged at debug level.
    Returns its exit status and its last lines of output. It is killed (its whole process group) if this returns
    early; it exits by itself if the learner dies (`_watch_parent`)."""
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    tail: deque[str] = deque(maxlen=40)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(PROGRESS):
                if progress:
                    progress(int(line.split()[1]))
                continue
            tail.append(line.rstrip())
            log.debug("training process: %s", line.rstrip())
        return proc.wait(), list(tail)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def train_in_child(
    kind: str,
    cfg: Any,
    *,
    place: Placement,
    scorer_specs: list[dict[str, Any]],
    progress: Callable[[int], None] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """`train_<kind>(cfg, **kwargs)` in a child process placed as `place` says; its metrics."""
    with tempfile.TemporaryDirectory(prefix="taoflow-train-") as tmp:
        result_path = Path(tmp) / "result.json"
        job = {
            "kind": kind,
            "cfg": cfg.model_dump(mode="json") if hasattr(cfg, "model_dump") else dict(vars(cfg)),
            "scorers": scorer_specs,
            "device": place.device,
            "parent_pid": os.getpid(),
            "result": str(result_path),
            "kwargs": {k: _jsonable(v) for k, v in kwargs.items()},
        }
        job_path = Path(tmp) / "job.json"
        job_path.write_text(json.dumps(job, default=str))
        rc, tail = run_child(child_command(place, job_path), child_env(place), progress)
        try:
            result = json.loads(result_path.read_text())
        except (OSError, ValueError):
            result = {}
    if "error" in result:
        raise LearnerError(str(result["error"]))
    if rc != 0 or "metrics" not in result:
        last = "\n".join(tail[-15:])
        raise LearnerError(f"the training process exited with status {rc}; its last lines:\n{last}")
    return {k: float(v) for k, v in result["metrics"].items()}


def train(
    kind: str,
    cfg: Any,
    *,
    place: Placement,
    scorer: CompositeScorer | None = None,
    scorer_specs: list[dict[str, Any]] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """One of `train_grpo` / `train_rft` / `train_offline` (`kind`: grpo, rft, offline), where `place` says."""
    if kind not in _TRAINERS:
        raise LearnerError(f"unknown training kind {kind!r}")
    if place.child:
        return train_in_child(kind, cfg, place=place, scorer_specs=scorer_specs or [], **kwargs)
    if kind == "grpo":
        kwargs["scorer"] = scorer
    return _TRAINERS[kind](cfg, device=place.device, **kwargs)


def _watch_parent(pid: int) -> None:
    """Exit when the learner that started this process is gone (a SIGKILLed learner cannot stop its children)."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(3)
            except PermissionError:
                pass

    threading.Thread(target=watch, name="taoflow-parent-watch", daemon=True).start()


def run_job(job: dict[str, Any]) -> dict[str, float]:
    """The training a child process was given (see `train_in_child`); the metrics it returns."""
    import torch
    from pydantic import TypeAdapter

    device = job["device"]
    if device == "cuda" and _world_size() > 1:  # a rank of `accelerate launch`: its own GPU
        device = f"cuda:{int(os.environ.get('LOCAL_RANK') or 0)}"
    main_rank = int(os.environ.get("RANK") or 0) == 0

    def progress(n: int) -> None:
        if main_rank:
            print(f"{PROGRESS} {n}", flush=True)

    kw = dict(job["kwargs"])
    for key in ("parent", "start", "out"):
        if kw.get(key) is not None:
            kw[key] = Path(kw[key])
    if kw.get("dtype") is not None:
        kw["dtype"] = getattr(torch, kw["dtype"])
    if job["kind"] == "grpo":
        specs = TypeAdapter(list[ScorerSpec]).validate_python(job["scorers"])
        kw["scorer"] = CompositeScorer([build_scorer(s, device=device) for s in specs])
    cfg = SimpleNamespace(**job["cfg"])
    return _TRAINERS[job["kind"]](cfg, device=device, progress=progress, **kw)


def main(argv: list[str] | None = None) -> int:
    """`python -m learners.training JOB.json`: the child process of `train_in_child`."""
    args = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(args[0]).read_text())
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _watch_parent(int(job["parent_pid"]))
    main_rank = int(os.environ.get("RANK") or 0) == 0
    try:
        metrics = run_job(job)
    except LearnerError as exc:
        if main_rank:
            Path(job["result"]).write_text(json.dumps({"error": str(exc)}))
        return 1
    if main_rank:
        Path(job["result"]).write_text(json.dumps({"metrics": metrics}))
    return 0


_TRAINERS: dict[str, Callable[..., dict[str, float]]] = {
    "grpo": train_grpo,
    "rft": train_rft,
    "offline": train_offline,
}

if __name__ == "__main__":
    sys.exit(main())
