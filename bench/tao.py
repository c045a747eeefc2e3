"""TAO against labeled fine-tuning on questions no stage saw, over three task types, several seeds, on CPU.

Tasks (`learners.tasks`), each with a verifier that reads the question from the prompt and needs no label:
  arith    "Order 4821: What is 123 + 45?"                  first number of the answer is the sum
  json     "Order 4821: Record item fig qty 37 as JSON."    the answer's JSON is valid against the schema the
                                                            prompt asks for (exactly that item and qty)
  reverse  "Order 4821: Reverse the letters k m x q."       the first line is the letters reversed
The underlying questions (unordered operand pairs, (item, qty), letter strings) are split three ways, disjoint:
warm-up (labeled; one draw per run), and per seed train (landed as unlabeled prompts) and eval (never trained on
by any arm). A small Llama-shaped model with a digit-level tokenizer is built and warmed up once on the warm-up
questions (weak, not random; loss on the answers); the seeds share it and vary the train and eval draws, the order
numbers and every training and sampling seed. Then, from that base and on the same train prompts, all task types
together in every round:
  base          the warmed-up model
  sft           labeled SFT: the same trainer as RFT, on the true answers of the train prompts the gate would
                leave to training (a held-out share is drawn as a round's gate does), same steps and batch
  tao-grpo      `rounds` rounds through the real learner (`learners.tao.run_round`: select from the DuckDB
  tao-rft       outcome table, k candidates, verifiers, update, gate on a fresh held-out draw, publish), mode
  tao-dpo       grpo / rft / offline; no labels
Budgets per arm: generated tokens (candidates, plus GRPO's own samples), optimizer steps, wall seconds. The gate
runs in every round; it is told to publish anyway (margin -1) so the arm measures what training did, and what the
gate would have decided at its real settings is reported beside it.
Also per seed: the base model's pass@k on eval questions (unbiased estimator from 64 samples: the ceiling RL can
reach) and the eval reward of one TAO-RFT round per test-time budget k (no adaptive top-up, so k is the budget).
Evaluation on the eval questions, two ways: the greedy answer, and the mean of 8 answers sampled at temperature 1
(the gateway's default decoding, and the gate's). Intervals are 95% paired bootstraps over seeds and questions.

    python bench/tao.py                # the full run (5 seeds)
    python bench/tao.py --quick        # a smoke run (1 seed, small sizes), a couple of minutes
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import shutil
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learners import gate  # noqa: E402
from learners.generation import TransformersGenerator, load_policy, render  # noqa: E402
from learners.state import current_adapter  # noqa: E402
from learners.tao import run_round  # noqa: E402
from learners.tasks import (  # noqa: E402
    TASK_TYPES,
    arithmetic_reward,
    disjoint_questions,
    json_record_reward,
    make_suite_model,
    reverse_reward,
    suite_scorers,
    task_answer,
    task_prompt,
)
from streams import store  # noqa: E402
from taoflow.settings import Settings  # noqa: E402

VERIFIERS = {"arith": arithmetic_reward, "json": json_record_reward, "reverse": reverse_reward}
ARMS = ("base", "sft", "tao-grpo", "tao-rft", "tao-dpo")
MODES = {"tao-grpo": "grpo", "tao-rft": "rft", "tao-dpo": "offline"}
PASS_KS = (1, 2, 4, 8, 16, 32, 64)

FULL = {
    "seeds": 5,
    "warm": 1500,
    "train": 60,
    "eval": 60,
    "warm_steps": 2000,
    "hidden": 96,
    "layers": 3,
    "rounds": 2,
    "steps": 200,
    "k": 8,
    "ks": (2, 4, 8, 16, 32, 64),
    "ks_seeds": 3,
    "passk_eval": 30,
    "eval_samples": 8,
}
QUICK = {"seeds": 1, "warm": 600, "train": 24, "eval": 30, "warm_steps": 100, "hidden": 64, "layers": 2,
         "rounds": 1, "steps": 4, "k": 4, "ks": (2, 4), "ks_seeds": 1, "passk_eval": 10, "eval_samples": 2}  # fmt: skip


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# data


def prompts_of(questions: dict[str, list[tuple[Any, ...]]], seed: int) -> list[tuple[str, str, str]]:
    """(task type, prompt, labeled answer) per question, each with its own order number."""
    rng = random.Random(seed)
    return [(t, task_prompt(t, q, rng.randint(1000, 9999)), task_answer(t, q)) for t, qs in questions.items()
            for q in qs]  # fmt: skip


def land(settings: Settings, items: list[tuple[str, str, str]]) -> None:
    """The train prompts as `interactions` rows, as the lander writes them (no labels: responses are placeholders)."""
    con = store.connect(settings.core.duckdb_path)
    now = datetime.now(UTC)
    values = [
        (str(uuid.uuid4()), now, "bench", task, "direct", p, False, hashlib.sha256(p.encode()).hexdigest(), "-",
         None, 1.0, "{}", 0, i, None, False)
        for i, (task, p, _) in enumerate(items)
    ]  # fmt: skip
    cols = store.COLUMNS["interactions"][: len(values[0])]  # the later, optional columns take their defaults
    store.insert(con, "interactions", {c: [v[i] for v in values] for i, c in enumerate(cols)})
    con.close()


def verify(items: list[tuple[str, str, str]], completions: list[str]) -> list[float]:
    out = []
    for (task, prompt, _), c in zip(items, completions, strict=True):
        r = VERIFIERS[task]([c], prompts=[prompt])[0]
        out.append(float(r or 0.0))
    return out


# ---------------------------------------------------------------------------------------------------------------
# evaluation


def evaluate(base: str, adapter: Path | None, items: list[tuple[str, str, str]], max_new_tokens: int) -> list[float]:
    """Per eval question, the greedy answer's verified reward."""
    model, tok = load_policy(base, adapter, device="cpu", dtype=None)
    gen = TransformersGenerator(model, tok, batch_size=128)
    out = gen.generate([render(p, tok) for _, p, _ in items], n=1, temperature=1.0, max_new_tokens=max_new_tokens,
                       greedy=True)  # fmt: skip
    return verify(items, [o[0] for o in out])


