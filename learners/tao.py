"""One TAO round: select unlabeled prompts -> generate k candidates -> score -> RL update -> gate -> publish.

Every stage is recorded before it starts and after it ends, in the round's state file
(`<data_dir>/learner/rounds/<round_id>.json`, replaced atomically: the learner's own truth) and as a
`tao_rounds` row. Publishing is two-phase: the adapter is written under a staging name, renamed into
`adapters/<name>/`, and only then is the round committed in its state file; the AdapterEvent and the
`adapters` row follow. A process that dies anywhere leaves a round in state `running`; the next round
(or `taoflow learner` at start) marks it failed and removes whatever it staged or renamed but had not
committed, so no adapter is ever published half-way or published but unrecorded (`learners.recovery`, which also
announces a round that committed before a crash). Stages, metrics and progress reporting: `learners.progress`.

Where each decision lives: the parent (the adapter the gateway serves, never a rolled-back one) in
`learners.lineage`; the held-out split and the gate's statistics (fresh draws, MinHash near duplicates, alpha
spending across rounds, per-task regressions) in `learners.gate`; what each mode trains on, and how the generate
stage's strategies reach the update, in `learners.candidates`; the TRL trainers (one per algorithm) and the KL
reference in `learners.trainers`, where training runs in `learners.training`. Modes: `grpo`, `offline` (DPO), `rft`
(SFT on verified best candidates), `rft+grpo`.
The generate stage scores as it samples: a prompt whose k candidates all failed (none at `reward_threshold`,
or, for grpo/offline, all equal) is sampled again, up to `k_max`, and the counts are in the round's metrics.

On GPUs: with the vLLM backend a round builds one engine (`learners.generation.VllmEngine`) for generation and
both gate policies (parent and new adapter as LoRA requests), puts it to sleep while the adapter trains (or
deletes it, where vLLM has no sleep mode) and returns PyTorch's cached memory before the engine wakes or is built
again. Training on CUDA runs in a child process that sees only the selected GPU (`learners.training.placement`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import product
from pathlib import Path
from typing import Any

from learners import gate, lineage, training
from learners.candidates import failed, split_counts, training_sets
from learners.exceptions import LearnerError
from learners.generation import (
    TransformersGenerator,
    VllmEngine,
    adapter_rank,
    check_vllm,
    load_policy,
    release_cuda,
    render,
    resolve_device,
    resolve_dtype,
)
from learners.models import check_model, default_base_model
from learners.progress import METRICS, Reporter, RoundResult
from learners.records import RecordSink
from learners.recovery import announce, recover
from learners.rewards.composite import CompositeScorer
from learners.rewards.registry import build_scorer
from learners.state import (
    RoundState,
    checkpoint,
    fsync_dir,
    learner_dir,
    load_rounds,
    now_iso,
    round_lock,
    staging_dir,
    write_json_atomic,
)
from learners.trainers.common import check_trl_overrides
from learners.training import placement
from streams.exceptions import QueryError
from streams.sqlapi import query
from taoflow.lora import vllm_lora_rank
from taoflow.settings import Settings

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# helpers


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def is_heldout(prompt_hash: str, fraction: float) -> bool:
    """A stable split by content hash (kept for callers outside the learner; rounds use `gate.split_prompts`).

    >>> is_heldout("0" * 64, 0.2), is_heldout("f" * 64, 0.2)
    (True, False)
    """
    return int(prompt_hash[:8], 16) % 10_000 < fraction * 10_000


def round_scorer_specs(settings: Settings) -> list[Any]:
    specs = settings.learner.scorers or settings.stream.scorers
    if not specs:
        raise LearnerError(
            "no scorers configured: set TAOFLOW_LEARNER_SCORERS (or TAOFLOW_STREAM_SCORERS), e.g. "
            '\'[{"type": "arithmetic"}]\'; a round needs a reward to learn from'
        )
    return list(specs)


def build_round_scorer(settings: Settings, device: str | None = None) -> CompositeScorer:
    """The round's scorers; a reward model whose spec names no device runs on `device` (the learner's)."""
    return CompositeScorer([build_scorer(s, device=device) for s in round_scorer_specs(settings)])


class TrainedQuestions:
    """Question keys some round trained on: the held-out draw never takes them (append-only file)."""

    def __init__(self, settings: Settings) -> None:
        self.path = learner_dir(settings) / "trained-questions.txt"

    def load(self) -> set[str]:
        try:
            return set(self.path.read_text().split())
        except FileNotFoundError:
            return set()

    def add(self, keys: set[str]) -> None:
        new = keys - self.load()
        if new:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write("".join(f"{k}\n" for k in sorted(new)))
                f.flush()
                os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------------------------
# the round


@dataclass
class Prompt:
    hash: str
    prompt: Any  # text, or chat messages
    task_type: str
    metadata: dict[str, Any]
    heldout: bool = False
    ts: str | None = None


class Round:
    """The stages of one round; `run()` drives them and records every transition."""

    def __init__(self, settings: Settings, sink: RecordSink, reporter: Reporter | None = None) -> None:
        self.settings = settings
        self.cfg = settings.learner
        self.sink = sink
        self.reporter = reporter or Reporter()

        self.device = resolve_device(self.cfg.device)
        self.dtype = resolve_dtype(self.cfg.dtype, self.device)
        check_trl_overrides(self.cfg.trl, self.cfg.mode)
        if self.cfg.backend == "vllm":
            check_vllm()  # installed, and able to build an engine in this thread
        self.place = placement(self.cfg, self.device)
        self.scorer = build_round_scorer(settings, self.device)
        self.base_model = default_base_model(settings)
        check_model(self.base_model)
        self.parent_name = lineage.served_adapter(lineage.adapter_events(settings), self.cfg.parent_from)
        self.parent = settings.core.adapters_dir / self.parent_name if self.parent_name else None
        if self.parent is not None:
            if not (self.parent / "manifest.json").exists():
                raise LearnerError(
                    f"the {self.cfg.parent_from} adapter {self.parent_name} is missing from "
                    f"{settings.core.adapters_dir}; restore it, or roll it back so the gateway serves its predecessor"
                )
            lineage.check_lora_shape(self.parent, self.cfg)
        # the round's vLLM engine holds the parent's LoRA and the new one: its rank bound fits both
        self.vllm_lora_rank = vllm_lora_rank(max(self.cfg.lora_r, adapter_rank(self.parent)))
        self._engine: Any = None
        rid = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        self.state = RoundState(
            settings,
            sink,
            {
                "round_id": rid,
                "status": "running",
                "stage": None,
                "started_at": now_iso(),
                "base_model": self.base_model,
                "parent_adapter": self.parent_name,
                "parent_from": self.cfg.parent_from,
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
        self.gate_reason = ""
        self._tokenizer: Any = None
        self._question_keys: dict[str, str] = {}

    @property
    def round_id(self) -> str:
        return str(self.state.doc["round_id"])

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.base_model)
        return self._tokenizer

    def render(self, prompt: Any, strategy: str = "plain") -> str:
        return render(prompt, self.tokenizer, strategy)

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
            train, heldout = self.split(prompts)
            self.state.save(prompts=len(train), heldout=len(heldout))
            if not train or not heldout:
                return self._end(
                    "skipped",
                    f"too few prompts: {len(train)} to train on, {len(heldout)} held out (the gate needs both; "
                    f"{int(self.metrics.get('heldout_eligible_questions', 0))} questions were never trained on)",
                )
            candidates = self._stage("generate", lambda: self.generate(train))
            sets = self._stage("score", lambda: self.score(train, candidates))
            if not sets.size(self.cfg.mode):
                return self._end(
                    "skipped",
                    f"no signal: no prompt's candidates (k={self.cfg.k}, up to {self._k_max} after resampling) "
                    f"{'passed the reward threshold' if self.cfg.mode == 'rft' else 'scored differently'}",
                )
            self.work.mkdir(parents=True, exist_ok=True)
            adapter_dir = self.work / "adapter"
            self._stage("train", lambda: self.train(sets, adapter_dir))
            passed = self._stage("gate", lambda: self.gate(heldout, adapter_dir))
            if not passed:
                return self._end("gated_out", self.gate_reason)
            self._stage("publish", lambda: self.publish(adapter_dir))
            return RoundResult(self.round_id, "published", doc.get("adapter"), self.metrics, doc["timings"])
        except Exception as exc:
            log.exception("round %s failed", self.round_id)
            self.state.save(
                status="failed", finished_at=now_iso(), error=f"{type(exc).__name__}: {exc}", metrics=self.metrics
            )
            if doc.get("adapter_name") and not doc.get("committed"):
                shutil.rmtree(staging_dir(self.settings, doc["adapter_name"]), ignore_errors=True)
                shutil.rmtree(self.settings.core.adapters_dir / doc["adapter_name"], ignore_errors=True)
            return RoundResult(self.round_id, "failed", None, self.metrics, doc["timings"], str(exc))
        finally:
            self._close_engine()
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
        self.state.save(status=status, finished_at=now_iso(), error=reason, metrics=self.metrics)
        return RoundResult(self.round_id, status, None, self.metrics, self.state.doc["timings"], reason)

    # -- stages -----------------------------------------------------------------------------------------------

    def select(self) -> list[Prompt]:
        """Distinct prompts (by content hash) from `interactions`, newest first, at most `task_quotas` per task type;
        of multi-step sessions every step, or each session's first step where `session_prompts` says 'first'."""

        self.reporter.stage("select")
        where = []
        if self.cfg.task_types:
            where.append("task_type IN (" + ", ".join(_sql_str(t) for t in self.cfg.task_types) + ")")
        if self.cfg.window_hours:
            where.append(f"ts >= now() - INTERVAL {int(self.cfg.window_hours * 3600)} SECOND")
        quotas = dict(self.cfg.task_quotas)
        default_quota = int(quotas.pop("default", self.cfg.max_prompts))
        quota = str(default_quota)
        if quotas:
            whens = "".join(f"WHEN {_sql_str(t)} THEN {int(q)} " for t, q in quotas.items())
            quota = f"CASE task_type {whens}ELSE {default_quota} END"
        modes = dict(self.cfg.session_prompts)
        default_mode = modes.pop("default", "steps")
        first_only = {t for t, m in modes.items() if m == "first"}
        if default_mode == "first" or first_only:
            # a session's first step is its lowest step number (then the earliest), per caller and session id;
            # the task types listed with the other mode than the default are the exceptions
            others = ", ".join(_sql_str(t) for t in sorted(t for t, m in modes.items() if m != default_mode))
            exception = f"task_type IN ({others})" if default_mode == "first" else f"task_type NOT IN ({others})"
            where.append(f"(session_id IS NULL OR session_rank = 1 OR {exception if others else 'false'})")
        source = (
            "(SELECT *, row_number() OVER (PARTITION BY caller, session_id ORDER BY step NULLS LAST, ts, event_id) "
            "AS session_rank FROM interactions)"
        )
        sql = (
            "SELECT prompt_hash, prompt, chat, task_type, meta, CAST(last AS VARCHAR) FROM ("
            "SELECT prompt_hash, arg_max(prompt, ts) AS prompt, bool_or(prompt_is_chat) AS chat, "
            "arg_max(task_type, ts) AS task_type, arg_max(CAST(metadata AS VARCHAR), ts) AS meta, max(ts) AS last "
            f"FROM {source} " + (f"WHERE {' AND '.join(where)} " if where else "") + "GROUP BY prompt_hash) "
            f"QUALIFY row_number() OVER (PARTITION BY task_type ORDER BY last DESC, prompt_hash) <= {quota} "
            f"ORDER BY last DESC, prompt_hash LIMIT {self.cfg.max_prompts}"
        )
        try:
            rows = query(sql, self.settings).rows
        except QueryError as exc:
            raise LearnerError(f"cannot read prompts: {exc}") from None
        prompts = [
            Prompt(h, json.loads(text) if chat else text, task, json.loads(meta or "{}") or {}, False, ts)
            for h, text, chat, task, meta, ts in rows
        ]
        times = sorted(p.ts for p in prompts if p.ts)
        if times:
            self.state.doc.update(window_start=times[0], window_end=times[-1])
        self.metrics["prompts_selected"] = len(prompts)
        for task in sorted({p.task_type for p in prompts}):
            self.metrics[f"task.{task}.selected"] = float(sum(p.task_type == task for p in prompts))
        checkpoint(self.settings, "select")
        return prompts

    def split(self, prompts: list[Prompt]) -> tuple[list[Prompt], list[Prompt]]:
        """This round's fresh held-out draw (see `learners.gate`); nothing near a held-out prompt is trained on."""
        s = gate.split_prompts(
            [p.prompt for p in prompts],
            fraction=self.cfg.heldout_fraction,
            trained=TrainedQuestions(self.settings).load(),
            seed=self.seed,
            id_digits=self.cfg.heldout_id_digits,
            near_duplicate=self.cfg.heldout_near_duplicate,
            groups=[p.task_type for p in prompts],
        )
        for i in s.heldout:
            prompts[i].heldout = True
        self._question_keys = {p.hash: gate.question_key(p.prompt, self.cfg.heldout_id_digits) for p in prompts}
        self.metrics.update(
            heldout_eligible_questions=float(s.eligible_questions),
            train_near_heldout_dropped=float(s.near_duplicates_dropped),
            heldout_duplicates_dropped=float(s.duplicates_dropped),
        )
        return [prompts[i] for i in s.train], [prompts[i] for i in s.heldout]

    def _policy(self, adapter: Path | None) -> Any:
        if self.cfg.backend == "vllm":
            if self._engine is None:
                self._engine = VllmEngine(
                    self.base_model,
                    max_lora_rank=self.vllm_lora_rank,
                    dtype=str(self.dtype).removeprefix("torch."),
                    seed=self.seed,
                    gpu_memory_utilization=self.cfg.vllm_gpu_memory_utilization,
                    sleep_mode=self.cfg.vllm_sleep_mode,
                    device=self.device,
                )
            return self._engine.generator(adapter)
        model, tok = load_policy(self.base_model, adapter, device=self.device, dtype=self.dtype)
        return TransformersGenerator(model, tok, batch_size=self.cfg.generation_batch_size, seed=self.seed)

    def _count_engines(self) -> None:
        if self._engine is not None:
            self.metrics["vllm_engines_built"] = float(self._engine.builds)

    def _close_engine(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    @property
    def _k_max(self) -> int:
        return max(self.cfg.k, self.cfg.k_max or 2 * self.cfg.k)

    def _sample(self, gen: Any, prompts: list[Prompt], n: int, out: dict[str, list[dict[str, Any]]]) -> None:
        """n more candidates per prompt, spread over the (strategy, temperature) combinations, scored."""
        combos = list(product(self.cfg.strategies, self.cfg.temperatures))
        new: list[tuple[Prompt, dict[str, Any]]] = []
        for (strategy, temp), count in zip(combos, split_counts(n, len(combos)), strict=True):
            if not count:
                continue
            texts = [self.render(p.prompt, strategy) for p in prompts]
            results = gen.generate(
                texts, n=count, temperature=temp, max_new_tokens=self.cfg.max_new_tokens, progress=self.reporter.advance
            )
            for p, responses in zip(prompts, results, strict=True):
                for r in responses:
                    new.append((p, {"strategy": strategy, "temperature": temp, "response": r}))
        # each prompt's candidates next to each other, whatever their strategy and temperature: a ranking judge ranks
        # the candidates that sit together as one group (the sort is stable: combinations keep their order)
        where = {p.hash: i for i, p in enumerate(prompts)}
        new.sort(key=lambda item: where[item[0].hash])
        parts = self.scorer.rule_parts(
            [c["response"] for _, c in new],
            prompts=[p.prompt for p, _ in new],
            task_types=[p.task_type for p, _ in new],
            metadata=[p.metadata for p, _ in new],
        )
        for (p, c), part in zip(new, parts, strict=True):
            c["reward"] = self.scorer.compose(part).reward
            c["parts"] = part
            out[p.hash].append(c)

    def generate(self, prompts: list[Prompt]) -> dict[str, list[dict[str, Any]]]:
        """k scored candidates per prompt; prompts whose candidates all failed get more, up to k_max (adaptive k)."""
        gen = self._policy(self.parent)
        self.reporter.stage("generate", len(prompts))
        out: dict[str, list[dict[str, Any]]] = {p.hash: [] for p in prompts}
        self._sample(gen, prompts, self.cfg.k, out)

        def failing() -> list[Prompt]:
            rewards = {h: [c["reward"] for c in cs if c["reward"] is not None] for h, cs in out.items()}
            return [p for p in prompts if failed(rewards[p.hash], self.cfg.reward_threshold, self.cfg.mode)]

        first_failed = failing()
        todo = [p for p in first_failed if len(out[p.hash]) < self._k_max]
        extra = 0
        while todo:
            n = min(self.cfg.k, self._k_max - len(out[todo[0].hash]))
            self._sample(gen, todo, n, out)
            extra += n * len(todo)
            still = {p.hash for p in failing()}
            todo = [p for p in todo if p.hash in still and len(out[p.hash]) < self._k_max]
        still = {p.hash for p in failing()}
        self.metrics.update(
            prompts_resampled=float(len(first_failed) if self._k_max > self.cfg.k else 0),
            prompts_rescued=float(sum(p.hash not in still for p in first_failed)),
            prompts_failed_at_k_max=float(len(still)),
            candidates_extra=float(extra),
            generated_tokens=float(gen.tokens),
            generation_tokens_per_s=round(gen.tokens / gen.seconds, 1) if gen.seconds else 0.0,
        )
        if first_failed:
            log.info(
                "%d of %d prompts failed with k=%d; resampled up to %d: %d rescued, %d still failed",
                len(first_failed), len(prompts), self.cfg.k, self._k_max,
                len(first_failed) - len(still), len(still),
            )  # fmt: skip
        del gen
        self._count_engines()
        release_cuda()
        checkpoint(self.settings, "generate")
        return out

    def score(self, prompts: list[Prompt], candidates: dict[str, list[dict[str, Any]]]) -> Any:
        """Record every scored candidate; build what the mode trains on (see `learners.candidates`)."""
        self.reporter.stage("score", len(prompts))
        rows, best, mean, uniform, unscorable = [], [], [], 0, 0
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
            if not rewards:
                unscorable += 1
                continue
            best.append(max(rewards))
            mean.append(sum(rewards) / len(rewards))
            uniform += max(rewards) == min(rewards)
            self.reporter.advance(1)
        for start in range(0, len(rows), 2000):
            self.sink.write("tao_candidates", rows[start : start + 2000])
        sets = training_sets(
            prompts,
            candidates,
            self.render,
            threshold=self.cfg.reward_threshold,
            rft_per_prompt=self.cfg.rft_per_prompt,
        )
        self.metrics.update(
            candidates=float(len(rows)),
            prompts_informative=float(len({r["hash"] for r in self._used(sets)})),
            prompts_uniform_skipped=float(uniform),
            prompts_unscorable=float(unscorable),
            rft_examples=float(len(sets.rft)),
            grpo_rows=float(len(sets.grpo)),
            dpo_pairs=float(len(sets.dpo)),
            candidate_reward_mean=round(sum(mean) / len(mean), 4) if mean else 0.0,
            best_of_k_reward=round(sum(best) / len(best), 4) if best else 0.0,
        )
        if uniform or unscorable:
            log.info(
                "%d of %d prompts: all candidates scored the same; %d: no scorer applies",
                uniform, len(prompts), unscorable,
            )  # fmt: skip
        checkpoint(self.settings, "score")
        return sets

    def _used(self, sets: Any) -> list[dict[str, Any]]:
        mode = self.cfg.mode
        return {"grpo": sets.grpo, "offline": sets.dpo, "rft": sets.rft, "rft+grpo": sets.rft + sets.grpo}[mode]

    def train(self, sets: Any, out: Path) -> None:
        used = self._used(sets)
        by_hash = {r["hash"] for r in used}
        self.state.doc["trained_prompts"] = sorted(by_hash)
        self.state.save()
        keys = {self._question_keys[h] for h in by_hash}
        TrainedQuestions(self.settings).add(keys)  # before training: a crash mid-train still counts as trained on
        self.reporter.stage("train", self.cfg.steps)
        if self._engine is not None:
            self._engine.release()  # the trainer needs the engine's GPU memory: it sleeps (or goes) until the gate
        specs = [s.model_dump(mode="json", by_alias=True) for s in round_scorer_specs(self.settings)]
        common = {"base_model": self.base_model, "parent": self.parent, "dtype": self.dtype, "seed": self.seed,
                  "place": self.place, "progress": self.reporter.advance}  # fmt: skip
        mode = self.cfg.mode
        if mode == "offline":
            pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in sets.dpo]
            self.metrics.update(training.train("offline", self.cfg, pairs=pairs, out=out, **common))
        start: Path | None = None
        if mode in ("rft", "rft+grpo"):
            rft_out = out if mode == "rft" else self.work / "rft"
            examples = [{"prompt": r["prompt"], "completion": r["completion"]} for r in sets.rft]
            self.metrics.update(training.train("rft", self.cfg, examples=examples, out=rft_out, **common))
            start = rft_out
        if mode in ("grpo", "rft+grpo"):
            if sets.grpo:
                self.metrics.update(
                    training.train(
                        "grpo", self.cfg, rows=sets.grpo, scorer=self.scorer, scorer_specs=specs, out=out,
                        start=start, temperature=max(self.cfg.temperatures), **common,
                    )
                )  # fmt: skip
            elif start is not None:
                shutil.copytree(start, out)  # rft+grpo with no prompt for GRPO: the RFT adapter is the result
        release_cuda()  # what training left in PyTorch's cache, before the engine wakes or is built again
        checkpoint(self.settings, "train")

    def respond(self, prompts: list[Prompt], adapter: Path | None) -> list[list[str]]:
        """Responses as the gateway would serve them: the plain prompt, the gateway's sampling settings.

        Both policies sample with the same seed (common random numbers): a no-op adapter answers exactly as its
        parent, so sampling noise alone does not pass the gate."""
        gen = self._policy(adapter)
        greedy = self.cfg.gate_temperature <= 0
        results: list[list[str]] = gen.generate(
            [self.render(p.prompt) for p in prompts],
            n=self.cfg.gate_samples,
            temperature=self.cfg.gate_temperature,
            top_p=self.cfg.gate_top_p,
            max_new_tokens=self.cfg.max_new_tokens,
            greedy=greedy,
            progress=self.reporter.advance,
        )
        # the gate's sampling is compute the round spends too (budgets compare it across arms)
        self.metrics["gate_generated_tokens"] = self.metrics.get("gate_generated_tokens", 0.0) + float(gen.tokens)
        del gen
        self._count_engines()
        release_cuda()
        return results

    def gate_index(self) -> int:
        """1 + the gated rounds before this one against the same parent: the index of alpha spending."""
        done = [
            d
            for d in load_rounds(self.settings)
            if d.get("gated") and d.get("parent_adapter") == self.parent_name and d["round_id"] != self.round_id
        ]
        return len(done) + 1

    def gate(self, heldout: list[Prompt], adapter_dir: Path) -> bool:
        """Publish only if the paired held-out gain's lower bound clears the margin at this round's spent alpha,
        and no task type regresses beyond `gate_task_margin` (see `learners.gate`)."""
        self.reporter.stage("gate", 2 * len(heldout))
        current = self.respond(heldout, self.parent)
        new = self.respond(heldout, adapter_dir)
        cur_scores, new_scores = gate.score_pairs(self.scorer, heldout, current, new, seed=self.seed)
        index = self.gate_index()
        alpha = gate.spent_alpha(1 - self.cfg.gate_confidence, index, self.cfg.gate_alpha_spending)
        decision = gate.decide(
            cur_scores,
            new_scores,
            [p.task_type for p in heldout],
            alpha=alpha,
            margin=self.cfg.gate_margin,
            task_margin=self.cfg.gate_task_margin,
            seed=self.seed,
        )
        self.metrics.update(decision.metrics)
        self.metrics.update(
            gate_round_index=float(index),
            gate_temperature=self.cfg.gate_temperature,
            gate_top_p=self.cfg.gate_top_p,
            gate_samples=float(self.cfg.gate_samples),
        )
        self.gate_reason = decision.reason
        self.state.doc["heldout_prompts"] = sorted(p.hash for p in heldout)
        self.state.save(gated=True, gate_reason=decision.reason)
        checkpoint(self.settings, "gate")
        return decision.publish

    def _manifest(self, name: str, sha: str, per_file: dict[str, str]) -> dict[str, Any]:
        d = self.state.doc
        parent_sha = None
        if self.parent is not None:
            with contextlib.suppress(OSError, ValueError):
                parent_sha = json.loads((self.parent / "manifest.json").read_text()).get("sha256")
        training = self.cfg.model_dump(mode="json", exclude={"scorers"})
        trained, heldout = d.get("trained_prompts", []), d.get("heldout_prompts", [])
        hash_cache = learner_dir(self.settings) / "base-hash.json"
        return {
            "adapter": name,
            "base_model": self.base_model,
            "base_model_sha256": lineage.base_model_hash(self.base_model, hash_cache),
            "round_id": self.round_id,
            "parent_adapter": self.parent_name,
            "parent_sha256": parent_sha,
            "parent_from": self.cfg.parent_from,
            "mode": self.cfg.mode,
            "k": self.cfg.k,
            "window_start": d.get("window_start"),
            "window_end": d.get("window_end"),
            "scorers": [s.model_dump(mode="json") for s in (self.cfg.scorers or self.settings.stream.scorers)],
            "training": training,
            "trl_overrides": dict(self.cfg.trl),
            "seed": self.seed,
            "libraries": lineage.library_versions(),
            "gate": {
                "reason": d.get("gate_reason"),
                "temperature": self.cfg.gate_temperature,
                "top_p": self.cfg.gate_top_p,
                "samples": self.cfg.gate_samples,
                "max_new_tokens": self.cfg.max_new_tokens,
                "alpha": self.metrics.get("gate_alpha"),
                "round_index": self.metrics.get("gate_round_index"),
            },
            "prompts": {
                "trained": trained,
                "heldout": heldout,
                "trained_sha256": lineage.prompts_digest(trained),
                "heldout_sha256": lineage.prompts_digest(heldout),
            },
            "metrics": self.metrics,
            "sha256": sha,
            "files": per_file,
            "created_at": now_iso(),
        }

    def publish(self, adapter_dir: Path) -> None:
        """Stage, rename into place, commit in the state file, then announce (see the module docstring)."""
        self.reporter.stage("publish")
        name = f"tao-{self.round_id}"
        final = self.settings.core.adapters_dir / name
        staging = staging_dir(self.settings, name)
        self.state.save(adapter_name=name)  # recovery knows what to clean up from here on
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(adapter_dir, staging)
        sha, per_file = lineage.digest_tree(staging)  # every file copied, in subdirectories too
        for rel in per_file:
            with open(staging / rel, "rb") as fh:
                os.fsync(fh.fileno())
        write_json_atomic(staging / "manifest.json", self._manifest(name, sha, per_file))
        checkpoint(self.settings, "publish:staged")
        os.replace(staging, final)
        fsync_dir(final.parent)
        checkpoint(self.settings, "publish:renamed")
        self.state.doc.update(adapter=name, sha256=sha, path=str(final))
        self.state.save(committed=True, committed_at=now_iso())  # the commit point
        announce(self.settings, self.sink, self.state)


def run_round(settings: Settings, reporter: Reporter | None = None, *, prefer_kafka: bool = True) -> RoundResult:
    """One round now: take the lock, settle interrupted rounds, run. Raises LearnerError for user mistakes."""
    with round_lock(settings):
        sink = RecordSink(settings, prefer_kafka=prefer_kafka)
        try:
            recover(settings, sink)
            result = Round(settings, sink, reporter).run()
            result.records = sink.where()
            return result
        finally:
            sink.close()
