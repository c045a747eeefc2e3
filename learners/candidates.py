"""From a round's scored candidates to what each training mode learns from (pure functions).

The strategy mix reaches the update this way: RFT and DPO train on the generated candidates themselves, with the
prompt rendered as the gateway serves it (no strategy text), so what a strategy found at test time is distilled
into the plain prompt. GRPO samples its own completions: each of its rows is the prompt rendered exactly as one
strategy shaped it, for every strategy whose own candidates disagreed, so TRL's sampling uses that strategy; the
loss covers the completion tokens only (the prompt, strategy text included, is context and carries no loss).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

CONTRAST_MODES = frozenset({"grpo", "offline"})  # modes that learn from a difference between candidates


def split_counts(k: int, combos: int) -> list[int]:
    """k samples spread over the (strategy, temperature) combinations, the first ones getting the remainder.

    >>> split_counts(5, 2), split_counts(1, 3)
    ([3, 2], [1, 0, 0])
    """
    return [k // combos + (1 if i < k % combos else 0) for i in range(combos)]


def failed(rewards: Sequence[float], threshold: float, mode: str) -> bool:
    """Whether a prompt's candidates carry nothing to learn from yet (adaptive k samples it again).

    All below the threshold; or, for a mode that learns from contrast, all scored the same.
    A prompt no scorer applies to (no rewards) is not failed: more samples would not help.

    >>> failed([0.0, 0.0], 0.5, "rft"), failed([1.0, 1.0], 0.5, "rft"), failed([1.0, 1.0], 0.5, "grpo")
    (True, False, True)
    >>> failed([], 0.5, "grpo")
    False
    """
    if not rewards:
        return False
    return max(rewards) < threshold or (mode in CONTRAST_MODES and max(rewards) == min(rewards))


@dataclass
class TrainingSets:
    grpo: list[dict[str, Any]] = field(default_factory=list)  # prompt (as shaped), source, task_type, metadata
    dpo: list[dict[str, Any]] = field(default_factory=list)  # prompt (plain), chosen, rejected
    rft: list[dict[str, Any]] = field(default_factory=list)  # prompt (plain), completion
    hashes: set[str] = field(default_factory=set)  # prompts some set uses

    def size(self, mode: str) -> int:
        return {"grpo": len(self.grpo), "offline": len(self.dpo), "rft": len(self.rft),
                "rft+grpo": len(self.rft) + len(self.grpo)}[mode]  # fmt: skip


def training_sets(
    prompts: Sequence[Any],
    candidates: dict[str, list[dict[str, Any]]],
    render: Callable[[Any, str], str],
    *,
    threshold: float,
    rft_per_prompt: int,
) -> TrainingSets:
    """Every mode's examples from the scored candidates (`render(prompt, strategy)` gives the model's text)."""
    out = TrainingSets()
    for p in prompts:
        scored = [c for c in candidates[p.hash] if c["reward"] is not None]
        if not scored:
            continue
        rewards = [c["reward"] for c in scored]
        if max(rewards) > min(rewards):
            ranked = sorted(scored, key=lambda c: c["reward"])
            out.dpo.append({"prompt": render(p.prompt, "plain"), "chosen": ranked[-1]["response"],
                            "rejected": ranked[0]["response"], "hash": p.hash})  # fmt: skip
            out.hashes.add(p.hash)
        for strategy in dict.fromkeys(c["strategy"] for c in scored):
            own = [c["reward"] for c in scored if c["strategy"] == strategy]
            if len(own) >= 2 and max(own) > min(own):
                out.grpo.append({"prompt": render(p.prompt, strategy), "source": p.prompt, "task_type": p.task_type,
                                 "metadata": p.metadata, "hash": p.hash})  # fmt: skip
                out.hashes.add(p.hash)
        passing = sorted((c for c in scored if c["reward"] >= threshold), key=lambda c: -c["reward"])
        kept: list[str] = []
        for c in passing:
            if c["response"].strip() and c["response"] not in kept:
                kept.append(c["response"])
            if len(kept) == rft_per_prompt:
                break
        for response in kept:
            out.rft.append({"prompt": render(p.prompt, "plain"), "completion": response, "hash": p.hash})
            out.hashes.add(p.hash)
    return out
