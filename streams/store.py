"""The DuckDB outcome tables: schema, and idempotent Arrow micro-batch inserts keyed by event identity."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

log = logging.getLogger(__name__)

DDL = """
CREATE TABLE IF NOT EXISTS interactions (
    event_id VARCHAR PRIMARY KEY,
    ts TIMESTAMPTZ NOT NULL,
    agent_id VARCHAR NOT NULL,
    task_type VARCHAR NOT NULL,
    operator VARCHAR NOT NULL,
    prompt VARCHAR NOT NULL,          -- the text, or the chat messages as JSON
    prompt_is_chat BOOLEAN NOT NULL,
    prompt_hash VARCHAR NOT NULL,     -- sha256 of `prompt`, for de-duplication by content
    response VARCHAR NOT NULL,
    adapter VARCHAR,
    latency_ms DOUBLE NOT NULL,
    metadata JSON,
    kafka_partition INTEGER,
    kafka_offset BIGINT,
    landed_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
    -- added after the first release: last, and nullable, as MIGRATIONS adds them to an existing file
    caller VARCHAR,                   -- hash of the gateway API key that captured it; NULL: a trusted producer
    forced BOOLEAN DEFAULT false,     -- the client forced the operator/adapter: never counted in utilities
    session_id VARCHAR,               -- the multi-step session it is a step of (NULL: a single call)
    step INTEGER,                     -- its step in that session
    finish_reason VARCHAR,            -- why generation stopped (stop, length, tool_calls, ...)
    tools JSON,                       -- the tools the request offered
    tool_calls JSON,                  -- the tool calls the response made
    response_format JSON              -- the response format the request asked for
);
CREATE TABLE IF NOT EXISTS feedback (
    event_id VARCHAR PRIMARY KEY,
    interaction_id VARCHAR,           -- NULL for feedback on a whole session
    ts TIMESTAMPTZ NOT NULL,
    kind VARCHAR NOT NULL,
    value DOUBLE NOT NULL,
    metadata JSON,
    landed_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
    caller VARCHAR,                   -- who sent it (as on interactions); another caller's feedback is dead-lettered
    session_id VARCHAR                -- feedback on a whole multi-step session (then interaction_id is NULL)
);
CREATE TABLE IF NOT EXISTS sessions (  -- every revision of each session's outcome (`session_outcomes`: the latest)
    session_key VARCHAR NOT NULL,     -- `<caller or ->|<session_id>`: one caller's session
    session_id VARCHAR NOT NULL,
    caller VARCHAR,                   -- sessions are kept per caller: NULL is a trusted producer's
    revision INTEGER NOT NULL,
    ts TIMESTAMPTZ NOT NULL,
    task_type VARCHAR,
    operator VARCHAR,
    adapter VARCHAR,
    steps INTEGER NOT NULL,
    started TIMESTAMPTZ,
    ended TIMESTAMPTZ,
    reward DOUBLE,
    feedback JSON,
    rewarded BOOLEAN NOT NULL,
    landed_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (session_key, revision)
);
CREATE TABLE IF NOT EXISTS scores (
    interaction_id VARCHAR NOT NULL,
    revision INTEGER NOT NULL,
    ts TIMESTAMPTZ NOT NULL,
    task_type VARCHAR NOT NULL,
    operator VARCHAR NOT NULL,
    adapter VARCHAR,
    reward DOUBLE NOT NULL,
    parts JSON,
    landed_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (interaction_id, revision)
);
CREATE TABLE IF NOT EXISTS utilities (
    task_type VARCHAR NOT NULL,
    operator VARCHAR NOT NULL,
    utility DOUBLE NOT NULL,
    n BIGINT NOT NULL,
    last_reward DOUBLE,
    ts TIMESTAMPTZ NOT NULL,
    imported BIGINT DEFAULT 0,        -- of n, pseudo-rewards imported from another deployment (taoflow knowledge)
    PRIMARY KEY (task_type, operator)
);
CREATE TABLE IF NOT EXISTS utility_history (
    task_type VARCHAR NOT NULL,
    operator VARCHAR NOT NULL,
    n BIGINT NOT NULL,
    utility DOUBLE NOT NULL,
    last_reward DOUBLE,
    ts TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (task_type, operator, n)
);
CREATE TABLE IF NOT EXISTS dead_letters (
    source_topic VARCHAR NOT NULL,
    kafka_partition INTEGER NOT NULL,
    kafka_offset BIGINT NOT NULL,
    error VARCHAR NOT NULL,
    original BLOB NOT NULL,
    ts TIMESTAMPTZ NOT NULL,
    landed_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (source_topic, kafka_partition, kafka_offset)
);
CREATE TABLE IF NOT EXISTS tao_rounds (
    round_id VARCHAR PRIMARY KEY,
    status VARCHAR NOT NULL,          -- running, published, gated_out, skipped, failed
    stage VARCHAR,                    -- the stage running, or the last one reached
    started_at TIMESTAMPTZ NOT NULL,
    finished_at TIMESTAMPTZ,
    base_model VARCHAR NOT NULL,
    parent_adapter VARCHAR,           -- the adapter training continued from (NULL: the base)
    adapter VARCHAR,                  -- the adapter this round published
    mode VARCHAR NOT NULL,
    k INTEGER NOT NULL,
    window_start TIMESTAMPTZ,
    window_end TIMESTAMPTZ,
    prompts INTEGER,
    heldout INTEGER,
    timings JSON,                     -- seconds per stage
    metrics JSON,
    error VARCHAR,
    seq BIGINT NOT NULL               -- the version of this row: a later one replaces it
);
CREATE TABLE IF NOT EXISTS tao_candidates (
    round_id VARCHAR NOT NULL,
    prompt_hash VARCHAR NOT NULL,
    idx INTEGER NOT NULL,
    task_type VARCHAR NOT NULL,
    strategy VARCHAR NOT NULL,
    temperature DOUBLE NOT NULL,
    prompt VARCHAR NOT NULL,
    response VARCHAR NOT NULL,
    reward DOUBLE,
    parts JSON,
    PRIMARY KEY (round_id, prompt_hash, idx)
);
CREATE TABLE IF NOT EXISTS adapters (
    adapter VARCHAR NOT NULL,
    action VARCHAR NOT NULL,
    ts TIMESTAMPTZ NOT NULL,
    base_model VARCHAR NOT NULL,
    path VARCHAR,
    round_id VARCHAR,
    sha256 VARCHAR,
    metrics JSON,
    reason VARCHAR,
    PRIMARY KEY (adapter, action, ts)
);
-- where the lander resumes each partition it lands: written in the same transaction as the rows (the Kafka Connect
-- and Flink sink pattern), so a crash between landing and Kafka's commit can neither lose nor repeat a batch
CREATE TABLE IF NOT EXISTS lander_offsets (
    topic VARCHAR NOT NULL,
    kafka_partition INTEGER NOT NULL,
    next_offset BIGINT NOT NULL,
    PRIMARY KEY (topic, kafka_partition)
);
"""

# Columns added since a table was first created, for files made by an earlier version (each statement a no-op on a
# current file). DuckDB cannot add a NOT NULL column this way, hence nullable columns, placed last in the DDL too
# so that new and migrated files have the same column order.
MIGRATIONS = """
ALTER TABLE interactions ADD COLUMN IF NOT EXISTS caller VARCHAR;
ALTER TABLE interactions ADD COLUMN IF NOT EXISTS forced BOOLEAN DEFAULT false;
ALTER TABLE feedback ADD COLUMN IF NOT EXISTS caller VARCHAR;
ALTER TABLE utilities ADD COLUMN IF NOT EXISTS imported BIGINT DEFAULT 0;
ALTER TABLE interactions ADD COLUMN IF NOT EXISTS session_id VARCHAR;
ALTER TABLE interactions ADD COLUMN IF NOT EXISTS step INTEGER;
ALTER TABLE interactions ADD COLUMN IF NOT EXISTS finish_reason VARCHAR;
ALTER TABLE interactions ADD COLUMN IF NOT EXISTS tools JSON;
ALTER TABLE interactions ADD COLUMN IF NOT EXISTS tool_calls JSON;
ALTER TABLE interactions ADD COLUMN IF NOT EXISTS response_format JSON;
ALTER TABLE feedback ADD COLUMN IF NOT EXISTS session_id VARCHAR;
ALTER TABLE feedback ALTER COLUMN interaction_id DROP NOT NULL;
"""

# Views: what users query to see whether the loop improves (README, "Watching the loop").
VIEWS = """
CREATE OR REPLACE VIEW final_scores AS  -- each interaction's latest revision (most have only revision 0)
WITH later AS (SELECT interaction_id, max(revision) AS last FROM scores WHERE revision > 0 GROUP BY interaction_id)
SELECT s.* FROM scores s LEFT JOIN later USING (interaction_id) WHERE s.revision = coalesce(later.last, 0);

