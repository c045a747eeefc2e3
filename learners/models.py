"""Models without a hub: build a tiny Llama-shaped model and tokenizer locally; load any model by path or name."""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from learners.exceptions import LearnerError

if TYPE_CHECKING:
    from taoflow.settings import Settings

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


_WORDS = """the a an is are was what how why answer question result sum total please compute add plus minus
times equals yes no ok json format number list name value true false user assistant system step think so
capital france paris hello world refund order status shipped delivered cancel help account"""


def _corpus(seed: int, n: int = 4000) -> list[str]:
    """Text the tokenizer is trained on: arithmetic, formats and plain words the demo and tests use."""
    rng = random.Random(seed)
    words = re.findall(r"\w+", _WORDS)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"What is {a} + {b}? {a + b}")
        lines.append(f"{a} + {b} = {a + b}")
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))))
        lines.append(json.dumps({"answer": a + b, "ok": True}))
    return lines


def build_tokenizer(
    seed: int = 0, vocab_size: int = 512, *, corpus: list[str] | None = None, individual_digits: bool = False
) -> Any:
    """A byte-level BPE tokenizer trained here, wrapped as a transformers fast tokenizer.

    `corpus`: extra training text. `individual_digits`: every digit its own token, so numbers the model never saw
    are made of pieces it has (multi-digit arithmetic needs that to generalise)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if individual_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed) + list(corpus or []), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"  # decoder-only generation pads on the left
    return fast


def _tiny_config(tokenizer: Any, hidden_size: int, layers: int, heads: int, **extra: Any) -> Any:
    """A small Llama config sized to the tokenizer, with its special token ids."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def make_tiny(
    directory: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    vocab_size: int = 512,
    max_positions: int = 256,
    corpus: list[str] | None = None,
    individual_digits: bool = False,
) -> Path:
    """Write a tiny Llama-shaped causal LM (random weights) and its tokenizer as a normal model directory."""
    import torch
    from transformers import LlamaForCausalLM

    out = Path(directory)
    if out.exists() and any(out.iterdir()):
        raise LearnerError(f"{out} is not empty; choose a new directory for the model")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(seed, vocab_size, corpus=corpus, individual_digits=individual_digits)
    torch.manual_seed(seed)
    config = _tiny_config(
        tokenizer, hidden_size, layers, heads, max_position_embeddings=max_positions, tie_word_embeddings=True
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("tiny model (%d parameters) written to %s", sum(p.numel() for p in model.parameters()), out)
    return out


def make_tiny_reward_model(directory: str | Path, *, seed: int = 0, hidden_size: int = 32, layers: int = 1) -> Path:
    """A tiny sequence-classification model (one logit) and tokenizer: the shape `reward_model` scorers load."""
    import torch
    from transformers import LlamaForSequenceClassification

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(seed)
    torch.manual_seed(seed)
    config = _tiny_config(tokenizer, hidden_size, layers, 4, num_labels=1)
    LlamaForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def load_causal_lm(name_or_path: str | Path, *, dtype: Any = None, device: str | None = None) -> tuple[Any, Any]:
    """Model and tokenizer by local path or name, through the same `from_pretrained` a real model uses."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype)  # type: ignore[arg-type]
    except OSError as exc:
        raise LearnerError(
            f"cannot load model {name_or_path!r}: {exc}. Give a local model directory "
            "(e.g. one made by `taoflow models make-tiny DIR`) or a name already in the local cache"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if device:
        model.to(device)  # type: ignore[arg-type]
    return model, tokenizer


def default_base_model(settings: Settings) -> str:
    """`TAOFLOW_BASE_MODEL`, or a tiny model built locally under the data directory (no hub needed)."""
    if settings.core.base_model:
        return settings.core.base_model
    path = settings.core.data_dir / "models" / "tiny"
    if not (path / "config.json").exists():
        shutil.rmtree(path, ignore_errors=True)
        log.info("TAOFLOW_BASE_MODEL is unset: building a tiny model at %s", path)
        make_tiny(path)
    return str(path)


def check_model(name_or_path: str) -> None:
    """Fail early, with the fix, when the base model cannot be found (reading its config is cheap)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise LearnerError(
            f"cannot load model {name_or_path!r}: {str(exc).splitlines()[0]}. Set TAOFLOW_BASE_MODEL to a local model "
            "directory (e.g. one made by `taoflow models make-tiny DIR`) or a name already in the local cache"
        ) from None