def evaluate_sampled(
    base: str, adapter: Path | None, items: list[tuple[str, str, str]], max_new_tokens: int, n: int, seed: int
) -> list[float]:
    """Per eval question, the mean verified reward of `n` answers sampled at temperature 1: what a user gets from the
    gateway's default decoding (and what the gate measures), where `evaluate` is the greedy answer."""
    model, tok = load_policy(base, adapter, device="cpu", dtype=None)
    gen = TransformersGenerator(model, tok, batch_size=256, seed=seed)
    out = gen.generate([render(p, tok) for _, p, _ in items], n=n, temperature=1.0, max_new_tokens=max_new_tokens)
    return [float(np.mean(verify([item] * n, samples))) for item, samples in zip(items, out, strict=True)]


def pass_at_k(base: str, items: list[tuple[str, str, str]], n: int, max_new_tokens: int, seed: int) -> dict[str, Any]:
    """Unbiased pass@k (Chen et al. 2021) from n samples at temperature 1, per question; and tokens generated."""
    model, tok = load_policy(base, None, device="cpu", dtype=None)
    gen = TransformersGenerator(model, tok, batch_size=256, seed=seed)
    out = gen.generate([render(p, tok) for _, p, _ in items], n=n, temperature=1.0, max_new_tokens=max_new_tokens)
    per_q: dict[int, list[float]] = {k: [] for k in PASS_KS if k <= n}
    for item, samples in zip(items, out, strict=True):
        c = int(sum(verify([item] * n, samples)))
        for k in per_q:
            per_q[k].append(1.0 - (math.comb(n - c, k) / math.comb(n, k) if n - c >= k else 0.0))
    return {"per_question": per_q, "tokens": gen.tokens}


# ---------------------------------------------------------------------------------------------------------------
# arms


