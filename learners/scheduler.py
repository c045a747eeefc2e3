"""`taoflow learner`: TAO rounds on a schedule (apscheduler), never two at once, job state kept across restarts.

The job lives in a SQLite job store under `<data_dir>/learner/`, so a restarted learner keeps its next
run time (a run missed while it was down is coalesced into one). At start, rounds a dead process left
running are marked failed. A scheduled round is skipped until `min_new_prompts` prompts arrived since
the last round's data window; the round lock keeps `taoflow tao run` and the scheduler from overlapping.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from learners.exceptions import LearnerError
from learners.progress import METRICS
from learners.records import RecordSink
from learners.recovery import recover
from learners.state import learner_dir, load_rounds, round_lock
from learners.tao import run_round
from streams.exceptions import QueryError
from streams.sqlapi import query
from taoflow.metrics import serve_metrics
from taoflow.settings import Settings

log = logging.getLogger(__name__)

JOB_ID = "taoflow-tao-round"


def new_prompts(settings: Settings) -> int:
    """Distinct prompts that arrived after the data window of the last round that got that far."""

    ends = [r["window_end"] for r in load_rounds(settings) if r.get("window_end") and r.get("status") != "failed"]
    where = f"WHERE ts > CAST('{max(ends)}' AS TIMESTAMPTZ)" if ends else ""
    try:
        return int(query(f"SELECT count(DISTINCT prompt_hash) FROM interactions {where}", settings).rows[0][0])
    except QueryError:
        return 0


def scheduled_round() -> None:
    """The job: settings come from the environment each time, so a restarted learner picks up changes."""
    settings = Settings()
    need = settings.learner.min_new_prompts
    have = new_prompts(settings)
    if have < need:
        log.info("scheduled round skipped: %d new prompts since the last round, %d needed", have, need)
        return
    try:
        result = run_round(settings)
    except LearnerError as exc:
        log.warning("scheduled round not run: %s", exc)
        return
    log.info("round %s: %s %s", result.round_id, result.status, result.error or result.adapter or "")


def _trigger(settings: Settings) -> Any:
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    cfg = settings.learner
    if cfg.cron:
        try:
            return CronTrigger.from_crontab(cfg.cron)
        except ValueError as exc:
            raise LearnerError(f"learner.cron {cfg.cron!r} is not a crontab expression: {exc}") from None
    if not cfg.interval_minutes:
        raise LearnerError("set learner.interval_minutes or learner.cron")
    return IntervalTrigger(minutes=cfg.interval_minutes)


def run_scheduler(settings: Settings, stop: threading.Event | None = None, run_now: bool = False) -> None:
    """Block running the schedule until SIGINT/SIGTERM (or `stop`)."""
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    path = learner_dir(settings) / "jobs.sqlite"
    path.parent.mkdir(parents=True, exist_ok=True)
    with round_lock(settings):  # settle what a crashed learner left behind before scheduling anything
        sink = RecordSink(settings)
        try:
            for rid in recover(settings, sink):
                log.warning("round %s was interrupted by a crash; marked failed", rid)
        finally:
            sink.close()
    if settings.learner.metrics_port:
        serve_metrics(settings.learner.metrics_port, METRICS.registry, "learner", settings.core.metrics_host)
    scheduler = BackgroundScheduler(
        jobstores={"default": SQLAlchemyJobStore(url=f"sqlite:///{path}")},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600},
        timezone="UTC",
    )
    scheduler.start()
    trigger = _trigger(settings)
    job = scheduler.get_job(JOB_ID)
    if job is None or str(job.trigger) != str(trigger):
        job = scheduler.add_job(scheduled_round, trigger, id=JOB_ID, replace_existing=True, name="TAO round")
    if run_now:
        scheduler.modify_job(JOB_ID, next_run_time=_utcnow())
    log.info("learner scheduled (%s); next round at %s", trigger, scheduler.get_job(JOB_ID).next_run_time)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        scheduler.shutdown(wait=True)
        log.info("learner stopped")


def _utcnow() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)
