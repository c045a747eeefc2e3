"""Topic names of PRODUCT.md: the wire contract between agents, streams, learner and serving."""

INTERACTIONS = "taoflow.interactions"
FEEDBACK = "taoflow.feedback"
SCORES = "taoflow.scores"
UTILITIES = "taoflow.utilities"
ADAPTERS = "taoflow.adapters"
DEAD_LETTERS = "taoflow.dead-letters"

ALL_TOPICS = (INTERACTIONS, FEEDBACK, SCORES, UTILITIES, ADAPTERS, DEAD_LETTERS)
COMPACTED_TOPICS = frozenset({UTILITIES})
