"""Configured scorers: one pydantic model per kind, chosen by `type` (settings and taoflow.toml)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, description="part name in scores; defaults to the type")
    weight: float = Field(default=1.0, ge=0)
    task_types: list[str] | None = Field(default=None, description="apply only to these task types")

    @property
    def part(self) -> str:
        return self.name or str(getattr(self, "type"))  # noqa: B009 - every subclass declares `type`


class RegexSpec(_Spec):
    type: Literal["regex"] = "regex"
    pattern: str
    full_match: bool = False


class JsonSpec(_Spec):
    type: Literal["json"] = "json"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")


class ExactMatchSpec(_Spec):
    type: Literal["exact_match"] = "exact_match"


class LengthSpec(_Spec):
    type: Literal["length"] = "length"
    min_chars: int = 1
    max_chars: int = 4000


class PythonSpec(_Spec):
    type: Literal["python"] = "python"
    callable: str = Field(description="'package.module:function', a (completions, **kwargs) -> list[float|None]")
    options: dict[str, Any] = Field(default_factory=dict)


class RewardModelSpec(_Spec):
    type: Literal["reward_model"] = "reward_model"
    path: str = Field(description="local directory of a sequence-classification model (one logit)")
    batch_size: int = 16
    max_length: int = 1024
    device: str | None = Field(
        default=None,
        description="cpu, cuda, cuda:1 ...; unset: the learner's device in a round, else the GPU when there is one",
    )


class ArithmeticSpec(_Spec):
    type: Literal["arithmetic"] = "arithmetic"


class LlmJudgeSpec(_Spec):
    type: Literal["llm_judge"] = "llm_judge"
    base_url: str = Field(description="an OpenAI-compatible endpoint, e.g. http://host:8000/v1")
    model: str
    mode: Literal["pointwise", "ranking"] = Field(
        default="pointwise", description="score each response alone, or rank the candidates of a prompt together"
    )
    api_key_env: str | None = Field(default=None, description="environment variable holding the API key")
    rubric: str = "Is the response correct, helpful and well formatted for the request?"
    concurrency: int = Field(default=8, ge=1, description="requests in flight per batch")
    timeout_s: float = Field(default=60.0, gt=0)
    cache_path: str | None = Field(default=None, description="SQLite cache of verdicts; unset: in memory")


ScorerSpec = Annotated[
    RegexSpec | JsonSpec | ExactMatchSpec | LengthSpec | PythonSpec | RewardModelSpec | ArithmeticSpec | LlmJudgeSpec,
    Field(discriminator="type"),
]