CREATE OR REPLACE MACRO improvement_by(width) AS TABLE
SELECT time_bucket(width, ts) AS bucket, coalesce(adapter, 'base') AS adapter, task_type,
       count(*) AS n, avg(reward) AS mean_reward,
       avg(reward) - 1.96 * coalesce(stddev_samp(reward), 0) / sqrt(count(*)) AS ci_low,
       avg(reward) + 1.96 * coalesce(stddev_samp(reward), 0) / sqrt(count(*)) AS ci_high
FROM final_scores GROUP BY ALL ORDER BY bucket, adapter, task_type;

CREATE OR REPLACE VIEW improvement AS SELECT * FROM improvement_by(INTERVAL 1 HOUR);

CREATE OR REPLACE VIEW operator_leaderboard AS
WITH sel AS (SELECT task_type, operator, count(*) AS picks FROM interactions GROUP BY ALL),
     rew AS (SELECT task_type, operator, avg(reward) AS mean_reward, count(*) AS rewarded
             FROM final_scores GROUP BY ALL),
     ops AS (SELECT task_type, operator FROM utilities UNION SELECT task_type, operator FROM sel)
SELECT ops.task_type, ops.operator,
       rank() OVER (PARTITION BY ops.task_type ORDER BY u.utility DESC NULLS LAST) AS rank,
       u.utility, u.n AS utility_n,
       coalesce(sel.picks, 0) AS picks,
       coalesce(sel.picks, 0) / nullif(sum(coalesce(sel.picks, 0)) OVER (PARTITION BY ops.task_type), 0)
           AS selection_share,
       rew.mean_reward, coalesce(rew.rewarded, 0) AS rewarded, u.ts AS last_update
