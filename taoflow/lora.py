"""What vLLM accepts of a LoRA setup, shared by the learner's engines and the gateway's vLLM server."""

from __future__ import annotations

from taoflow.exceptions import ConfigError

# the values vLLM's LoRAConfig allows for max_lora_rank (`--max-lora-rank`); anything else fails at start-up
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(r: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds adapters of LoRA rank `r`.

    >>> [vllm_lora_rank(r) for r in (1, 2, 8, 12, 24, 64, 300, 512)]
    [1, 8, 8, 16, 32, 64, 320, 512]
    """
    if r < 1:
        raise ConfigError(f"a LoRA rank must be at least 1, not {r}")
    for allowed in VLLM_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise ConfigError(
        f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}, not {r}: lower TAOFLOW_LEARNER_LORA_R "
        "or use the transformers backend"
    )
