"""Errors of the stream tier."""

from taoflow.exceptions import TaoflowError


class QueryError(TaoflowError):
    """A SQL query over the outcome tables failed; the message is DuckDB's or says why it could not run."""


class WorkerError(TaoflowError):
    """The stream worker cannot start (e.g. no broker reachable)."""


class OversizeRecord(TaoflowError):
    """An output record would exceed the broker's record size limit (TAOFLOW_STREAM_MAX_RECORD_BYTES)."""
