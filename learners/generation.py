"""Candidate generation backends: transformers (CPU or GPU, batched) and vLLM (GPU, optional extra).

Both take plain-text prompts already formatted for the model and return `n` completions per prompt.
A `strategy` rewrites the request before formatting: `plain` leaves it, `cot` asks for step-by-step
reasoning, `structured` asks for a JSON answer.

Sampling is the same on both backends (`Sampling`): every setting is explicit, so a model's
generation_config (a repetition penalty, a top_k, a temperature) never applies, and the gate means the same
whichever backend sampled it. On vLLM a round builds one engine (`VllmEngine`) that serves the parent and the
new adapter as LoRA requests and sleeps while the adapter trains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from learners.exceptions import LearnerError
from learners.models import load_causal_lm

log = logging.getLogger(__name__)

STRATEGY_SUFFIX = {
    "plain": "",
    "cot": "\nThink step by step, then give the final answer on the last line.",
    "structured": '\nAnswer with JSON only, like {"answer": ...}.',
}
Progress = Callable[[int], None]


def render(prompt: Any, tokenizer: Any, strategy: str = "plain") -> str:
    """The text the model sees: chat messages through the tokenizer's chat template, strings as they are."""
    suffix = STRATEGY_SUFFIX[strategy]
    if isinstance(prompt, str):
        return prompt + suffix
    messages = [dict(m) for m in prompt]
    if suffix and messages:
        messages[-1]["content"] = str(messages[-1].get("content", "")) + suffix
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return "\n".join(f"{m['role']}: {m.get('content', '')}" for m in messages) + "\nassistant:"


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LearnerError(f"device {device!r} asked for, but no CUDA GPU is visible")
    index = cuda_index(device)
    if index is not None and index >= torch.cuda.device_count():
        raise LearnerError(f"device {device!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def cuda_index(device: str) -> int | None:
    """The GPU index of a CUDA device string ("cuda" is GPU 0, as torch places it), None for other devices.

    >>> cuda_index("cuda"), cuda_index("cuda:1"), cuda_index("cpu")
    (0, 1, None)
    """
    if device == "cuda":
        return 0
    if device.startswith("cuda:"):
        return int(device.split(":", 1)[1])
    return None


def physical_gpu(index: int) -> str:
    """What CUDA_VISIBLE_DEVICES must say for a process to see only this process's GPU `index` (through any
    CUDA_VISIBLE_DEVICES this process was started with: index 1 of "2,3" is "3")."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return str(index)
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if index >= len(ids):
        raise LearnerError(f"GPU {index} asked for, but CUDA_VISIBLE_DEVICES={visible!r} shows {len(ids)}")
    return ids[index]


def release_cuda() -> None:
    """Collect garbage and hand PyTorch's cached CUDA blocks back to the driver (a no-op without CUDA), so that
    the next vLLM engine or training process finds the memory free."""
    import torch

    gc.collect()
    torch.cuda.empty_cache()


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, dtype)


def load_policy(
    base_model: str, adapter: str | Path | None, *, device: str, dtype: Any, trainable: bool = False
) -> tuple[Any, Any]:
    """Base model plus (optionally) a LoRA adapter directory, and its tokenizer."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the learner reports its own progress
    model, tokenizer = load_causal_lm(base_model, dtype=dtype, device=device)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    if not trainable:
        model.eval()
    return model, tokenizer


@dataclass(frozen=True)
class Sampling:
    """One generate() call's sampling, the same on every backend.

    Everything that shapes the distribution is explicit: top_k off, no repetition penalty, no n-gram or
    minimum-length constraint, whatever the model's generation_config says (transformers would take those
    defaults for anything not passed; vLLM and TRL do not). Greedy is the argmax on every backend
    (transformers: do_sample False; vLLM: temperature 0) and gives one response per prompt.
    """

    n: int
    temperature: float
    max_new_tokens: int
    top_p: float = 1.0
    greedy: bool = False

    @property
    def per_prompt(self) -> int:
        return 1 if self.greedy else self.n

    def transformers_kwargs(self) -> dict[str, Any]:
        """`model.generate` keyword arguments. Passed as arguments they override the model's generation_config
        (None included: it switches a processor off), on transformers 4 and 5 alike."""
        sample = not self.greedy
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": sample,
            "num_beams": 1,
            "num_return_sequences": self.per_prompt,
            # warpers: used only when sampling
            "temperature": self.temperature if sample else None,
            "top_p": self.top_p if sample and self.top_p < 1 else None,
            "top_k": 0 if sample else None,
            "min_p": None,
            "typical_p": 1.0 if sample else None,
            "epsilon_cutoff": 0.0 if sample else None,
            "eta_cutoff": 0.0 if sample else None,
            # processors: they would apply to greedy decoding too
            "repetition_penalty": 1.0,
            "no_repeat_ngram_size": 0,
            "min_length": 0,
            "min_new_tokens": None,
            "bad_words_ids": None,
            "sequence_bias": None,
            "exponential_decay_length_penalty": None,
        }

    def vllm_params(self, params_cls: Any, seed: int) -> Any:
        """vLLM `SamplingParams` from the same settings (top_k off is whatever its default is: -1 or 0)."""
        off = params_cls()
        return params_cls(
            n=self.per_prompt,
            temperature=0.0 if self.greedy else self.temperature,
            top_p=1.0 if self.greedy else self.top_p,
            top_k=off.top_k,
            min_p=0.0,
            repetition_penalty=1.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            max_tokens=self.max_new_tokens,
            seed=seed,
        )


