"""Reward-model hook: a local sequence-classification model scores (prompt, completion) pairs."""

from __future__ import annotations

from typing import Any

from learners.exceptions import ScorerConfigError


class RewardModel:
    """Loads `path` with transformers' `from_pretrained`; reward = sigmoid(logit) of the first label."""

    def __init__(self, path: str, batch_size: int = 16, max_length: int = 1024) -> None:
        try:
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError as exc:  # pragma: no cover - torch and transformers are core dependencies
            raise ScorerConfigError(f"the reward model needs torch and transformers: {exc}") from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path)
        except OSError as exc:
            raise ScorerConfigError(f"reward model {path!r} cannot be loaded: {exc}") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.eval()
        self._torch = torch
        self.batch_size = batch_size
        self.max_length = max_length

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float]:
        prompts = kwargs.get("prompts") or [""] * len(completions)
        out: list[float] = []
        torch = self._torch
        with torch.no_grad():
            for i in range(0, len(completions), self.batch_size):
                enc = self.tokenizer(
                    [str(p) for p in prompts[i : i + self.batch_size]],
                    completions[i : i + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                )
                logits = self.model(**enc).logits[:, 0]
                out.extend(torch.sigmoid(logits.float()).tolist())
        return out
