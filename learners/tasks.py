"""A built-in verifiable task (small arithmetic) and a short supervised warm-up, for proving that TAO learns.

The verifier reads the question from the prompt itself, so TAO needs no labels: `arithmetic_reward`
scores "What is 12 + 7?" answered with "19". The warm-up trains a freshly made tiny model on a few labeled
examples so it is weak but not random; `bench/tao.py` then compares TAO on unlabeled prompts with
supervised fine-tuning on the same prompts with their labels.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

QUESTION = re.compile(r"What is (\d+) ([+-]) (\d+)\?")
NUMBER = re.compile(r"-?\d+")


def arithmetic_prompts(n: int, *, seed: int = 0, low: int = 0, high: int = 9) -> list[str]:
    """`n` distinct requests "Order 4821: what is a + b?" with operands in [low, high].

    The order number stands for the context real prompts carry: two requests rarely repeat verbatim, while
    the skill they need (these sums) recurs, as in production traffic.
    """
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        p = f"Order {rng.randint(1000, 9999)}: What is {rng.randint(low, high)} + {rng.randint(low, high)}?"
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def solve(prompt: str) -> int | None:
    """The true answer to a question from `arithmetic_prompts`, or None when the prompt is not one."""
    m = QUESTION.search(prompt)
    if not m:
        return None
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return a + b if op == "+" else a - b


def arithmetic_reward(completions: list[str], *, prompts: list[Any], **kwargs: Any) -> list[float | None]:
    """1.0 when the completion's first number is the answer to the question in its prompt, else 0.0;
    None for prompts that hold no question (the scorer does not apply).

    >>> arithmetic_reward([" 19", "it is 20", "7"], prompts=["What is 12 + 7?"] * 2 + ["hello"])
    [1.0, 0.0, None]
    """
    out: list[float | None] = []
    for completion, prompt in zip(completions, prompts, strict=True):
        text = prompt if isinstance(prompt, str) else " ".join(str(m.get("content", "")) for m in prompt)
        answer = solve(text)
        if answer is None:
            out.append(None)
            continue
        m = NUMBER.search(completion)
        out.append(1.0 if m is not None and int(m.group()) == answer else 0.0)
    return out


def sft_texts(prompts: list[str], eos: str) -> list[str]:
    """Labeled training texts "prompt answer<eos>" for the warm-up and the labeled-SFT comparison."""
    return [f"{p} {solve(p)}{eos}" for p in prompts]


def supervised_train(
    model: Any, tokenizer: Any, texts: list[str], *, steps: int, lr: float, batch_size: int = 32, seed: int = 0
) -> list[float]:
    """Plain next-token training on `texts` (loss on every token); returns the loss per step."""
    import torch

    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    pad = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        for _ in range(steps):
            batch = [rng.choice(texts) for _ in range(batch_size)]
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            loss = model(**enc, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        tokenizer.padding_side = pad
    model.eval()
    return losses


def make_warm_model(
    directory: str | Path, *, steps: int = 150, examples: int = 60, seed: int = 0, lr: float = 3e-3, **tiny: Any
) -> Path:
    """A tiny model given a short supervised warm-up on `examples` labeled questions: weak, not random."""
    from learners.models import load_causal_lm, make_tiny

    out = Path(directory)
    make_tiny(out, seed=seed, **tiny)
    model, tokenizer = load_causal_lm(out)
    texts = sft_texts(arithmetic_prompts(examples, seed=seed + 1000), tokenizer.eos_token)
    losses = supervised_train(model, tokenizer, texts, steps=steps, lr=lr, seed=seed)
    log.info("warm-up: %d steps, loss %.3f -> %.3f", steps, losses[0], losses[-1])
    model.save_pretrained(out)
    return out