def learner_settings(data_dir: Path, base: str, cfg: dict[str, Any], *, mode: str, k: int, seed: int,
                     k_max: int | None = None) -> Settings:  # fmt: skip
    return Settings(overrides={
        "core": {"data_dir": data_dir, "base_model": base},
        "kafka": {"bootstrap": "127.0.0.1:9"},  # nothing listens: the learner writes the DuckDB file itself
        "learner": {"scorers": suite_scorers(), "mode": mode, "k": k, "k_max": k_max, "steps": cfg["steps"],
                    "max_new_tokens": cfg["max_new_tokens"], "max_prompts": 100_000, "learning_rate": cfg["lr"],
                    "batch_prompts": cfg["batch_prompts"], "temperatures": [1.0], "heldout_fraction": 0.2,
                    "seed": seed, "lora_r": 16, "lora_alpha": 32, "parent_from": "published",
                    "gate_margin": -1.0, "gate_task_margin": 1.0, "generation_batch_size": 256},
    })  # fmt: skip


def would_publish(metrics: dict[str, float], task_margin: float = 0.05) -> bool:
    """The gate's verdict at its real settings (margin 0, per-task drop at most 0.05) from the round's numbers."""
    drops = [v for k, v in metrics.items() if k.startswith("task.") and k.endswith(".gain")]
    return metrics.get("gain_lcb", 0.0) > 0.0 and all(d >= -task_margin for d in drops)


def tao_arm(data_dir: Path, base: str, train: list[tuple[str, str, str]], cfg: dict[str, Any], *, mode: str, k: int,
            rounds: int, seed: int, k_max: int | None = None, label: str = "") -> dict[str, Any]:  # fmt: skip
    """`rounds` rounds through the real learner on the landed train prompts; returns the final adapter and budgets."""
    settings = learner_settings(data_dir, base, cfg, mode=mode, k=k, seed=seed, k_max=k_max)
    land(settings, train)
    t0 = time.perf_counter()
    tokens = steps = 0.0
    history = []
    for r in range(rounds):
        res = run_round(settings, prefer_kafka=False)
        m = res.metrics
        if res.status == "failed":
            raise RuntimeError(f"{label} round {r + 1} failed: {res.error}")
        tokens += m.get("generated_tokens", 0.0) + m.get("train_generated_tokens", 0.0)
        steps += m.get("train_steps", 0.0) + m.get("rft_train_steps", 0.0)
        history.append({"status": res.status, "gate_would_publish": would_publish(m), **{
            key: m.get(key) for key in ("gain", "gain_lcb", "heldout_reward_current", "heldout_reward_new",
                                        "best_of_k_reward", "candidate_reward_mean", "prompts_informative",
                                        "prompts_failed_at_k_max", "candidates_extra")}})  # fmt: skip
        say(f"  {label} round {r + 1}/{rounds}: {res.status}; candidates mean {m.get('candidate_reward_mean')}, "
            f"best-of-k {m.get('best_of_k_reward')}; gate {m.get('heldout_reward_current')} -> "
            f"{m.get('heldout_reward_new')} (lcb {m.get('gain_lcb')}, would publish: {would_publish(m)})")  # fmt: skip
    cur = current_adapter(settings)
    adapter = settings.core.adapters_dir / cur["adapter"] if cur else None
    return {"adapter": adapter, "tokens": tokens, "steps": steps, "seconds": time.perf_counter() - t0,
            "rounds": history}  # fmt: skip


def sft_arm(out: Path, base: str, train: list[tuple[str, str, str]], cfg: dict[str, Any], *, seed: int,
            steps: int) -> dict[str, Any]:  # fmt: skip
    """Labeled SFT with the learner's RFT trainer (same LoRA, lr, batch), on the true answers of the train prompts
    a round's gate would leave to training."""
    from learners.trainers.rft import train_rft

    split = gate.split_prompts([p for _, p, _ in train], fraction=0.2, trained=set(), seed=seed,
                               groups=[t for t, _, _ in train])  # fmt: skip
    kept = [train[i] for i in split.train]
    settings = learner_settings(out / "unused", base, {**cfg, "steps": steps}, mode="rft", k=2, seed=seed)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    examples = [{"prompt": render(p, tok), "completion": f" {a}"} for _, p, a in kept]
    t0 = time.perf_counter()
    m = train_rft(settings.learner, base_model=base, parent=None, examples=examples, device="cpu", dtype=None,
                  out=out / "adapter", seed=seed)  # fmt: skip
    return {"adapter": out / "adapter", "tokens": 0.0, "steps": m["rft_train_steps"],
            "seconds": time.perf_counter() - t0, "examples": len(kept)}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# statistics


