"""`taoflow report`: is the loop improving? Reward over time per task type and adapter (sparklines with adapter
markers), the operator leaderboard, TAO rounds, and data health, from the SQL views.
"""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from streams.sqlapi import bucket_width, query
from taoflow.exceptions import ConfigError
from taoflow.settings import Settings

SPARK = "▁▂▃▄▅▆▇█"
MARKS = {"published": "▲", "promoted": "★", "rolled_back": "▼"}
_SINCE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str | None, now: datetime | None = None) -> datetime | None:
    """'90m', '2h', '7d' before now, or an ISO 8601 time.

    >>> parse_since("2h", datetime(2026, 1, 1, 12, tzinfo=UTC)).isoformat()
    '2026-01-01T10:00:00+00:00'
    """
    if not text:
        return None
    now = now or datetime.now(UTC)
    m = _SINCE.match(text.strip())
    if m:
        return now - timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--since {text!r}: give a duration like 30m, 2h, 7d or an ISO time") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def sparkline(values: list[float | None], lo: float = 0.0, hi: float = 1.0) -> str:
    """One character per value; gaps are spaces.

    >>> sparkline([0.0, 0.5, 1.0, None])
    '▁▅█ '
    """
    out = []
    for v in values:
        if v is None:
            out.append(" ")
            continue
        x = 0.0 if hi <= lo else (min(hi, max(lo, v)) - lo) / (hi - lo)
        out.append(SPARK[min(len(SPARK) - 1, int(x * (len(SPARK) - 1) + 0.5))])
    return "".join(out)


def _q(settings: Settings, sql: str) -> list[dict[str, Any]]:
    return query(sql, settings).as_dicts()


def _lit(v: str) -> str:
    return "'" + v.replace("'", "''") + "'"


def gather(settings: Settings, since: datetime | None = None, task_type: str | None = None) -> dict[str, Any]:
    """Everything the report shows, as plain data (what `--format json` prints)."""
    where = []
    if since is not None:
        where.append(f"ts >= CAST({_lit(since.isoformat())} AS TIMESTAMPTZ)")
    if task_type:
        where.append(f"task_type = {_lit(task_type)}")
    cond = (" WHERE " + " AND ".join(where)) if where else ""
    span = _q(
        settings,
        f"SELECT min(ts) AS first, max(ts) AS last, count(*) AS n, avg(reward) AS mean FROM final_scores{cond}",
    )[0]
    width = bucket_width(span["first"], span["last"], 40)
    series = _q(
        settings,
        f"SELECT * FROM improvement_by(INTERVAL {width} SECOND)"
        + cond.replace("ts >=", "bucket >=")
        + " ORDER BY bucket",
    )
    lb_cond = f" WHERE task_type = {_lit(task_type)}" if task_type else ""
    leaderboard = _q(settings, f"SELECT * FROM operator_leaderboard{lb_cond}")
    # per operator, rewards learned here beside pseudo-rewards imported (`taoflow knowledge import`); `*`, as a file
    # landed before imports existed has no `imported` column
    evidence = [
        {"task_type": u["task_type"], "operator": u["operator"], "utility": u["utility"],
         "learned": u["n"] - (u.get("imported") or 0), "imported": u.get("imported") or 0}
        for u in _q(settings, f"SELECT * FROM utilities{lb_cond} ORDER BY task_type, operator")
    ]  # fmt: skip
    # multi-step sessions: the outcome of each operator's whole sessions (`session_leaderboard`)
    sessions = _q(settings, f"SELECT * FROM session_leaderboard{lb_cond}")
    rounds = _q(
        settings,
        "SELECT * FROM round_history"
        + (f" WHERE started_at >= CAST({_lit(since.isoformat())} AS TIMESTAMPTZ)" if since else ""),
    )
    events = _q(
        settings,
        "SELECT adapter, action, ts FROM adapters WHERE action IN ('published', 'promoted', "
        "'rolled_back')"
        + (f" AND ts >= CAST({_lit(since.isoformat())} AS TIMESTAMPTZ)" if since else "")
        + " ORDER BY ts",
    )
    # release decisions with the sequential test's evidence (serving/release.py): the gateway's promotions and
    # rollbacks carry n per side, means, the always-valid interval and the statistic in `metrics`
    decisions = _q(
        settings,
        "SELECT adapter, action, ts, reason, metrics FROM adapters WHERE action IN ('promoted', 'rolled_back')"
        + (f" AND ts >= CAST({_lit(since.isoformat())} AS TIMESTAMPTZ)" if since else "")
        + " ORDER BY ts",
    )
    for d in decisions:
        if isinstance(d.get("metrics"), str):
            d["metrics"] = json.loads(d["metrics"])
    health = {
        "freshness": _q(settings, "SELECT * FROM freshness"),
        "dead_letters": _q(settings, "SELECT * FROM dead_letter_rate"),
    }
    return {
        "generated_at": datetime.now(UTC).isoformat(),
        "since": since.isoformat() if since else None,
        "task_type": task_type,
        "bucket_seconds": width,
        "rewards": {"n": span["n"], "mean": span["mean"], "first": span["first"], "last": span["last"]},
        "improvement": series,
        "leaderboard": leaderboard,
        "evidence": evidence,
        "sessions": sessions,
        "rounds": rounds,
        "adapter_events": events,
        "release_decisions": decisions,
        "health": health,
    }


