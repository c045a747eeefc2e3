"""A built-in verifiable task (small arithmetic) and a short supervised warm-up, for proving that TAO learns.

The verifier reads the question from the prompt itself, so TAO needs no labels: `arithmetic_reward`
scores "What is 12 + 7?" answered with "19". The warm-up trains a freshly made tiny model on a few labeled
examples so it is weak but not random; `bench/tao.py` then compares TAO on unlabeled prompts with
supervised fine-tuning on the same prompts with their labels.
"""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path
from typing import Any

from learners.models import load_causal_lm, make_tiny

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
    model: Any,
    tokenizer: Any,
    texts: list[str],
    *,
    steps: int,
    lr: float,
    batch_size: int = 32,
    seed: int = 0,
    prompts: list[str] | None = None,
) -> list[float]:
    """Plain next-token training on `texts` (loss on every token, or, with `prompts` (each text's prefix), on what
    follows the prompt only); returns the loss per step."""
    import torch

    rng = random.Random(seed)
    prefix = {
        t: len(tokenizer(p, add_special_tokens=False)["input_ids"]) for t, p in zip(texts, prompts or [], strict=False)
    }
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
            for i, text in enumerate(batch):
                labels[i, : prefix.get(text, 0)] = -100
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
    out = Path(directory)
    make_tiny(out, seed=seed, **tiny)
    model, tokenizer = load_causal_lm(out)
    texts = sft_texts(arithmetic_prompts(examples, seed=seed + 1000), tokenizer.eos_token)
    losses = supervised_train(model, tokenizer, texts, steps=steps, lr=lr, seed=seed)
    log.info("warm-up: %d steps, loss %.3f -> %.3f", steps, losses[0], losses[-1])
    model.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# the benchmark's task suite: three task types whose verifiers need no label, and splits by the underlying question

TASK_TYPES = ("arith", "json", "reverse")
ITEMS = re.findall(
    r"\w+",
    """apple pear kiwi plum fig lime lemon mango melon grape peach cherry berry onion bean
corn rice
salt sugar bread milk cheese butter honey tea coffee soap paper pen lamp chair table glass""",
)
LETTERS = "abcdefghijklmnopqrstuvwxyz"
ARITH_HIGH = 199  # operands 10..199: 2 and 3 digits, ~19k distinct unordered pairs
JSON_QUESTION = re.compile(r"Record item (\w+) qty (\d+) as JSON\.")
REVERSE_QUESTION = re.compile(r"Reverse the letters ((?:[a-z] )*[a-z])\.")


def draw_question(task: str, rng: random.Random) -> tuple[Any, ...]:
    """One underlying question of a task type: two operands of 2 to 3 digits (up to ARITH_HIGH), (item, qty 10..99),
    or 3-4 letters."""
    if task == "arith":
        return (rng.randint(10, ARITH_HIGH), rng.randint(10, ARITH_HIGH))
    if task == "json":
        return (rng.choice(ITEMS), rng.randint(10, 99))
    return tuple(rng.choice(LETTERS) for _ in range(rng.randint(3, 4)))


def question_id(task: str, q: tuple[Any, ...]) -> tuple[Any, ...]:
    """What makes two questions the same: the unordered operand pair for sums (12 + 7 is 7 + 12), else the question."""
    return (task, *sorted(q)) if task == "arith" else (task, *q)


def task_prompt(task: str, q: tuple[Any, ...], order: int) -> str:
    """The request an agent would send; the order number is context that differs between requests."""
    if task == "arith":
        return f"Order {order}: What is {q[0]} + {q[1]}?"
    if task == "json":
        return f"Order {order}: Record item {q[0]} qty {q[1]} as JSON."
    return f"Order {order}: Reverse the letters {' '.join(q)}."


def task_answer(task: str, q: tuple[Any, ...]) -> str:
    """The labeled answer (for the warm-up and labeled SFT only: the verifiers never see it)."""
    if task == "arith":
        return str(q[0] + q[1])
    if task == "json":
        return json.dumps({"item": q[0], "qty": q[1]})
    return " ".join(reversed(q))


def disjoint_questions(
    counts: dict[str, int],
    per_task: list[str] | tuple[str, ...] = TASK_TYPES,
    *,
    seed: int,
    exclude: dict[str, list[tuple[Any, ...]]] | None = None,
) -> dict[str, dict[str, list[tuple[Any, ...]]]]:
    """Splits (name -> count per task type) of distinct questions; no question id is in two splits, nor in
    `exclude` (questions of another split, e.g. the warm-up's)."""
    rng = random.Random(seed)
    out: dict[str, dict[str, list[tuple[Any, ...]]]] = {name: {t: [] for t in per_task} for name in counts}
    for task in per_task:
        seen = {question_id(task, q) for q in (exclude or {}).get(task, [])}
        for name, n in counts.items():
            while len(out[name][task]) < n:
                q = draw_question(task, rng)
                if question_id(task, q) not in seen:
                    seen.add(question_id(task, q))
                    out[name][task].append(q)
    return out


