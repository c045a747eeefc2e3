"""Reward-model hook: a local sequence-classification model scores (prompt, completion) pairs."""

from __future__ import annotations

from typing import Any

from learners.exceptions import LearnerError, ScorerConfigError
from learners.generation import resolve_device


class RewardModel:
    """Loads `path` with transformers' `from_pretrained` onto `device` ("auto": the GPU when there is one);
    reward = sigmoid(logit) of the first label."""

    def __init__(self, path: str, batch_size: int = 16, max_length: int = 1024, device: str = "auto") -> None:
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

        try:
            self.device = resolve_device(device)
        except LearnerError as exc:
            raise ScorerConfigError(f"reward model {path!r}: {exc}") from None
        self.model.to(self.device)
        self.model.eval()
        self._torch = torch
        self.batch_size = batch_size
        self.max_length = max_length

    def texts(self, prompts: list[Any], completions: list[str]) -> list[tuple[str, str | None]]:
        """What the model reads: a chat through its tokenizer's chat template (the completion as the assistant's
        turn), a text prompt paired with its completion. Never `str(messages)`: a Python repr is not the text the
        reward model was trained on."""
        out: list[tuple[str, str | None]] = []
        template = getattr(self.tokenizer, "chat_template", None)
        for p, c in zip(prompts, completions, strict=True):
            if isinstance(p, str):
                out.append((p, c))
                continue
            messages = [{"role": str(m.get("role", "user")), "content": str(m.get("content", ""))} for m in p]
            messages.append({"role": "assistant", "content": c})
            if template:
                out.append((str(self.tokenizer.apply_chat_template(messages, tokenize=False)), None))
            else:
                out.append(("\n".join(f"{m['role']}: {m['content']}" for m in messages), None))
        return out

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float]:
        prompts = kwargs.get("prompts") or [""] * len(completions)
        pairs = self.texts(list(prompts), completions)
        out: list[float] = []
        torch = self._torch
        with torch.no_grad():
            for i in range(0, len(pairs), self.batch_size):
                batch = pairs[i : i + self.batch_size]
                firsts = [t for t, _ in batch]
                seconds = [s for _, s in batch]
                if all(s is not None for s in seconds):
                    enc = self.tokenizer(firsts, seconds, return_tensors="pt", padding=True, truncation=True,
                                         max_length=self.max_length)  # fmt: skip
                    out.extend(self._score(enc))
                    continue
                limit = self.max_length
                for first, second in batch:  # one by one: whole chats and pairs mixed
                    one = self.tokenizer(first, second, return_tensors="pt", truncation=True, max_length=limit)
                    out.extend(self._score(one))
        return out

    def _score(self, enc: Any) -> list[float]:
        logits = self.model(**enc.to(self.device)).logits[:, 0]
        return [float(x) for x in self._torch.sigmoid(logits.float()).tolist()]