class TransformersGenerator:
    """Batched sampling with `model.generate` (left padding); counts generated tokens for throughput."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 64, seed: int = 0) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seed = seed
        self.tokens = 0
        self.seconds = 0.0

    def generate(
        self,
        prompts: list[str],
        *,
        n: int,
        temperature: float,
        max_new_tokens: int,
        greedy: bool = False,
        top_p: float = 1.0,
        progress: Progress | None = None,
    ) -> list[list[str]]:
        import torch

        tok = self.tokenizer
        sampling = Sampling(n=n, temperature=temperature, max_new_tokens=max_new_tokens, top_p=top_p, greedy=greedy)
        kwargs = sampling.transformers_kwargs()
        out: list[list[str]] = []
        # about batch_size sequences per generate() call, whatever n is
        step = max(1, self.batch_size // max(1, n))
        for start in range(0, len(prompts), step):
            chunk = prompts[start : start + step]
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
            torch.manual_seed(self.seed + start)
            t0 = time.perf_counter()
            with torch.no_grad():
                ids = self.model.generate(**enc, **kwargs, pad_token_id=tok.pad_token_id)
            self.seconds += time.perf_counter() - t0
            new = ids[:, enc["input_ids"].shape[1] :]
            self.tokens += int((new != tok.pad_token_id).sum())
            texts = tok.batch_decode(new, skip_special_tokens=True)
            per = sampling.per_prompt
            out.extend(texts[i * per : (i + 1) * per] for i in range(len(chunk)))
            if progress:
                progress(len(chunk))
        return out


# ---------------------------------------------------------------------------------------------------------------
# vLLM

# vLLM before 0.10.2 cannot build an `LLM` outside the main thread; `taoflow learner` runs rounds in a scheduler
# thread. The `gpu` extra asks for this version or newer; an older vLLM installed by other means is refused here.
VLLM_THREAD_SAFE = "0.10.2"


def _version_before(version: str, minimum: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version).release < Version(minimum).release
    except InvalidVersion:
        return False


def check_vllm() -> str:
    """The installed vLLM's version, or a LearnerError saying why this round cannot use it."""
    try:
        import vllm
    except ImportError:
        raise LearnerError(
            f"backend 'vllm' needs the GPU extra: pip install 'taoflow[gpu]' (vllm>={VLLM_THREAD_SAFE})"
        ) from None
    version = str(getattr(vllm, "__version__", "") or "")
    if not version:
        from importlib import metadata

        with contextlib.suppress(metadata.PackageNotFoundError):
            version = metadata.version("vllm")
    if threading.current_thread() is not threading.main_thread() and _version_before(version, VLLM_THREAD_SAFE):
        raise LearnerError(
            f"vLLM {version} cannot build an engine outside the main thread, and this round runs in one "
            f"(`taoflow learner` schedules rounds in a background thread): install vllm>={VLLM_THREAD_SAFE} "
            "(pip install -U 'taoflow[gpu]'), or run rounds in the foreground with `taoflow tao run`"
        )
    return version


def adapter_rank(adapter: str | Path | None) -> int:
    """The largest LoRA rank in an adapter directory (`r`, and any per-module `rank_pattern`); 0 for none."""
    if adapter is None:
        return 0
    path = Path(adapter) / "adapter_config.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LearnerError(f"cannot read the LoRA rank of {adapter}: {exc}") from None
    ranks = [int(doc.get("r") or 0), *(int(v) for v in (doc.get("rank_pattern") or {}).values())]
    return max(ranks)


def _sleep_supported(llm_cls: Any) -> bool:
    """Whether this vLLM can put an engine to sleep here (CUDA platforms; `enable_sleep_mode` engine argument)."""
    if not hasattr(llm_cls, "sleep"):
        return False
    try:
        from vllm.platforms import current_platform
    except ImportError:
        pass
    else:
        available = getattr(current_platform, "is_sleep_mode_available", None)
        if callable(available) and not available():
            return False
    try:
        from vllm.engine.arg_utils import EngineArgs
    except ImportError:
        return True
    return "enable_sleep_mode" in {f.name for f in dataclasses.fields(EngineArgs)}


@contextlib.contextmanager
def _engine_sees(device: str) -> Iterator[None]:
    """While an engine is built, CUDA_VISIBLE_DEVICES names only `device`'s GPU: vLLM starts its engine core in a
    child process (taking the environment at that moment) and always uses that process's first GPU. The learner's
    own CUDA view is fixed at its first CUDA call (in `resolve_device`), so this changes nothing else."""
    index = cuda_index(device)
    if index is None:
        yield
        return
    if index and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
        raise LearnerError(
            f"device {device!r} with VLLM_ENABLE_V1_MULTIPROCESSING=0: an in-process vLLM engine always takes the "
            "first visible GPU; unset it, or start the learner with CUDA_VISIBLE_DEVICES naming that GPU"
        )
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = physical_gpu(index)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


