"""Errors of the learner tier."""

from taoflow.exceptions import ConfigError, TaoflowError


class ScorerConfigError(ConfigError):
    """A configured scorer cannot be built or misbehaves; the message names it."""


class LearnerError(TaoflowError):
    """A TAO round could not proceed."""
