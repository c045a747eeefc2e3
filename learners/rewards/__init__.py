"""Reward functions shared by the stream (scoring interactions) and the TAO learner (scoring candidates).

Each is a pure function `(completions, **kwargs) -> list[float | None]` in TRL's reward-function shape;
`None` means "does not apply to this item". `build_scorer` turns a configured spec into one.
"""

from learners.rewards.composite import CompositeScorer, ScoredItem, combine_parts
from learners.rewards.registry import REWARD_FUNCTIONS, build_scorer, register_reward
from learners.rewards.specs import ScorerSpec

__all__ = [
    "REWARD_FUNCTIONS",
    "CompositeScorer",
    "ScoredItem",
    "ScorerSpec",
    "build_scorer",
    "combine_parts",
    "register_reward",
]
