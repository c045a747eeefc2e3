"""One TAO round: select unlabeled prompts -> generate k candidates -> score -> RL update -> gate -> publish.

Every stage is recorded before it starts and after it ends, in the round's state file
(`<data_dir>/learner/rounds/<round_id>.json`, replaced atomically: the learner's own truth) and as a
`tao_rounds` row. Publishing is two-phase: the adapter is written under a staging name, renamed into
`adapters/<name>/`, and only then is the round committed in its state file; the AdapterEvent and the
`adapters` row follow. A process that dies anywhere leaves a round in state `running`; the next round
(or `taoflow learner` at start) marks it failed and removes whatever it staged or renamed but had not
committed, so no adapter is ever published half-way or published but unrecorded.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import json
import logging
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import product
from pathlib import Path
from typing import Any

from learners.exceptions import LearnerError
from learners.records import RecordSink
from learners.rewards.composite import CompositeScorer
from learners.rewards.registry import build_scorer
from schemas import AdapterEvent
from taoflow.settings import Settings

log = logging.getLogger(__name__)

STAGES = ("select", "generate", "score", "train", "gate", "publish")
TERMINAL = frozenset({"published", "gated_out", "skipped", "failed"})
PAUSE_ENV = "TAOFLOW_LEARNER_PAUSE_AT"  # test seam: park the round at a checkpoint so a test can kill it there


class _Metrics:
    """The learner's Prometheus metrics (served by `taoflow learner` when learner.metrics_port is set)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.rounds = Counter("taoflow_learner_rounds", "TAO rounds by outcome", ["status"], registry=self.registry)
        self.stage = Histogram(
            "taoflow_learner_stage_seconds",
            "Seconds per round stage",
            ["stage"],
            buckets=(0.1, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600),
            registry=self.registry,
        )
        self.gain = Gauge(
            "taoflow_learner_last_gain", "Held-out reward gain of the last gated round", registry=self.registry
        )
        self.tokens_per_s = Gauge(
            "taoflow_learner_generation_tokens_per_s", "Generation throughput, last round", registry=self.registry
        )


METRICS = _Metrics()


class Reporter:
    """Progress of a round; the CLI shows a bar per stage. The default logs stage changes."""

    def stage(self, name: str, total: int | None = None) -> None:
        log.info("round stage %s%s", name, f" ({total} items)" if total else "")

    def advance(self, n: int = 1) -> None:
        pass

    def done(self, name: str, seconds: float, note: str = "") -> None:
        log.info("round stage %s done in %.1fs %s", name, seconds, note)


@dataclass
class RoundResult:
    round_id: str
    status: str
    adapter: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None


# ---------------------------------------------------------------------------------------------------------------
# files: the learner directory, atomic writes, the single-round lock


