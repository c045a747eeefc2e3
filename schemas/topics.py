"""Topic names (README, "Topics and events"): the wire contract between agents, streams, learner and serving."""

INTERACTIONS = "taoflow.interactions"
FEEDBACK = "taoflow.feedback"
SCORES = "taoflow.scores"
UTILITIES = "taoflow.utilities"
ADAPTERS = "taoflow.adapters"
DEAD_LETTERS = "taoflow.dead-letters"
SESSIONS = "taoflow.sessions"

# the learner's round and candidate rows, landed into tao_rounds / tao_candidates by the DuckDB owner
# (internal: one writer per DuckDB file, so the learner hands its rows over Kafka like every other table)
LEARNER_RECORDS = "taoflow.learner.records"

ALL_TOPICS = (INTERACTIONS, FEEDBACK, SCORES, UTILITIES, ADAPTERS, DEAD_LETTERS, SESSIONS)
INTERNAL_TOPICS = (LEARNER_RECORDS,)
COMPACTED_TOPICS = frozenset({UTILITIES})
# read whole by every gateway, in order: the adapter lifecycle is a handful of events, one partition keeps their order
SINGLE_PARTITION_TOPICS = frozenset({ADAPTERS})
