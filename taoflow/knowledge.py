"""Portable knowledge: export which strategy works for which task type, and seed another deployment with it.

Export reads the landed utilities (`streams.sqlapi.query`) and the configured operators into a `KnowledgeFile`.
Import maps each `<strategy>@<adapter>` learned elsewhere onto `<strategy>@base` here (or another adapter) and sends
one seed record per task type and operator to the stream worker's rewards topic. The worker owns the utilities, so
it folds the seed in (`streams.rewards`): `evidence` pseudo-rewards of the exported (bias-corrected) utility,
applied once per export id, and never over rewards this deployment has learned itself. The discounted evidence
keeps the seed weak enough that fresh rewards here soon decide.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from schemas.base import format_errors
from schemas.knowledge import KNOWLEDGE_FORMAT, KNOWLEDGE_VERSION, KnowledgeFile, LearnedOn, LearnedUtility, Strategy
from serving.router import BASE, Router, operator_name
from streams.outbox import BatchProducer, Outbox
from streams.sqlapi import query
from streams.topics import REWARDS_INTERNAL
from taoflow.exceptions import TaoflowError
from taoflow.settings import OperatorSpec, Settings

log = logging.getLogger(__name__)

_DEFINITION = ("name", "system_prompt", "template")  # OperatorSpec's fields that Strategy names; the rest: parameters
_SEND_TIMEOUT_S = 30.0


class KnowledgeError(TaoflowError):
    """A knowledge file that cannot be read or imported; the message says why and what to do."""


# -- export -------------------------------------------------------------------------------------------------------


def strategy_of(spec: OperatorSpec) -> Strategy:
    """An operator's definition as the file carries it."""
    data = spec.model_dump()
    return Strategy(**{k: data[k] for k in _DEFINITION},
                    parameters={k: v for k, v in data.items() if k not in _DEFINITION})  # fmt: skip


def export_knowledge(settings: Settings) -> KnowledgeFile:
    """The configured operators and every landed utility, with the base model and ACT-R parameters they were
    learned with."""
    learned = []
    for row in query("SELECT * FROM utilities ORDER BY task_type, operator", settings).as_dicts():
        strategy, sep, adapter = row["operator"].rpartition("@")
        if not sep:  # an SDK producer's own operator name: no adapter in it
            strategy, adapter = row["operator"], BASE
        imported = row.get("imported") or 0  # a file landed before imports existed has no such column
        try:
            learned.append(LearnedUtility(
                task_type=row["task_type"], strategy=strategy, adapter=None if adapter == BASE else adapter,
                utility=row["utility"], n=row["n"] - imported, imported=imported, last_update=row["ts"],
            ))  # fmt: skip
        except ValidationError as exc:
            log.warning("utility of %s/%s not exported: %s", row["task_type"], row["operator"],
                        format_errors(LearnedUtility, exc))  # fmt: skip
    return KnowledgeFile(
        export_id=uuid.uuid4().hex,
        exported_at=datetime.now(UTC),
        learned_on=LearnedOn(
            base_model=settings.core.base_model,
            alpha=settings.stream.alpha,
            initial_utility=settings.stream.initial_utility,
        ),
        operators={task: [strategy_of(s) for s in specs] for task, specs in settings.serve.operators.items()},
        utilities=learned,
    )


def dumps(doc: KnowledgeFile) -> str:
    return json.dumps(doc.model_dump(mode="json"), indent=2) + "\n"