def learner_dir(settings: Settings) -> Path:
    return settings.core.data_dir / "learner"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    """Write `doc` to `path` so that a crash leaves the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(json.dumps(doc, indent=1, default=str).encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def round_lock(settings: Settings) -> Iterator[None]:
    """Only one round at a time per data directory, across processes (`tao run` and `learner` alike)."""
    path = learner_dir(settings) / "round.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LearnerError(f"another TAO round is running on {settings.core.data_dir}; try again later") from None
        yield
    finally:
        os.close(fd)


def _checkpoint(settings: Settings, point: str) -> None:
    if os.environ.get(PAUSE_ENV) == point:
        (learner_dir(settings) / "paused-at").write_text(point)
        while True:  # parked until killed
            time.sleep(1)


# ---------------------------------------------------------------------------------------------------------------
# round state: the state file, mirrored into tao_rounds


class RoundState:
    def __init__(self, settings: Settings, sink: RecordSink, doc: dict[str, Any]) -> None:
        self.settings = settings
        self.sink = sink
        self.doc = doc

    @property
    def path(self) -> Path:
        return learner_dir(self.settings) / "rounds" / f"{self.doc['round_id']}.json"

    def save(self, **changes: Any) -> None:
        self.doc.update(changes)
        self.doc["seq"] = int(self.doc.get("seq", 0)) + 1
        write_json_atomic(self.path, self.doc)
        self.sink.write("tao_rounds", [self.row()])

    def row(self) -> dict[str, Any]:
        d = self.doc
        return {
            "round_id": d["round_id"],
            "status": d["status"],
            "stage": d.get("stage"),
            "started_at": d["started_at"],
            "finished_at": d.get("finished_at"),
            "base_model": d["base_model"],
            "parent_adapter": d.get("parent_adapter"),
            "adapter": d.get("adapter"),
            "mode": d["mode"],
            "k": d["k"],
            "window_start": d.get("window_start"),
            "window_end": d.get("window_end"),
            "prompts": d.get("prompts"),
            "heldout": d.get("heldout"),
            "timings": d.get("timings", {}),
            "metrics": d.get("metrics", {}),
            "error": d.get("error"),
            "seq": d["seq"],
        }


def load_rounds(settings: Settings) -> list[dict[str, Any]]:
    """Every round's state document, oldest first."""
    out = []
    for path in sorted((learner_dir(settings) / "rounds").glob("*.json")):
        with contextlib.suppress(ValueError, OSError):
            out.append(json.loads(path.read_text()))
    return out


def current_adapter(settings: Settings) -> dict[str, Any] | None:
    """The adapter the last committed round published (training continues from it), if any."""
    path = learner_dir(settings) / "current.json"
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    if not (settings.core.adapters_dir / doc["adapter"] / "manifest.json").exists():
        log.warning(
            "current adapter %s is missing from %s; training starts from the base",
            doc["adapter"],
            settings.core.adapters_dir,
        )
        return None
    return doc


def recover(settings: Settings, sink: RecordSink) -> list[str]:
    """Settle rounds a dead process left `running` (call with the round lock held). Returns their ids."""
    settled = []
    for doc in load_rounds(settings):
        if doc.get("status") in TERMINAL:
            continue
        state = RoundState(settings, sink, doc)
        name = doc.get("adapter_name")
        if doc.get("committed") and name:
            _announce(settings, sink, state)  # committed before the crash: finish recording it (idempotent)
            log.warning("round %s had committed adapter %s; its records are completed now", doc["round_id"], name)
        else:
            if name:
                for leftover in (_staging_dir(settings, name), settings.core.adapters_dir / name):
                    shutil.rmtree(leftover, ignore_errors=True)
            stage = doc.get("stage") or "start"
            state.save(
                status="failed",
                finished_at=_now(),
                adapter=None,
                error=f"interrupted during {stage}: the process died before the round finished",
            )
            log.warning("round %s was interrupted during %s; marked failed", doc["round_id"], stage)
        shutil.rmtree(learner_dir(settings) / "rounds" / doc["round_id"], ignore_errors=True)
        settled.append(doc["round_id"])
    return settled


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _staging_dir(settings: Settings, name: str) -> Path:
    return settings.core.adapters_dir / f".staging-{name}"


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def is_heldout(prompt_hash: str, fraction: float) -> bool:
    """A stable split by content hash: a prompt stays on its side in every round.

    >>> is_heldout("0" * 64, 0.2), is_heldout("f" * 64, 0.2)
    (True, False)
    """
    return int(prompt_hash[:8], 16) % 10_000 < fraction * 10_000


def paired_bootstrap(diffs: list[float], confidence: float, seed: int, resamples: int = 4000) -> tuple[float, float]:
    """Mean of paired differences and its one-sided lower confidence bound (percentile bootstrap).

    >>> paired_bootstrap([0.0, 0.0, 0.0], 0.9, 0)
    (0.0, 0.0)
    >>> m, lcb = paired_bootstrap([1.0] * 8 + [0.0] * 2, 0.9, 0); m, lcb > 0.5
    (0.8, True)
    """
    n = len(diffs)
    if n == 0:
        return 0.0, 0.0
    mean = sum(diffs) / n
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return mean, means[int((1 - confidence) * resamples)]