FROM ops
LEFT JOIN utilities u USING (task_type, operator)
LEFT JOIN sel USING (task_type, operator)
LEFT JOIN rew USING (task_type, operator)
ORDER BY ops.task_type, rank, ops.operator;

CREATE OR REPLACE VIEW session_outcomes AS  -- each session's latest revision: steps, operator, reward, duration
WITH last AS (SELECT session_key, max(revision) AS revision FROM sessions GROUP BY session_key)
SELECT s.session_id, s.caller, s.task_type, s.operator, coalesce(s.adapter, 'base') AS adapter, s.steps, s.reward,
       s.feedback, s.rewarded, s.started, s.ended,
       date_diff('millisecond', s.started, s.ended) / 1000.0 AS duration_s, s.ts AS updated
FROM sessions s JOIN last USING (session_key, revision);

CREATE OR REPLACE VIEW session_leaderboard AS  -- session outcomes per operator (sessions with a reward)
SELECT task_type, operator, adapter, count(*) AS sessions, avg(steps) AS mean_steps, avg(reward) AS mean_reward,
       avg(reward) - 1.96 * coalesce(stddev_samp(reward), 0) / sqrt(count(*)) AS ci_low,
       avg(reward) + 1.96 * coalesce(stddev_samp(reward), 0) / sqrt(count(*)) AS ci_high,
       avg(duration_s) AS mean_duration_s
FROM session_outcomes WHERE reward IS NOT NULL AND operator IS NOT NULL
GROUP BY ALL ORDER BY task_type, mean_reward DESC;

CREATE OR REPLACE VIEW round_history AS
SELECT round_id, status AS decision, started_at, finished_at,
       date_diff('millisecond', started_at, finished_at) / 1000.0 AS seconds,
       prompts, heldout, CAST(metrics->>'candidates' AS DOUBLE) AS candidates,
       CAST(metrics->>'prompts_uniform_skipped' AS DOUBLE) AS prompts_without_signal,
       CAST(metrics->>'heldout_reward_current' AS DOUBLE) AS reward_before,
       CAST(metrics->>'heldout_reward_new' AS DOUBLE) AS reward_after,
       CAST(metrics->>'gain' AS DOUBLE) AS gain, CAST(metrics->>'gain_lcb' AS DOUBLE) AS gain_lower_bound,
       CAST(timings->>'select' AS DOUBLE) AS select_s, CAST(timings->>'generate' AS DOUBLE) AS generate_s,
       CAST(timings->>'score' AS DOUBLE) AS score_s, CAST(timings->>'train' AS DOUBLE) AS train_s,
       CAST(timings->>'gate' AS DOUBLE) AS gate_s, CAST(timings->>'publish' AS DOUBLE) AS publish_s,
       parent_adapter, adapter, mode, k, error