def load(path: Path) -> KnowledgeFile:
    """Read and validate a knowledge file; every problem is a KnowledgeError of one line."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise KnowledgeError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise KnowledgeError(f"{path} is not valid JSON{where}; give a file `taoflow knowledge export` wrote") from None
    if not isinstance(data, dict) or data.get("format") != KNOWLEDGE_FORMAT:
        raise KnowledgeError(f'{path} is not a taoflow knowledge file (no "format": "{KNOWLEDGE_FORMAT}"); give a '
                             "file `taoflow knowledge export` wrote")  # fmt: skip
    version = data.get("version")
    if version != KNOWLEDGE_VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > KNOWLEDGE_VERSION
        hint = "upgrade taoflow to import it" if newer else "export it again with this taoflow"
        raise KnowledgeError(f"{path} has knowledge format version {version!r}; this taoflow reads version "
                             f"{KNOWLEDGE_VERSION} only: {hint}")  # fmt: skip
    try:
        return KnowledgeFile.model_validate(data)
    except ValidationError as exc:
        raise KnowledgeError(f"{path}: {format_errors(KnowledgeFile, exc)}") from None


# -- import -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seed:
    """What one target operator starts from: `evidence` pseudo-rewards of `value`."""

    task_type: str
    operator: str  # here: "<strategy>@<adapter or base>"
    value: float  # the exported utilities, bias-corrected and evidence-weighted, in reward units
    evidence: int  # the exported reward count, discounted
    exported_n: int  # the exported reward count (learned + imported there)
    sources: tuple[str, ...]  # the exported operators it comes from

    def record(self, export_id: str, ts: float) -> tuple[bytes, bytes]:
        """The rewards-topic record (`streams.rewards`): keyed like rewards; (src, pos) makes it count once."""
        value = {"seed": True, "r": self.value, "n": self.evidence, "src": f"import:{export_id}", "pos": 0,
                 "iid": None, "ts": ts}  # fmt: skip
        return f"{self.task_type}/{self.operator}".encode(), orjson.dumps(value)


@dataclass
class ImportPlan:
    """What an import does here, before anything is sent."""

    doc: KnowledgeFile
    target_adapter: str | None
    discount: float
    seeds: list[Seed] = field(default_factory=list)
    missing: dict[str, list[Strategy]] = field(default_factory=dict)  # learned there, not configured here
    differing: list[str] = field(default_factory=list)  # configured here under the same name, defined otherwise

    def lines(self, base_model: str | None) -> list[str]:
        """A human summary: where the knowledge was learned, what it seeds, what it cannot."""
        src, when = self.doc.learned_on, self.doc.exported_at.astimezone(UTC)
        out = [f"knowledge {self.doc.export_id} exported {when:%Y-%m-%d %H:%M} UTC, learned on base "
               f"model {src.base_model or '(default)'}; importing onto {base_model or '(default)'}, adapter "
               f"{self.target_adapter or BASE}, evidence discount {self.discount:g}"]  # fmt: skip
        for s in self.seeds:
            out.append(f"  {s.task_type}/{s.operator}: utility {s.value:.3f} from {', '.join(s.sources)}; "
                       f"{s.exported_n} rewards there -> {s.evidence} imported here")  # fmt: skip
        for task, strategies in sorted(self.missing.items()):
            out.append(f"  not configured here for task type {task!r} (not imported): "
                       + ", ".join(s.name for s in strategies))  # fmt: skip
        out.extend(f"  warning: {d}" for d in self.differing)
        return out

    def toml(self, settings: Settings) -> str:
        """`[[serve.operators.<task>]]` tables declaring the missing strategies beside those configured here, from
        their exported definitions (the whole list per task type: a listed task type no longer falls back to
        'default')."""
        parts = []
        for task, strategies in sorted(self.missing.items()):
            for s in [*map(strategy_of, _router(settings).strategies(task)), *strategies]:
                lines = [f"[[serve.operators.{json.dumps(task)}]]", f"name = {json.dumps(s.name)}"]
                fields = {"system_prompt": s.system_prompt, "template": s.template, **s.parameters}
                lines += [f"{k} = {_toml_value(v)}" for k, v in fields.items() if v is not None]
                parts.append("\n".join(lines))
        return "\n\n".join(parts) + ("\n" if parts else "")


def _toml_value(v: Any) -> str:
    # JSON's string escapes and number forms are TOML's too; booleans are spelled the same
    return json.dumps(v)


def _router(settings: Settings) -> Router:
    """A router on these settings, asked only which strategies serve a task type (its fallback rule is the rule)."""
    return Router(settings.serve, initial_utility=settings.stream.initial_utility, noise_s=0.0,
                  alpha=settings.stream.alpha)  # fmt: skip


def plan_import(
    doc: KnowledgeFile, settings: Settings, *, adapter: str | None = None, discount: float | None = None
) -> ImportPlan:
    """Map the exported utilities onto this deployment's operators.

    Every adapter of a strategy learned there seeds `<strategy>@<adapter>` here (`base` unless given): their
    utilities, bias-corrected for the start value they were learned from, are averaged by reward count, and the
    count times `discount` (`TAOFLOW_STREAM_KNOWLEDGE_DISCOUNT`) is the evidence imported. Strategies not
    configured here are listed, not seeded."""
    discount = settings.stream.knowledge_discount if discount is None else discount
    if not 0 < discount <= 1:
        raise KnowledgeError(f"evidence discount {discount:g} must be in (0, 1]: the share of exported rewards kept")
    target = None if adapter in (None, BASE) else adapter
    if target is not None and ("@" in target or "/" in target or not target):
        raise KnowledgeError(f"adapter {target!r} is not an adapter name (no '@' or '/'); give one the gateway serves")
    plan = ImportPlan(doc=doc, target_adapter=target, discount=discount)
    src = doc.learned_on
    there = Router(None, initial_utility=src.initial_utility, noise_s=0.0, alpha=src.alpha)
    here = _router(settings)
    groups: dict[tuple[str, str], list[LearnedUtility]] = defaultdict(list)
    for u in doc.utilities:
        if u.n + u.imported > 0:
            groups[(u.task_type, u.strategy)].append(u)
    for (task, strategy), rows in sorted(groups.items()):
        configured = {s.name: s for s in here.strategies(task)}
        definition = _definition(doc, task, strategy)
        if strategy not in configured:
            plan.missing.setdefault(task, []).append(definition)
            continue
        if strategy_of(configured[strategy]) != definition:
            plan.differing.append(f"{task}/{strategy} is defined differently here than where it was learned: its "
                                  "imported utility describes the exported definition")  # fmt: skip
        total = sum(u.n + u.imported for u in rows)
        value = sum(there.unbiased(u.utility, u.n + u.imported) * (u.n + u.imported) for u in rows) / total
        plan.seeds.append(Seed(
            task_type=task, operator=operator_name(strategy, target), value=value,
            evidence=max(1, round(total * discount)), exported_n=total,
            sources=tuple(f"{u.strategy}@{u.adapter or BASE}" for u in rows),
        ))  # fmt: skip
    return plan


def _definition(doc: KnowledgeFile, task: str, strategy: str) -> Strategy:
    for s in doc.operators.get(task) or doc.operators.get("default") or []:
        if s.name == strategy:
            return s
    return Strategy(name=strategy)  # learned there without a declaration (an SDK producer's operator)


def seed_records(plan: ImportPlan, ts: float | None = None) -> list[tuple[bytes, bytes]]:
    """The records an import sends, in plan order."""
    when = time.time() if ts is None else ts
    return [s.record(plan.doc.export_id, when) for s in plan.seeds]


def send(settings: Settings, records: list[tuple[bytes, bytes]]) -> None:
    """Send seed records to the worker's rewards topic and wait for the broker's acknowledgement."""
    if records:
        asyncio.run(_send(settings, records))


async def _send(settings: Settings, records: list[tuple[bytes, bytes]]) -> None:
    from aiokafka.errors import KafkaError

    from taoflow.broker import reachable

    where = settings.bootstrap
    if not reachable(where):
        raise KnowledgeError(f"Kafka at {where} is not reachable: start the deployment (`taoflow up`, or point "
                             "TAOFLOW_KAFKA_BOOTSTRAP at it) and import again")  # fmt: skip
    out = Outbox({}, settings.stream.max_record_bytes)
    for key, value in records:
        out.add(REWARDS_INTERNAL, key, value)
    producer = BatchProducer(where, settings.kafka.security_kwargs())
    try:
        await asyncio.wait_for(producer.send(out), _SEND_TIMEOUT_S)
    except (KafkaError, TimeoutError) as exc:
        raise KnowledgeError(f"could not send the import to Kafka at {where} ({type(exc).__name__}: {exc}); "
                             "importing again is safe: each seed counts once") from None  # fmt: skip
    finally:
        await producer.stop()