def default_base_model(settings: Settings) -> str:
    """`TAOFLOW_BASE_MODEL`, or a tiny model built locally under the data directory (no hub needed)."""
    if settings.core.base_model:
        return settings.core.base_model
    path = settings.core.data_dir / "models" / "tiny"
    if not (path / "config.json").exists():
        from learners.models import make_tiny

        shutil.rmtree(path, ignore_errors=True)
        log.info("TAOFLOW_BASE_MODEL is unset: building a tiny model at %s", path)
        make_tiny(path)
    return str(path)


def check_model(name_or_path: str) -> None:
    """Fail early, with the fix, when the base model cannot be found (reading its config is cheap)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise LearnerError(
            f"cannot load model {name_or_path!r}: {str(exc).splitlines()[0]}. Set TAOFLOW_BASE_MODEL to a local model "
            "directory (e.g. one made by `taoflow models make-tiny DIR`) or a name already in the local cache"
        ) from None


def build_round_scorer(settings: Settings) -> CompositeScorer:
    specs = settings.learner.scorers or settings.stream.scorers
    if not specs:
        raise LearnerError(
            "no scorers configured: set TAOFLOW_LEARNER_SCORERS (or TAOFLOW_STREAM_SCORERS), e.g. "
            '\'[{"type": "arithmetic"}]\'; a round needs a reward to learn from'
        )
    return CompositeScorer([build_scorer(s) for s in specs])


def _digest(files: list[Path]) -> tuple[str, dict[str, str]]:
    per = {}
    total = hashlib.sha256()
    for f in sorted(files):
        h = hashlib.sha256(f.read_bytes()).hexdigest()
        per[f.name] = h
        total.update(f"{f.name} {h}\n".encode())
    return total.hexdigest(), per


# ---------------------------------------------------------------------------------------------------------------
# the round


@dataclass
class Prompt:
    hash: str
    prompt: Any  # text, or chat messages
    task_type: str
    metadata: dict[str, Any]
    heldout: bool
    ts: str | None = None


class Round:
    """The stages of one round; `run()` drives them and records every transition."""

    def __init__(self, settings: Settings, sink: RecordSink, reporter: Reporter | None = None) -> None:
        self.settings = settings
        self.cfg = settings.learner
        self.sink = sink
        self.reporter = reporter or Reporter()
        from learners.generation import resolve_device, resolve_dtype

        self.device = resolve_device(self.cfg.device)
        self.dtype = resolve_dtype(self.cfg.dtype, self.device)
        self.scorer = build_round_scorer(settings)
        self.base_model = default_base_model(settings)
        check_model(self.base_model)
        parent = current_adapter(settings)
        self.parent_name = parent["adapter"] if parent else None
        self.parent = settings.core.adapters_dir / parent["adapter"] if parent else None
        rid = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        self.state = RoundState(
            settings,
            sink,
            {
                "round_id": rid,
                "status": "running",
                "stage": None,
                "started_at": _now(),
                "base_model": self.base_model,
                "parent_adapter": self.parent_name,
                "mode": self.cfg.mode,
                "k": self.cfg.k,
                "timings": {},
                "metrics": {},
                "device": self.device,
                "records_via": sink.via,
            },
        )
        self.work = learner_dir(settings) / "rounds" / rid
        self.seed = self.cfg.seed + len(load_rounds(settings))  # repeatable, and different every round
        self.metrics: dict[str, float] = {}

    @property
    def round_id(self) -> str:
        return str(self.state.doc["round_id"])

    # -- driver -----------------------------------------------------------------------------------------------

    def run(self) -> RoundResult:
        result = self._run()
        METRICS.rounds.labels(result.status).inc()
        if "gain" in self.metrics:
            METRICS.gain.set(self.metrics["gain"])
        if self.metrics.get("generation_tokens_per_s"):
            METRICS.tokens_per_s.set(self.metrics["generation_tokens_per_s"])
        return result

    def _run(self) -> RoundResult:
        doc = self.state.doc
        self.state.save()
        try:
            prompts = self._stage("select", self.select)
            train = [p for p in prompts if not p.heldout]
            heldout = [p for p in prompts if p.heldout]
            self.state.save(prompts=len(train), heldout=len(heldout))
            if not train or not heldout:
                return self._end(
                    "skipped",
                    f"too few prompts: {len(train)} to train on, {len(heldout)} held out (the gate needs both)",
                )
            candidates = self._stage("generate", lambda: self.generate(train))
            informative = self._stage("score", lambda: self.score(train, candidates))
            if not informative:
                return self._end("skipped", f"no signal: the {self.cfg.k} candidates of every prompt scored the same")
            self.work.mkdir(parents=True, exist_ok=True)
            adapter_dir = self.work / "adapter"
            self._stage("train", lambda: self.train(informative, adapter_dir))
            passed = self._stage("gate", lambda: self.gate(heldout, adapter_dir))
            if not passed:
                m = self.metrics
                return self._end(
                    "gated_out",
                    f"held-out reward {m['heldout_reward_new']:.3f} vs current "
                    f"{m['heldout_reward_current']:.3f}: gain {m['gain']:+.3f}, lower "
                    f"{self.cfg.gate_confidence:.0%} bound {m['gain_lcb']:+.3f} is not above the margin "
                    f"{self.cfg.gate_margin:+.3f}",
                )
            self._stage("publish", lambda: self.publish(adapter_dir))
            return RoundResult(self.round_id, "published", doc.get("adapter"), self.metrics, doc["timings"])
        except Exception as exc:
            log.exception("round %s failed", self.round_id)
            self.state.save(
                status="failed", finished_at=_now(), error=f"{type(exc).__name__}: {exc}", metrics=self.metrics
            )
            if doc.get("adapter_name") and not doc.get("committed"):
                shutil.rmtree(_staging_dir(self.settings, doc["adapter_name"]), ignore_errors=True)
                shutil.rmtree(self.settings.core.adapters_dir / doc["adapter_name"], ignore_errors=True)
            return RoundResult(self.round_id, "failed", None, self.metrics, doc["timings"], str(exc))
        finally:
            shutil.rmtree(self.work, ignore_errors=True)

    def _stage(self, name: str, fn: Callable[[], Any]) -> Any:
        self.state.save(stage=name)
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
        self.state.doc["timings"][name] = round(seconds, 3)
        METRICS.stage.labels(name).observe(seconds)
        self.state.save(metrics=self.metrics)
        self.reporter.done(name, seconds)
        return result

    def _end(self, status: str, reason: str) -> RoundResult:
        log.info("round %s %s: %s", self.round_id, status, reason)
        self.state.save(status=status, finished_at=_now(), error=reason, metrics=self.metrics)
        return RoundResult(self.round_id, status, None, self.metrics, self.state.doc["timings"], reason)

    # -- stages -----------------------------------------------------------------------------------------------

    def select(self) -> list[Prompt]:
        """Distinct prompts (by content hash) from `interactions`, newest first; inputs only."""
        from streams.exceptions import QueryError
        from streams.sqlapi import query

        self.reporter.stage("select")
        where = []
        if self.cfg.task_types:
            where.append("task_type IN (" + ", ".join(_sql_str(t) for t in self.cfg.task_types) + ")")
        if self.cfg.window_hours:
            where.append(f"ts >= now() - INTERVAL {int(self.cfg.window_hours * 3600)} SECOND")
        sql = (
            "SELECT prompt_hash, arg_max(prompt, ts), bool_or(prompt_is_chat), arg_max(task_type, ts), "
            "arg_max(CAST(metadata AS VARCHAR), ts), CAST(max(ts) AS VARCHAR) FROM interactions "
            + (f"WHERE {' AND '.join(where)} " if where else "")
            + f"GROUP BY prompt_hash ORDER BY max(ts) DESC, prompt_hash LIMIT {self.cfg.max_prompts}"
        )
        try:
            rows = query(sql, self.settings).rows
        except QueryError as exc:
            raise LearnerError(f"cannot read prompts: {exc}") from None
        prompts = [
            Prompt(
                h,
                json.loads(text) if chat else text,
                task,
                json.loads(meta or "{}") or {},
                is_heldout(h, self.cfg.heldout_fraction),
                ts,
            )
            for h, text, chat, task, meta, ts in rows
        ]
        times = sorted(p.ts for p in prompts if p.ts)
        if times:
            self.state.doc.update(window_start=times[0], window_end=times[-1])
        self.metrics["prompts_selected"] = len(prompts)
        _checkpoint(self.settings, "select")
        return prompts

    def _policy(self, adapter: Path | None) -> Any:
        from learners.generation import TransformersGenerator, VllmGenerator, load_policy

        if self.cfg.backend == "vllm":
            dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
            return VllmGenerator(
                self.base_model, adapter=adapter, max_lora_rank=max(8, self.cfg.lora_r), dtype=dtype, seed=self.seed
            )
        model, tok = load_policy(self.base_model, adapter, device=self.device, dtype=self.dtype)
        return TransformersGenerator(model, tok, batch_size=self.cfg.generation_batch_size, seed=self.seed)

    def generate(self, prompts: list[Prompt]) -> dict[str, list[dict[str, Any]]]:
        """k candidates per prompt, spread over the (strategy, temperature) combinations."""
        gen = self._policy(self.parent)
        combos = list(product(self.cfg.strategies, self.cfg.temperatures))
        counts = [self.cfg.k // len(combos) + (1 if i < self.cfg.k % len(combos) else 0) for i in range(len(combos))]
        self.reporter.stage("generate", len(prompts) * sum(1 for c in counts if c))
        out: dict[str, list[dict[str, Any]]] = {p.hash: [] for p in prompts}
        from learners.generation import render

        for (strategy, temp), n in zip(combos, counts, strict=True):
            if not n:
                continue
            texts = [render(p.prompt, gen.tokenizer, strategy) for p in prompts]
            results = gen.generate(
                texts, n=n, temperature=temp, max_new_tokens=self.cfg.max_new_tokens, progress=self.reporter.advance
            )
            for p, responses in zip(prompts, results, strict=True):
                for r in responses:
                    out[p.hash].append({"strategy": strategy, "temperature": temp, "response": r})
        self.metrics["generated_tokens"] = float(gen.tokens)
        self.metrics["generation_tokens_per_s"] = round(gen.tokens / gen.seconds, 1) if gen.seconds else 0.0
        del gen
        gc.collect()
        _checkpoint(self.settings, "generate")
        return out

    def score(self, prompts: list[Prompt], candidates: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """Score every candidate with the round's scorers; keep prompts whose candidates disagree."""
        self.reporter.stage("score", len(prompts))
        flat = [(p, c) for p in prompts for c in candidates[p.hash]]
        parts = self.scorer.rule_parts(
            [c["response"] for _, c in flat],
            prompts=[p.prompt for p, _ in flat],
            task_types=[p.task_type for p, _ in flat],
            metadata=[p.metadata for p, _ in flat],
        )
        rows = []
        for (_, c), part in zip(flat, parts, strict=True):
            c["reward"] = self.scorer.compose(part).reward
            c["parts"] = part
        informative, uniform, best, mean, n_scored = [], 0, [], [], 0
        for p in prompts:
            cands = candidates[p.hash]
            for i, c in enumerate(cands):
                rows.append(
                    {
                        "round_id": self.round_id,
                        "prompt_hash": p.hash,
                        "idx": i,
                        "task_type": p.task_type,
                        "strategy": c["strategy"],
                        "temperature": c["temperature"],
                        "prompt": p.prompt if isinstance(p.prompt, str) else json.dumps(p.prompt),
                        "response": c["response"],
                        "reward": c["reward"],
                        "parts": c["parts"],
                    }
                )
            rewards = [c["reward"] for c in cands if c["reward"] is not None]
            if rewards:
                n_scored += 1
                best.append(max(rewards))
                mean.append(sum(rewards) / len(rewards))
            if len(rewards) < 2 or max(rewards) == min(rewards):
                uniform += 1
                continue
            ranked = sorted((c for c in cands if c["reward"] is not None), key=lambda c: c["reward"])
            informative.append(
                {
                    "hash": p.hash,
                    "text": p.prompt,
                    "task_type": p.task_type,
                    "metadata": p.metadata,
                    "chosen": ranked[-1]["response"],
                    "rejected": ranked[0]["response"],
                }
            )
            self.reporter.advance(1)
        for start in range(0, len(rows), 2000):
            self.sink.write("tao_candidates", rows[start : start + 2000])
        self.metrics.update(
            candidates=float(len(rows)),
            prompts_informative=float(len(informative)),
            prompts_uniform_skipped=float(uniform),
            candidate_reward_mean=round(sum(mean) / len(mean), 4) if mean else 0.0,
            best_of_k_reward=round(sum(best) / len(best), 4) if best else 0.0,
        )
        if uniform:
            log.info(
                "%d of %d prompts carry no signal (all %d candidates scored the same); skipped",
                uniform,
                len(prompts),
                self.cfg.k,
            )
        _checkpoint(self.settings, "score")
        return informative

    def train(self, informative: list[dict[str, Any]], out: Path) -> None:
        from learners import training

        self.reporter.stage("train", self.cfg.steps)
        if self.cfg.mode == "grpo":
            metrics = training.train_grpo(
                self.cfg,
                base_model=self.base_model,
                parent=self.parent,
                scorer=self.scorer,
                device=self.device,
                dtype=self.dtype,
                out=out,
                temperature=max(self.cfg.temperatures),
                seed=self.seed,
                progress=self.reporter.advance,
                rows=[{"text": r["text"], "task_type": r["task_type"], "metadata": r["metadata"]} for r in informative],
            )
        else:
            from transformers import AutoTokenizer

            from learners.generation import render

            tok = AutoTokenizer.from_pretrained(self.base_model)
            pairs = [
                {"prompt": render(r["text"], tok), "chosen": r["chosen"], "rejected": r["rejected"]}
                for r in informative
            ]
            metrics = training.train_offline(
                self.cfg,
                base_model=self.base_model,
                parent=self.parent,
                pairs=pairs,
                device=self.device,
                dtype=self.dtype,
                out=out,
                seed=self.seed,
                progress=self.reporter.advance,
            )
        self.metrics.update(metrics)
        gc.collect()
        _checkpoint(self.settings, "train")

    def evaluate(self, prompts: list[Prompt], adapter: Path | None) -> list[float]:
        """Mean reward per held-out prompt for a policy (greedy, or `gate_samples` samples)."""
        from learners.generation import render

        gen = self._policy(adapter)
        greedy = self.cfg.gate_samples == 1
        texts = [render(p.prompt, gen.tokenizer) for p in prompts]
        results = gen.generate(
            texts,
            n=self.cfg.gate_samples,
            temperature=self.cfg.temperatures[0],
            max_new_tokens=self.cfg.max_new_tokens,
            greedy=greedy,
            progress=self.reporter.advance,
        )
        del gen
        gc.collect()
        flat = [(p, r) for p, rs in zip(prompts, results, strict=True) for r in rs]
        parts = self.scorer.rule_parts(
            [r for _, r in flat],
            prompts=[p.prompt for p, _ in flat],
            task_types=[p.task_type for p, _ in flat],
            metadata=[p.metadata for p, _ in flat],
        )
        rewards = [self.scorer.compose(x).reward or 0.0 for x in parts]
        per = len(results[0]) if results else 1
        return [sum(rewards[i * per : (i + 1) * per]) / per for i in range(len(prompts))]

    def gate(self, heldout: list[Prompt], adapter_dir: Path) -> bool:
        """Publish only if the held-out reward gain's lower confidence bound clears the margin."""
        self.reporter.stage("gate", 2 * len(heldout))
        current = self.evaluate(heldout, self.parent)
        new = self.evaluate(heldout, adapter_dir)
        gain, lcb = paired_bootstrap(
            [b - a for a, b in zip(current, new, strict=True)], self.cfg.gate_confidence, self.seed
        )
        self.metrics.update(
            heldout_reward_current=round(sum(current) / len(current), 4),
            heldout_reward_new=round(sum(new) / len(new), 4),
            gain=round(gain, 4),
            gain_lcb=round(lcb, 4),
        )
        _checkpoint(self.settings, "gate")
        return lcb > self.cfg.gate_margin

    def publish(self, adapter_dir: Path) -> None:
        """Stage, rename into place, commit in the state file, then announce (see the module docstring)."""
        self.reporter.stage("publish")
        name = f"tao-{self.round_id}"
        final = self.settings.core.adapters_dir / name
        staging = _staging_dir(self.settings, name)
        self.state.save(adapter_name=name)  # recovery knows what to clean up from here on
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(adapter_dir, staging)
        files = [f for f in staging.iterdir() if f.is_file()]
        sha, per_file = _digest(files)
        manifest = {
            "adapter": name,
            "base_model": self.base_model,
            "round_id": self.round_id,
            "parent_adapter": self.parent_name,
            "mode": self.cfg.mode,
            "k": self.cfg.k,
            "window_start": self.state.doc.get("window_start"),
            "window_end": self.state.doc.get("window_end"),
            "metrics": self.metrics,
            "sha256": sha,
            "files": per_file,
            "created_at": _now(),
        }
        for f in files:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        write_json_atomic(staging / "manifest.json", manifest)
        _checkpoint(self.settings, "publish:staged")
        os.replace(staging, final)
        _fsync_dir(final.parent)
        _checkpoint(self.settings, "publish:renamed")
        self.state.doc.update(adapter=name, sha256=sha, path=str(final))
        self.state.save(committed=True, committed_at=_now())  # the commit point
        _announce(self.settings, self.sink, self.state)