def boot(per_seed: list[np.ndarray], *, resamples: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """Mean over seeds of per-question values and its 95% interval: a bootstrap that resamples seeds, then
    questions within each seed (pass paired differences to get a paired interval)."""
    rng = np.random.default_rng(seed)
    mean = float(np.mean([x.mean() for x in per_seed]))
    stats = np.empty(resamples)
    for b in range(resamples):
        picks = rng.integers(0, len(per_seed), len(per_seed))
        stats[b] = np.mean([per_seed[i][rng.integers(0, len(per_seed[i]), len(per_seed[i]))].mean() for i in picks])
    lo, hi = np.quantile(stats, [0.025, 0.975])
    return mean, float(lo), float(hi)


def fmt(ci: tuple[float, float, float]) -> str:
    return f"{ci[0]:.3f} [{ci[1]:.3f}, {ci[2]:.3f}]"


def summarise(seeds: list[dict[str, Any]], key: str = "eval") -> dict[str, Any]:
    """The tables for one decoding: `eval` (greedy) or `eval_t1` (sampled at temperature 1)."""
    tasks = [t for t, _, _ in seeds[0]["eval_items"]]
    out: dict[str, Any] = {"arms": {}, "by_task": {}, "vs_sft": {}, "vs_base_by_task": {}, "budgets": {},
                           "pass_at_k": {}, "by_k": {}}  # fmt: skip
    for arm in ARMS:
        vals = [np.asarray(s[key][arm]) for s in seeds]
        out["arms"][arm] = boot(vals)
        out["by_task"][arm] = {
            t: boot([v[[i for i, x in enumerate(tasks) if x == t]] for v in vals]) for t in TASK_TYPES
        }
        if arm != "sft":
            out["vs_sft"][arm] = boot([v - np.asarray(s[key]["sft"]) for v, s in zip(vals, seeds, strict=True)])
        if arm != "base":
            base = [np.asarray(s[key]["base"]) for s in seeds]
            out["vs_base_by_task"][arm] = {
                t: boot([(v - b)[[i for i, x in enumerate(tasks) if x == t]] for v, b in zip(vals, base, strict=True)])
                for t in TASK_TYPES
            }
            out["budgets"][arm] = {key: float(np.mean([s["budgets"][arm][key] for s in seeds]))
                                   for key in ("tokens", "steps", "seconds")}  # fmt: skip
    for k in seeds[0]["pass_at_k"]:
        out["pass_at_k"][k] = boot([np.asarray(s["pass_at_k"][k]) for s in seeds])
    with_k = [s for s in seeds if s.get("by_k")]
    for k in with_k[0]["by_k"] if with_k else []:
        out["by_k"][k] = boot([np.asarray(s["by_k"][k][key]) for s in with_k])
        out["by_k"][k] += (float(np.mean([s["by_k"][k]["tokens"] for s in with_k])),)
    return out


# ---------------------------------------------------------------------------------------------------------------
# the run


def build_base(root: Path, cfg: dict[str, Any], cache: Path | None) -> tuple[str, dict[str, Any]]:
    """The warmed-up base (one per run, shared by the seeds) and its warm-up questions; reused from `cache` when
    it was built with the same settings."""
    keys = ("warm", "warm_steps", "hidden", "layers", "warm_lr")
    meta = {k: cfg[k] for k in keys}
    warm = disjoint_questions({"warm": cfg["warm"]}, seed=10_000)["warm"]
    if cache is not None and (cache / "suite.json").exists() and json.loads((cache / "suite.json").read_text()) == meta:
        say(f"base reused from {cache}")
        return str(cache), warm
    out = cache if cache is not None else root / "base"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    _, losses = make_suite_model(out, warm, steps=cfg["warm_steps"], seed=0, lr=cfg["warm_lr"],
                                 hidden_size=cfg["hidden"], layers=cfg["layers"])  # fmt: skip
    (out / "suite.json").write_text(json.dumps(meta))
    say(f"base built and warmed up in {time.perf_counter() - t0:.0f}s (answer loss {losses[0]:.2f} -> "
        f"{np.mean(losses[-20:]):.2f})")  # fmt: skip
    return str(out), warm


def run_seed(root: Path, seed: int, cfg: dict[str, Any], base: str, warm: dict[str, list[Any]]) -> dict[str, Any]:
    t_seed = time.perf_counter()
    splits = disjoint_questions({"train": cfg["train"], "eval": cfg["eval"]}, seed=seed, exclude=warm)
    train = prompts_of(splits["train"], seed + 1)
    eval_items = prompts_of(splits["eval"], seed + 2)
    mnt = cfg["max_new_tokens"]
    res: dict[str, Any] = {"seed": seed, "eval_items": eval_items, "eval": {}, "eval_t1": {}, "budgets": {},
                           "rounds": {}}  # fmt: skip
    res["eval"]["base"] = evaluate(base, None, eval_items, mnt)
    res["eval_t1"]["base"] = evaluate_sampled(base, None, eval_items, mnt, cfg["eval_samples"], seed + 3)
    say(f"seed {seed}: base eval {np.mean(res['eval']['base']):.3f} greedy, "
        f"{np.mean(res['eval_t1']['base']):.3f} sampled")  # fmt: skip
    t0 = time.perf_counter()
    sub = [it for t in TASK_TYPES for it in [x for x in eval_items if x[0] == t][: cfg["passk_eval"]]]
    pk = pass_at_k(base, sub, 64 if cfg["ks"][-1] >= 64 else max(cfg["ks"]), mnt, seed)
    res["pass_at_k"] = pk["per_question"]
    say(f"seed {seed}: base pass@k in {time.perf_counter() - t0:.0f}s: "
        + ", ".join(f"@{k} {np.mean(v):.3f}" for k, v in pk["per_question"].items()))  # fmt: skip
    budget_steps = cfg["rounds"] * cfg["steps"]
    for arm in ARMS[1:]:
        if arm == "sft":
            r = sft_arm(root / "sft", base, train, cfg, seed=seed, steps=budget_steps)
        else:
            r = tao_arm(root / arm, base, train, cfg, mode=MODES[arm], k=cfg["k"], rounds=cfg["rounds"], seed=seed,
                        label=f"seed {seed} {arm}")  # fmt: skip
            res["rounds"][arm] = r["rounds"]
        res["eval"][arm] = evaluate(base, r["adapter"], eval_items, mnt)
        res["eval_t1"][arm] = evaluate_sampled(base, r["adapter"], eval_items, mnt, cfg["eval_samples"], seed + 3)
        res["budgets"][arm] = {key: r[key] for key in ("tokens", "steps", "seconds")}
        say(f"seed {seed}: {arm} eval {np.mean(res['eval'][arm]):.3f} greedy, {np.mean(res['eval_t1'][arm]):.3f} "
            f"sampled ({r['steps']:.0f} steps, "
            f"{r['tokens']:.0f} generated tokens, {r['seconds']:.0f}s)")  # fmt: skip
        shutil.rmtree(root / arm, ignore_errors=True)
    res["train"] = train
    res["seconds"] = time.perf_counter() - t_seed
    say(f"seed {seed} done in {res['seconds']:.0f}s")
    return res


def k_sweep(root: Path, res: dict[str, Any], cfg: dict[str, Any], base: str) -> None:
    """One TAO-RFT round per test-time budget k from the base (no adaptive top-up: k is the budget)."""
    seed, res["by_k"] = res["seed"], {}
    for k in cfg["ks"]:
        r = tao_arm(root / f"k{k}", base, res["train"], cfg, mode="rft", k=k, k_max=k, rounds=1, seed=seed,
                    label=f"seed {seed} k={k}")  # fmt: skip
        res["by_k"][k] = {"eval": evaluate(base, r["adapter"], res["eval_items"], cfg["max_new_tokens"]),
                          "eval_t1": evaluate_sampled(base, r["adapter"], res["eval_items"], cfg["max_new_tokens"],
                                                      cfg["eval_samples"], seed + 3),
                          "tokens": r["tokens"]}  # fmt: skip
        say(f"seed {seed}: TAO-RFT k={k} eval {np.mean(res['by_k'][k]['eval']):.3f} greedy, "
            f"{np.mean(res['by_k'][k]['eval_t1']):.3f} sampled ({r['tokens']:.0f} tokens)")  # fmt: skip
        shutil.rmtree(root / f"k{k}", ignore_errors=True)


def report(summary: dict[str, Any], cfg: dict[str, Any], seeds: list[dict[str, Any]], seconds: float) -> str:
    lines = [f"seeds {[s['seed'] for s in seeds]}; {len(seeds[0]['eval_items'])} eval questions per seed "
             f"({cfg['eval']} per task type); total {seconds / 60:.1f} min", "",
             "| arm | eval reward | arith | json | reverse | vs labeled SFT | generated tokens | optimizer steps "
             "| wall s |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for arm in ARMS:
        b = summary["budgets"].get(arm, {"tokens": 0, "steps": 0, "seconds": 0})
        diff = fmt(summary["vs_sft"][arm]) if arm in summary["vs_sft"] else "-"
        by_t = " | ".join(fmt(summary["by_task"][arm][t]) for t in TASK_TYPES)
        lines.append(f"| {arm} | {fmt(summary['arms'][arm])} | {by_t} | {diff} | {b['tokens']:.0f} | "
                     f"{b['steps']:.0f} | {b['seconds']:.0f} |")  # fmt: skip
    lines += ["", "per task, change vs base (95% CI):", "", "| arm | " + " | ".join(TASK_TYPES) + " |",
              "|---|---|---|---|"]  # fmt: skip
    for arm, by in summary["vs_base_by_task"].items():
        lines.append(f"| {arm} | " + " | ".join(fmt(by[t]) for t in TASK_TYPES) + " |")
    ceiling = ", ".join(f"k={k}: {fmt(v)}" for k, v in summary["pass_at_k"].items())
    lines += ["", f"base pass@k on eval questions (ceiling): {ceiling}"]
    if summary["by_k"]:
        lines += ["", "| k (TAO-RFT, one round) | eval reward | generated tokens |", "|---|---|---|"]
        for k, v in summary["by_k"].items():
            lines.append(f"| {k} | {fmt(v[:3])} | {v[3]:.0f} |")
    gate_votes = [r["gate_would_publish"] for s in seeds for rs in s["rounds"].values() for r in rs]
    lines += ["", f"gate at its real settings would have published {sum(gate_votes)} of {len(gate_votes)} rounds"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run: one seed, small sizes")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (0..n-1)")
    ap.add_argument("--ks-seeds", type=int, default=None, help="seeds that also run the k sweep")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per round (SFT: rounds x steps)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--base-cache", type=Path, default=None, help="keep the warmed-up base here and reuse it")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (more than the free cores thrashes)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("seeds", "ks_seeds", "rounds", "steps"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    cfg.update(lr=args.lr, warm_lr=4e-3, max_new_tokens=20, batch_prompts=4)
    logging.basicConfig(level=logging.WARNING)
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    for noisy in ("learners", "transformers", "trl", "peft"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    say(f"config: {cfg}")
    t_start = time.perf_counter()
    seeds = []
    with tempfile.TemporaryDirectory(prefix="taoflow-bench-tao-") as tmp:
        base, warm = build_base(Path(tmp), cfg, args.base_cache)
        for seed in range(cfg["seeds"]):  # the arms of every seed first: a run cut short still has the main table
            seeds.append(run_seed(Path(tmp) / f"seed{seed}", seed, cfg, base, warm))
            finish(args.json, cfg, seeds, t_start, final=False)
        for res in seeds[: cfg["ks_seeds"]]:
            k_sweep(Path(tmp) / f"ks{res['seed']}", res, cfg, base)
    finish(args.json, cfg, seeds, t_start, final=True)


def finish(path: Path | None, cfg: dict[str, Any], seeds: list[dict[str, Any]], t_start: float, final: bool) -> None:
    seconds = time.perf_counter() - t_start
    summary, sampled = summarise(seeds), summarise(seeds, "eval_t1")
    if final:
        print("\ngreedy\n" + report(summary, cfg, seeds, seconds), flush=True)
        head = f"sampled at temperature 1 (mean of {cfg['eval_samples']} per question)"
        print(f"\n{head}\n" + report(sampled, cfg, seeds, seconds), flush=True)
    if path:
        path.write_text(json.dumps({"config": cfg, "seconds": seconds, "summary": summary, "summary_t1": sampled,
                                    "seeds": seeds, "complete": final}, indent=1, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