def trends(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Per task type: buckets, mean reward per bucket (all adapters), first vs last, and adapter markers."""
    buckets = sorted({str(r["bucket"]) for r in data["improvement"]})
    index = {b: i for i, b in enumerate(buckets)}
    width = timedelta(seconds=data["bucket_seconds"])
    out = []
    for task in sorted({r["task_type"] for r in data["improvement"]}):
        sums = [0.0] * len(buckets)
        counts = [0] * len(buckets)
        for r in data["improvement"]:
            if r["task_type"] == task:
                i = index[str(r["bucket"])]
                sums[i] += r["mean_reward"] * r["n"]
                counts[i] += r["n"]
        values = [s / c if c else None for s, c in zip(sums, counts, strict=True)]
        marks = [" "] * len(buckets)
        for ev in data["adapter_events"]:
            t = datetime.fromisoformat(str(ev["ts"]))
            for i, b in enumerate(buckets):
                start = datetime.fromisoformat(b)
                if start <= t < start + width or (i == len(buckets) - 1 and t >= start):
                    marks[i] = MARKS[ev["action"]]
                    break
        present = [v for v in values if v is not None]
        out.append(
            {
                "task_type": task,
                "values": values,
                "marks": "".join(marks),
                "first": present[0] if present else None,
                "last": present[-1] if present else None,
                "n": sum(counts),
            }
        )
    return out


def to_csv(data: dict[str, Any]) -> str:
    """The improvement series, one row per bucket x adapter x task type."""
    buf = io.StringIO()
    cols = ["bucket", "adapter", "task_type", "n", "mean_reward", "ci_low", "ci_high"]
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in data["improvement"]:
        w.writerow(r)
    return buf.getvalue()


def render(data: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    def show(table: Table) -> None:
        for column in table.columns:
            column.overflow = "fold"  # operator, adapter and round names are what users copy: wrapped, never cut
        console.print(table)

    r = data["rewards"]
    scope = f" for task type {data['task_type']}" if data["task_type"] else ""
    console.print(
        f"[bold]taoflow report[/]{scope}: {r['n'] or 0} rewarded interactions"
        + (f", mean reward {r['mean']:.3f}" if r["mean"] is not None else "")
        + (f", {r['first']} .. {r['last']}" if r["first"] else "")
    )
    if not r["n"]:
        console.print("No rewards yet: send interactions (SDK or gateway) with a stream worker running.")
    t = Table(
        title=f"Reward over time ({_human(data['bucket_seconds'])} buckets; ▲ published ★ promoted ▼ rolled back)"
    )
    for col in ("task type", "reward", "first", "last", "change", "n"):
        t.add_column(col)
    for tr in trends(data):
        change = "" if tr["first"] is None else f"{tr['last'] - tr['first']:+.3f}"
        t.add_row(
            tr["task_type"],
            sparkline(tr["values"]) + "\n" + tr["marks"],
            _f(tr["first"]),
            _f(tr["last"]),
            change,
            str(tr["n"]),
        )
    show(t)
    lb = Table(title="Operator leaderboard")
    for col in ("task type", "#", "operator", "utility", "n", "share", "reward", "last update"):
        lb.add_column(col)
    for row in data["leaderboard"]:
        lb.add_row(
            row["task_type"],
            str(row["rank"]),
            row["operator"],
            _f(row["utility"]),
            str(row["utility_n"] or 0),
            _pct(row["selection_share"]),
            _f(row["mean_reward"]),
            str(row["last_update"] or "-")[:19],
        )
    show(lb)
    if any(e["imported"] for e in data.get("evidence", [])):
        ev = Table(
            "task type",
            "operator",
            "utility",
            "learned here",
            "imported",
            title="Evidence per operator (rewards learned here; pseudo-rewards imported by taoflow knowledge)",
        )
        for e in data["evidence"]:
            ev.add_row(e["task_type"], e["operator"], _f(e["utility"]), str(e["learned"]), str(e["imported"]))
        show(ev)
    if data.get("sessions"):
        st = Table("task type", "operator", "adapter", "sessions", "steps (mean)", "reward [95% interval]", "duration",
                   title="Session outcomes per operator (multi-step sessions with session feedback)")  # fmt: skip
        for row in data["sessions"]:
            reward = f"{_f(row['mean_reward'])} [{_f(row['ci_low'])}, {_f(row['ci_high'])}]"
            duration = "-" if row["mean_duration_s"] is None else f"{row['mean_duration_s']:.1f} s"
            st.add_row(row["task_type"], row["operator"], row["adapter"], str(row["sessions"]),
                       _f(row["mean_steps"], 1), reward, duration)  # fmt: skip
        show(st)
    rt = Table(title="TAO rounds")
    for col in ("round", "decision", "prompts", "reward before", "after", "gain (lower bound)", "seconds", "adapter"):
        rt.add_column(col)
    for row in data["rounds"][-15:]:
        gain = "" if row["gain"] is None else f"{row['gain']:+.3f} ({row['gain_lower_bound']:+.3f})"
        rt.add_row(
            row["round_id"],
            row["decision"],
            str(row["prompts"] or "-"),
            _f(row["reward_before"]),
            _f(row["reward_after"]),
            gain,
            _f(row["seconds"], 1),
            row["adapter"] or "-",
        )
    show(rt)
    if data.get("release_decisions"):
        dt = Table("adapter", "decision", "when", "n (adapter / reference)", "mean reward", "difference [95% interval]",
                   title="Release decisions (sequential test on rewards)")  # fmt: skip
        for d in data["release_decisions"][-15:]:
            m = d.get("metrics") or {}
            has = "diff" in m
            dt.add_row(
                d["adapter"], d["action"], str(d["ts"])[:19],
                f"{m['n_challenger']:.0f} / {m['n_reference']:.0f}" if has else "-",
                f"{m['mean_challenger']:.3f} / {m['mean_reference']:.3f}" if has else "-",
                f"{m['diff']:+.3f} [{m['lower']:+.3f}, {m['upper']:+.3f}]" if has else (d.get("reason") or "-"),
            )  # fmt: skip
        show(dt)
    dl = ", ".join(
        f"{d['source_topic']}: {d['dead_letters']} ({_pct(d['rate'])})" for d in data["health"]["dead_letters"]
    )
    fresh = ", ".join(f"{f['table_name']} {_age(f['seconds_since_landing'])}" for f in data["health"]["freshness"])
    console.print(f"Dead letters: {dl or 'none'}. Last landed: {fresh}.")


def _f(v: Any, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _pct(v: Any) -> str:
    return "-" if v is None else f"{v:.0%}"


def _age(seconds: Any) -> str:
    return "never" if seconds is None else f"{seconds:.0f}s ago"


def _human(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"