FROM tao_rounds ORDER BY started_at;

CREATE OR REPLACE VIEW freshness AS
SELECT 'interactions' AS table_name, count(*) AS rows, max(ts) AS latest_event, max(landed_at) AS latest_landed,
       date_diff('millisecond', max(landed_at), current_timestamp) / 1000.0 AS seconds_since_landing
FROM interactions
UNION ALL SELECT 'feedback', count(*), max(ts), max(landed_at),
       date_diff('millisecond', max(landed_at), current_timestamp) / 1000.0 FROM feedback
UNION ALL SELECT 'scores', count(*), max(ts), max(landed_at),
       date_diff('millisecond', max(landed_at), current_timestamp) / 1000.0 FROM scores
UNION ALL SELECT 'dead_letters', count(*), max(ts), max(landed_at),
       date_diff('millisecond', max(landed_at), current_timestamp) / 1000.0 FROM dead_letters;

CREATE OR REPLACE VIEW dead_letter_rate AS
WITH good AS (SELECT 'taoflow.interactions' AS source_topic, count(*) AS n FROM interactions
              UNION ALL SELECT 'taoflow.feedback', count(*) FROM feedback),
     bad AS (SELECT source_topic, count(*) AS n, max(ts) AS last_error FROM dead_letters GROUP BY ALL)
SELECT coalesce(good.source_topic, bad.source_topic) AS source_topic, coalesce(good.n, 0) AS accepted,
       coalesce(bad.n, 0) AS dead_letters,
       coalesce(bad.n, 0) / nullif(coalesce(good.n, 0) + coalesce(bad.n, 0), 0) AS rate, bad.last_error
