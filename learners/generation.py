"""Candidate generation backends: transformers (CPU or GPU, batched) and vLLM (GPU, optional extra).

Both take plain-text prompts already formatted for the model and return `n` completions per prompt.
A `strategy` rewrites the request before formatting: `plain` leaves it, `cot` asks for step-by-step
reasoning, `structured` asks for a JSON answer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from learners.exceptions import LearnerError

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
    return device


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

    from learners.models import load_causal_lm

    hf_logging.disable_progress_bar()  # the learner reports its own progress
    model, tokenizer = load_causal_lm(base_model, dtype=dtype, device=device)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    if not trainable:
        model.eval()
    return model, tokenizer


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
        out: list[list[str]] = []
        # about batch_size sequences per generate() call, whatever n is
        step = max(1, self.batch_size // max(1, n))
        for start in range(0, len(prompts), step):
            chunk = prompts[start : start + step]
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
            torch.manual_seed(self.seed + start)
            t0 = time.perf_counter()
            with torch.no_grad():
                ids = self.model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=not greedy,
                    temperature=None if greedy else temperature,
                    top_p=None if greedy or top_p >= 1 else top_p,
                    top_k=None,
                    num_return_sequences=1 if greedy else n,
                    pad_token_id=tok.pad_token_id,
                )
            self.seconds += time.perf_counter() - t0
            new = ids[:, enc["input_ids"].shape[1] :]
            self.tokens += int((new != tok.pad_token_id).sum())
            texts = tok.batch_decode(new, skip_special_tokens=True)
            per = 1 if greedy else n
            out.extend(texts[i * per : (i + 1) * per] for i in range(len(chunk)))
            if progress:
                progress(len(chunk))
        return out


class VllmGenerator:
    """vLLM with runtime LoRA: the same calls, for GPUs (`pip install taoflow[gpu]`)."""

    def __init__(self, base_model: str, *, adapter: str | Path | None, max_lora_rank: int, dtype: str, seed: int = 0):
        try:
            from vllm import LLM
        except ImportError:
            raise LearnerError("backend 'vllm' needs the GPU extra: pip install 'taoflow[gpu]'") from None
        self.llm = LLM(model=base_model, enable_lora=True, max_lora_rank=max_lora_rank, dtype=dtype, seed=seed)
        self.tokenizer = self.llm.get_tokenizer()
        self.adapter = adapter
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
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        params = SamplingParams(
            n=1 if greedy else n,
            temperature=0.0 if greedy else temperature,
            top_p=1.0 if greedy else top_p,
            max_tokens=max_new_tokens,
            seed=self.seed,
        )
        lora = None
        if self.adapter is not None:
            lora = LoRARequest(Path(self.adapter).name, abs(hash(str(self.adapter))) % 2**31 + 1, str(self.adapter))
        t0 = time.perf_counter()
        results = self.llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        self.seconds += time.perf_counter() - t0
        out = []
        for r in results:
            out.append([o.text for o in r.outputs])
            self.tokens += sum(len(o.token_ids) for o in r.outputs)
        if progress:
            progress(len(prompts))
        return out