class VllmEngine:
    """A round's one vLLM engine: the base model with runtime LoRA, the parent and the new adapter served side by
    side as LoRA requests (`max_loras` 2). `release()` frees its GPU memory for training: sleep mode (level 1:
    weights to CPU memory, KV cache dropped) where vLLM has it, else the engine is deleted; `ready()` wakes it or
    builds it again. `builds` counts the engines built."""

    MAX_LORAS = 2  # the parent and the round's adapter

    def __init__(
        self,
        base_model: str,
        *,
        max_lora_rank: int,
        dtype: str,
        seed: int,
        gpu_memory_utilization: float,
        sleep_mode: bool = True,
        device: str = "cuda",
    ) -> None:
        self.base_model = base_model
        self.max_lora_rank = max_lora_rank
        self.dtype = dtype
        self.seed = seed
        self.gpu_memory_utilization = gpu_memory_utilization
        self.sleep_mode = sleep_mode
        self.device = device
        self.llm: Any = None
        self.asleep = False
        self.builds = 0
        self._lora_ids: dict[str, int] = {}

    def _build(self) -> None:
        check_vllm()
        from vllm import LLM

        sleep = self.sleep_mode and _sleep_supported(LLM)
        if self.sleep_mode and not sleep:
            log.info("this vLLM has no sleep mode: the engine is deleted while the adapter trains")
        self.sleep_mode = sleep
        kwargs: dict[str, Any] = {
            "model": self.base_model,
            "enable_lora": True,
            "max_loras": self.MAX_LORAS,
            "max_lora_rank": self.max_lora_rank,
            "dtype": self.dtype,
            "seed": self.seed,
            "gpu_memory_utilization": self.gpu_memory_utilization,
        }
        if sleep:
            kwargs["enable_sleep_mode"] = True
        release_cuda()  # what PyTorch still caches would count against the engine's start-up check
        with _engine_sees(self.device):
            self.llm = LLM(**kwargs)
        self.builds += 1
        self.asleep = False

    def ready(self) -> Any:
        """The engine, built, or woken up if it sleeps."""
        if self.llm is None:
            self._build()
        elif self.asleep:
            release_cuda()
            self.llm.wake_up()
            self.asleep = False
        return self.llm

    def release(self) -> None:
        """Free the engine's GPU memory for training: sleep, or delete it (`ready()` undoes either)."""
        if self.llm is None or self.asleep:
            return
        if self.sleep_mode:
            self.llm.sleep(level=1)
            self.asleep = True
            release_cuda()
        else:
            self.close()

    def close(self) -> None:
        """Shut the engine down and return its memory (the next `ready()` builds a new one)."""
        llm, self.llm, self.asleep = self.llm, None, False
        self._lora_ids.clear()
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        shutdown = getattr(core, "shutdown", None)
        if callable(shutdown):
            with contextlib.suppress(Exception):
                shutdown()
        del llm
        with contextlib.suppress(Exception):
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()
        release_cuda()

    def lora(self, adapter: str | Path | None) -> Any:
        """The LoRARequest of an adapter directory (None: the base), one id per directory for the engine's life."""
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        path = str(Path(adapter).resolve())
        lora_id = self._lora_ids.setdefault(path, len(self._lora_ids) + 1)
        return LoRARequest(f"{Path(path).name}-{lora_id}", lora_id, path)

    def generator(self, adapter: str | Path | None) -> VllmGenerator:
        return VllmGenerator(self, adapter)


class VllmGenerator:
    """`generate()` on a `VllmEngine` with one adapter (or the base): the calls of `TransformersGenerator`."""

    def __init__(self, engine: VllmEngine, adapter: str | Path | None) -> None:
        self.engine = engine
        self.adapter = adapter
        self.seed = engine.seed
        self.tokens = 0
        self.seconds = 0.0

    def generate(
        self,
        prompts: list[str],
        *,
        n: int,
        temperature: float,
        max_new_tokens: int,
        greedy: bool = False,
        top_p: float = 1.0,
        progress: Progress | None = None,
    ) -> list[list[str]]:
        from vllm import SamplingParams

        llm = self.engine.ready()
        sampling = Sampling(n=n, temperature=temperature, max_new_tokens=max_new_tokens, top_p=top_p, greedy=greedy)
        params = sampling.vllm_params(SamplingParams, self.seed)
        lora = self.engine.lora(self.adapter)
        t0 = time.perf_counter()
        results = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        self.seconds += time.perf_counter() - t0
        out = []
        for r in results:
            out.append([o.text for o in r.outputs])
            self.tokens += sum(len(o.token_ids) for o in r.outputs)
        if progress:
            progress(len(prompts))
        return out