def _announce(settings: Settings, sink: RecordSink, state: RoundState) -> None:
    """The AdapterEvent, the `adapters` row and the round's final row (all idempotent by key)."""
    d = state.doc
    name = d["adapter_name"]
    write_json_atomic(learner_dir(settings) / "current.json", {"adapter": name, "round_id": d["round_id"]})
    metrics = {k: float(v) for k, v in d.get("metrics", {}).items() if isinstance(v, int | float)}
    event = AdapterEvent(
        adapter=name,
        action="published",
        ts=datetime.fromisoformat(d["committed_at"]),
        base_model=d["base_model"],
        path=str(settings.core.adapters_dir / name),
        round_id=d["round_id"],
        sha256=d["sha256"],
        metrics=metrics,
    )
    sink.adapter_event(event)
    state.save(status="published", adapter=name, finished_at=d.get("finished_at") or _now())


def run_round(settings: Settings, reporter: Reporter | None = None, *, prefer_kafka: bool = True) -> RoundResult:
    """One round now: take the lock, settle interrupted rounds, run. Raises LearnerError for user mistakes."""
    with round_lock(settings):
        sink = RecordSink(settings, prefer_kafka=prefer_kafka)
        try:
            recover(settings, sink)
            return Round(settings, sink, reporter).run()
        finally:
            sink.close()
