"""The portable knowledge file (`taoflow knowledge export/import`): operators and the utilities learned with them.

What a deployment learns in its utilities (which strategy works for which task type) is knowledge about strategies,
not weights: it can outlive a base-model switch or move to another deployment. The file is versioned: a reader
refuses a `version` it does not know, and `format` tells it apart from any other JSON document.
"""

from __future__ import annotations

from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.base import Timestamp
from schemas.interactions import Name

KNOWLEDGE_FORMAT: Final = "taoflow.knowledge"
KNOWLEDGE_VERSION: Final = 1

StrategyName = Field(min_length=1, max_length=120, pattern=r"^[^@/]+$")  # as `taoflow.settings.OperatorSpec.name`


class Strategy(BaseModel):
    """An operator's definition as `[serve.operators]` declares it: what the gateway wraps a request in."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = StrategyName
    system_prompt: str | None = None
    template: str | None = Field(default=None, description="e.g. 'Answer briefly: {prompt}'")
    parameters: dict[str, str | int | float | bool | None] = Field(
        default_factory=dict, description="any further fields of the definition, by name"
    )


class LearnedUtility(BaseModel):
    """One operator's ACT-R utility for one task type, as the exporting deployment had it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_type: Name
    strategy: str = StrategyName
    adapter: Name | None = Field(description="the adapter it was learned on; null: the base model")
    utility: float = Field(allow_inf_nan=False)
    n: int = Field(ge=0, description="rewards learned in the exporting deployment")
    imported: int = Field(default=0, ge=0, description="pseudo-rewards that deployment had imported itself")
    last_update: Timestamp


class LearnedOn(BaseModel):
    """Where and how the utilities were learned: the base model, and the ACT-R rule's parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: str | None = Field(description="the deployment's base model (a name or directory); null: the default")
    alpha: float = Field(gt=0, le=1, description="the learning rate of `U(n) = U(n-1) + alpha * (R(n) - U(n-1))`")
    initial_utility: float = Field(allow_inf_nan=False, description="U(0)")


class KnowledgeFile(BaseModel):
    """A deployment's strategies and what it learned about them, at one moment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["taoflow.knowledge"] = KNOWLEDGE_FORMAT
    version: Literal[1] = KNOWLEDGE_VERSION
    export_id: str = Field(pattern=r"^[0-9a-f]{32}$", description="unique per export: importing it twice is a no-op")
    exported_at: Timestamp
    learned_on: LearnedOn
    operators: dict[str, list[Strategy]] = Field(description="per task type, 'default' for the rest (as configured)")
    utilities: list[LearnedUtility]