FROM good FULL JOIN bad USING (source_topic) ORDER BY source_topic;
"""

# columns each batch supplies (the rest take their defaults)
COLUMNS: dict[str, tuple[str, ...]] = {
    "interactions": (
        "event_id", "ts", "agent_id", "task_type", "operator", "prompt", "prompt_is_chat", "prompt_hash",
        "response", "adapter", "latency_ms", "metadata", "kafka_partition", "kafka_offset", "caller", "forced",
        "session_id", "step", "finish_reason", "tools", "tool_calls", "response_format",
    ),
    "feedback": ("event_id", "interaction_id", "ts", "kind", "value", "metadata", "caller", "session_id"),
    "sessions": (
        "session_key", "session_id", "caller", "revision", "ts", "task_type", "operator", "adapter", "steps",
        "started", "ended", "reward", "feedback", "rewarded",
    ),
    "scores": ("interaction_id", "revision", "ts", "task_type", "operator", "adapter", "reward", "parts"),
    "utility_history": ("task_type", "operator", "n", "utility", "last_reward", "ts"),
    "utilities": ("task_type", "operator", "utility", "n", "last_reward", "ts", "imported"),
    "dead_letters": ("source_topic", "kafka_partition", "kafka_offset", "error", "original", "ts"),
    "tao_rounds": (
        "round_id", "status", "stage", "started_at", "finished_at", "base_model", "parent_adapter", "adapter", "mode",
        "k", "window_start", "window_end", "prompts", "heldout", "timings", "metrics", "error", "seq",
    ),
    "tao_candidates": (
        "round_id", "prompt_hash", "idx", "task_type", "strategy", "temperature", "prompt", "response",
        "reward", "parts",
    ),
    "adapters": ("adapter", "action", "ts", "base_model", "path", "round_id", "sha256", "metrics", "reason"),
}  # fmt: skip
# columns a batch may leave out (added after other writers of these tables existed): they take their DDL default
OPTIONAL: dict[str, frozenset[str]] = {
    "interactions": frozenset(
        {"caller", "forced", "session_id", "step", "finish_reason", "tools", "tool_calls", "response_format"}
    ),
    "feedback": frozenset({"caller", "session_id"}),
    "utilities": frozenset({"imported"}),
}
KEYS: dict[str, tuple[str, ...]] = {
    "interactions": ("event_id",),
    "feedback": ("event_id",),
    "sessions": ("session_key", "revision"),
    "scores": ("interaction_id", "revision"),
    "utility_history": ("task_type", "operator", "n"),
    "utilities": ("task_type", "operator"),
    "dead_letters": ("source_topic", "kafka_partition", "kafka_offset"),
    "tao_rounds": ("round_id",),
    "tao_candidates": ("round_id", "prompt_hash", "idx"),
    "adapters": ("adapter", "action", "ts"),
}
# tables where a later version of a row replaces the stored one: key -> the column that orders versions
UPSERT_BY = {"utilities": "n", "tao_rounds": "seq"}


_TIME_COLUMNS = frozenset({"ts", "started_at", "finished_at", "window_start", "window_end"})
_JSON_COLUMNS = frozenset({"timings", "metrics", "parts", "metadata"})


def record_values(table: str, row: dict[str, Any]) -> tuple[Any, ...]:
    """One row given as JSON-style values (ISO times, objects) in `COLUMNS[table]` order, typed for insert.

    >>> record_values("adapters", {"adapter": "a", "action": "published", "ts": "2026-01-01T00:00:00+00:00",
    ...     "base_model": "m", "metrics": {"gain": 0.1}})[2:4]
    (datetime.datetime(2026, 1, 1, 0, 0, tzinfo=datetime.timezone.utc), 'm')
    """
    from datetime import datetime

    out = []
    for col in COLUMNS[table]:
        v = row.get(col)
        if v is not None and col in _TIME_COLUMNS and isinstance(v, str):
            v = datetime.fromisoformat(v)
        elif v is not None and col in _JSON_COLUMNS and not isinstance(v, str):
            v = orjson.dumps(v).decode()
        out.append(v)
    return tuple(out)


def connect(path: Path, read_only: bool = False) -> Any:
    """Open the outcome database (creating tables, or adding the columns an older file lacks, when writable)."""
    import duckdb

    path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(path), read_only=read_only)
    if not read_only:
        con.execute(DDL)
        con.execute(MIGRATIONS)
        con.execute(VIEWS)
    return con


def dedupe(rows: dict[str, list[Any]], key: tuple[str, ...], first: bool = True) -> dict[str, list[Any]]:
    """Keep one row per key: the first (event tables: the first copy of an event id wins, as in the worker and
    across batches, where a later copy is ignored), or the last (upserted tables, whose later rows are newer).

    >>> dedupe({"k": ["a", "b", "a"], "v": [1, 2, 3]}, ("k",))
    {'k': ['a', 'b'], 'v': [1, 2]}
    >>> dedupe({"k": ["a", "b", "a"], "v": [1, 2, 3]}, ("k",), first=False)
    {'k': ['b', 'a'], 'v': [2, 3]}
    """
    keys = list(zip(*(rows[k] for k in key), strict=True))
    chosen: dict[Any, int] = {}
    for i, k in enumerate(keys):
        if not first or k not in chosen:
            chosen[k] = i
    if len(chosen) == len(keys):
        return rows
    keep = sorted(chosen.values())
    return {col: [vals[i] for i in keep] for col, vals in rows.items()}


def insert(con: Any, table: str, rows: dict[str, list[Any]]) -> int:
    """Idempotent insert of one column-oriented batch through Arrow; returns rows in the batch.

    Event tables ignore rows whose key exists (redelivery); `utilities` and `tao_rounds` keep the row with the
    highest version (`UPSERT_BY`).
    """
    if not rows or not next(iter(rows.values())):
        return 0
    rows = dedupe(rows, KEYS[table], first=table not in UPSERT_BY)
    optional = OPTIONAL.get(table, frozenset())
    cols = tuple(c for c in COLUMNS[table] if c in rows or c not in optional)
    # registered, not found by name: the lander's connection has external access off, which disables DuckDB's
    # replacement scans of Python variables
    con.register("batch", pa.table({c: rows[c] for c in cols}))
    names = ", ".join(cols)
    try:
        if table in UPSERT_BY:
            sets = ", ".join(f"{c} = excluded.{c}" for c in cols if c not in KEYS[table])
            version = UPSERT_BY[table]
            con.execute(
                f"INSERT INTO {table} ({names}) SELECT {names} FROM batch ON CONFLICT ({', '.join(KEYS[table])}) "
                f"DO UPDATE SET {sets} WHERE excluded.{version} > {table}.{version}"
            )
        else:
            con.execute(f"INSERT OR IGNORE INTO {table} ({names}) SELECT {names} FROM batch")
    finally:
        con.unregister("batch")
    return len(rows[cols[0]])