def json_record_reward(completions: list[str], *, prompts: list[Any], **kwargs: Any) -> list[float | None]:
    """1.0 when the completion's first JSON value is valid against the JSON Schema the prompt asks for (an object
    with exactly its item and qty), else 0.0; None for prompts that ask for no record.

    >>> json_record_reward([' {"item": "fig", "qty": 12}', '{"item": "fig", "qty": "12"}', "{}"],
    ...                    prompts=["Record item fig qty 12 as JSON."] * 2 + ["hi"])
    [1.0, 0.0, None]
    """
    import jsonschema

    out: list[float | None] = []
    for completion, prompt in zip(completions, prompts, strict=True):
        m = JSON_QUESTION.search(prompt if isinstance(prompt, str) else json.dumps(prompt))
        if not m:
            out.append(None)
            continue
        schema = {
            "type": "object",
            "properties": {"item": {"const": m.group(1)}, "qty": {"type": "integer", "const": int(m.group(2))}},
            "required": ["item", "qty"],
            "additionalProperties": False,
        }
        try:
            doc, _ = json.JSONDecoder().raw_decode(completion.lstrip())
        except ValueError:
            out.append(0.0)
            continue
        out.append(1.0 if jsonschema.Draft202012Validator(schema).is_valid(doc) else 0.0)
    return out


def reverse_reward(completions: list[str], *, prompts: list[Any], **kwargs: Any) -> list[float | None]:
    """1.0 when the completion's first line is the prompt's letters in reverse order, else 0.0; None for prompts
    that ask for no reversal.

    >>> reverse_reward([" c b a", "a b c", "x"], prompts=["Reverse the letters a b c."] * 2 + ["hi"])
    [1.0, 0.0, None]
    """
    out: list[float | None] = []
    for completion, prompt in zip(completions, prompts, strict=True):
        m = REVERSE_QUESTION.search(prompt if isinstance(prompt, str) else json.dumps(prompt))
        if not m:
            out.append(None)
            continue
        want = " ".join(reversed(m.group(1).split()))
        line = completion.strip().split("\n")[0].split()
        out.append(1.0 if " ".join(line) == want else 0.0)
    return out


def suite_scorers() -> list[dict[str, Any]]:
    """Scorer specs (`learner.scorers`) for the suite: one label-free verifier per task type."""
    return [
        {"type": "arithmetic", "task_types": ["arith"]},
        {"type": "python", "name": "json_schema", "callable": "learners.tasks:json_record_reward",
         "task_types": ["json"]},
        {"type": "python", "name": "reverse", "callable": "learners.tasks:reverse_reward", "task_types": ["reverse"]},
    ]  # fmt: skip


def suite_corpus(seed: int = 0, n: int = 2000) -> list[str]:
    """Tokenizer text in the suite's formats (questions only from a separate draw: the tokenizer sees no split)."""
    rng = random.Random(seed + 99)
    lines = []
    for i in range(n):
        task = TASK_TYPES[i % len(TASK_TYPES)]
        q = draw_question(task, rng)
        lines.append(f"{task_prompt(task, q, rng.randint(1000, 9999))} {task_answer(task, q)}")
    return lines


def make_suite_model(
    directory: str | Path,
    warm: dict[str, list[tuple[Any, ...]]],
    *,
    steps: int,
    seed: int = 0,
    lr: float = 3e-3,
    batch_size: int = 32,
    **size: Any,
) -> tuple[Path, list[float]]:
    """A small model built here (digit-level tokenizer) and warmed up on the labeled `warm` questions of every task
    type, so it is weak but not random. Returns its directory and the warm-up losses."""
    out = Path(directory)
    make_tiny(out, seed=seed, corpus=suite_corpus(seed), individual_digits=True, **size)
    model, tokenizer = load_causal_lm(out)
    rng = random.Random(seed)
    prompts = [task_prompt(t, q, rng.randint(1000, 9999)) for t, qs in warm.items() for q in qs]
    answers = [task_answer(t, q) for t, qs in warm.items() for q in qs]
    texts = [f"{p} {a}{tokenizer.eos_token}" for p, a in zip(prompts, answers, strict=True)]
    losses = supervised_train(
        model, tokenizer, texts, steps=steps, lr=lr, batch_size=batch_size, seed=seed, prompts=prompts
    )
    log.info("suite warm-up: %d steps, loss %.3f -> %.3f", steps, losses[0], losses[-1])
    model.save_pretrained(out)
    return out, losses
