"""Proof that TAO learns, at small scale on CPU: base vs TAO vs labeled SFT, reward vs k, stage times,
and batched vs one-prompt-at-a-time generation, all in one run.

The task is small arithmetic ("What is 12 + 7?") with a verifier that reads the question from the prompt,
so TAO uses prompts only. The base is a tiny model given a short supervised warm-up on a few labeled
questions (weak, not random). Then:
  1. TAO: `rounds` rounds through the real learner (`learners.tao.Round`: select from the outcome table,
     generate k candidates, score, GRPO on a LoRA, gate on held-out prompts, publish), on unlabeled prompts.
  2. SFT: a LoRA of the same rank trained on the same prompts with their labels, same optimizer budget.
  3. Reward vs k: one TAO round per k in (2, 4, 8, 16) from the same base.
  4. Generation throughput: the same prompts x k samples, batched vs one prompt per generate() call.
Everything is measured on an evaluation set of questions no stage trained on (greedy decoding).

    python bench/tao.py [--rounds 5] [--steps 100] [--k 16] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learners.generation import TransformersGenerator, load_policy, render  # noqa: E402
from learners.records import RecordSink  # noqa: E402
from learners.tao import Round, current_adapter, recover, round_lock  # noqa: E402
from learners.tasks import arithmetic_prompts, arithmetic_reward, make_warm_model, sft_texts, supervised_train  # noqa: E402
from streams import store  # noqa: E402
from taoflow.settings import Settings  # noqa: E402


def seed_interactions(settings: Settings, prompts: list[str]) -> None:
    """Land prompts as if agents had sent them (responses are placeholders: TAO never reads them)."""
    con = store.connect(settings.core.duckdb_path)
    now = datetime.now(UTC)
    values = [
        (str(uuid.uuid4()), now, "bench", "math", "direct", p, False, hashlib.sha256(p.encode()).hexdigest(), "-",
         None, 1.0, "{}", 0, i, None, False)
        for i, p in enumerate(prompts)
    ]  # fmt: skip
    store.insert(con, "interactions", {c: [v[i] for v in values] for i, c in enumerate(store.COLUMNS["interactions"])})
    con.close()


def evaluate(base: str, adapter: Path | None, prompts: list[str]) -> float:
    model, tok = load_policy(base, adapter, device="cpu", dtype=None)
    gen = TransformersGenerator(model, tok, batch_size=128)
    out = gen.generate([render(p, tok) for p in prompts], n=1, temperature=1.0, max_new_tokens=4, greedy=True)
    rewards = arithmetic_reward([o[0] for o in out], prompts=prompts)
    return sum(r or 0.0 for r in rewards) / len(rewards)


def settings_for(data_dir: Path, base: str, *, k: int, steps: int, seed: int, lr: float) -> Settings:
    return Settings(overrides={
        "core": {"data_dir": data_dir, "base_model": base},
        "kafka": {"bootstrap": "127.0.0.1:9"},  # nothing listens: the learner writes the DuckDB file itself
        "learner": {"scorers": [{"type": "arithmetic"}], "k": k, "steps": steps, "max_new_tokens": 4,
                    "max_prompts": 1000, "learning_rate": lr, "batch_prompts": 8, "temperatures": [1.0],
                    "heldout_fraction": 0.2, "seed": seed, "lora_r": 16, "lora_alpha": 32},
    })  # fmt: skip


def tao_rounds(data_dir: Path, base: str, prompts: list[str], eval_prompts: list[str], *, rounds: int, k: int,
               steps: int, seed: int, lr: float, gate: bool = True) -> dict[str, Any]:  # fmt: skip
    settings = settings_for(data_dir, base, k=k, steps=steps, seed=seed, lr=lr)
    if not gate:  # measure what training did, whatever the gate would decide
        settings = Settings(overrides={**settings.overrides,
                                       "learner": {**settings.overrides["learner"], "gate_margin": -1.0}})  # fmt: skip
    seed_interactions(settings, prompts)
    history = []
    timings: dict[str, float] = {}
    for r in range(rounds):
        with round_lock(settings):
            sink = RecordSink(settings, prefer_kafka=False)
            recover(settings, sink)
            result = Round(settings, sink).run()
            sink.close()
        for stage, sec in result.timings.items():
            timings[stage] = timings.get(stage, 0.0) + sec
        cur = current_adapter(settings)
        score = evaluate(base, settings.core.adapters_dir / cur["adapter"] if cur else None, eval_prompts)
        history.append({"round": r + 1, "status": result.status, "eval": score, **{
            key: result.metrics.get(key) for key in ("heldout_reward_current", "heldout_reward_new", "gain_lcb",
                                                     "prompts_informative", "generation_tokens_per_s")}})  # fmt: skip
        print(f"  k={k} round {r + 1}: {result.status}, eval reward {score:.3f} "
              f"(gate: {result.metrics.get('heldout_reward_current')} -> {result.metrics.get('heldout_reward_new')})",
              flush=True)  # fmt: skip
    return {"history": history, "final": history[-1]["eval"], "timings": timings}


def labeled_sft(base: str, prompts: list[str], eval_prompts: list[str], *, steps: int, lr: float, seed: int) -> float:
    from peft import LoraConfig, get_peft_model

    model, tok = load_policy(base, None, device="cpu", dtype=None, trainable=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    supervised_train(model, tok, sft_texts(prompts, tok.eos_token), steps=steps, lr=lr, batch_size=32, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return evaluate(base, Path(tmp), eval_prompts)


def generation_throughput(base: str, prompts: list[str], k: int) -> dict[str, float]:
    """Tokens/s for k samples of each prompt: one sequence per generate() call, one prompt (its k samples)
    per call, and the learner's batching (many prompts per call). The slow ones run on a quarter of the prompts."""
    model, tok = load_policy(base, None, device="cpu", dtype=None)
    texts = [render(p, tok) for p in prompts]
    out = {}
    for label, batch, n, subset in (("one_sequence_at_a_time", 1, 1, texts[: len(texts) // 4]),
                                    ("one_prompt_at_a_time", k, k, texts[: len(texts) // 4]),
                                    ("batched", 64 * k, k, texts)):  # fmt: skip
        gen = TransformersGenerator(model, tok, batch_size=batch)
        t0 = time.perf_counter()
        for _ in range(k // n):  # one sequence at a time: k calls per prompt
            gen.generate(subset, n=n, temperature=1.0, max_new_tokens=8)
        out[label] = gen.tokens / (time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=100, help="GRPO steps per round")
    ap.add_argument("--prompts", type=int, default=600, help="unlabeled prompts landed for TAO")
    ap.add_argument("--eval", type=int, default=200, help="evaluation prompts (never trained on)")
    ap.add_argument("--warm-steps", type=int, default=200)
    ap.add_argument("--warm-examples", type=int, default=60)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ks", default="2,4,8,16")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    t_start = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="taoflow-bench-tao-") as tmp:
        root = Path(tmp)
        base = str(make_warm_model(root / "warm", steps=args.warm_steps, examples=args.warm_examples, seed=args.seed))
        warm = set(arithmetic_prompts(args.warm_examples, seed=args.seed + 1000))
        pool = arithmetic_prompts(args.prompts + args.eval + len(warm), seed=args.seed + 7)
        pool = [p for p in pool if p not in warm]
        eval_prompts, train_prompts = pool[: args.eval], pool[args.eval : args.eval + args.prompts]
        results["prompts"] = {"train (unlabeled)": len(train_prompts), "eval": len(eval_prompts)}
        results["base"] = evaluate(base, None, eval_prompts)
        print(f"base (warm-up only): eval reward {results['base']:.3f}", flush=True)
        t0 = time.perf_counter()
        tao = tao_rounds(root / "tao", base, train_prompts, eval_prompts, rounds=args.rounds, k=args.k,
                         steps=args.steps, seed=args.seed, lr=args.lr)  # fmt: skip
        results["tao"] = {**tao, "seconds": time.perf_counter() - t0}
        budget = args.rounds * args.steps
        results["sft"] = labeled_sft(base, train_prompts, eval_prompts, steps=budget, lr=args.lr, seed=args.seed)
        print(f"labeled SFT ({budget} steps): eval reward {results['sft']:.3f}", flush=True)
        results["by_k"] = {}
        for k in [int(x) for x in args.ks.split(",")]:
            r = tao_rounds(root / f"k{k}", base, train_prompts, eval_prompts, rounds=1, k=k, steps=args.steps,
                           seed=args.seed, lr=args.lr, gate=False)  # fmt: skip
            results["by_k"][k] = r["final"]
        results["generation"] = generation_throughput(base, train_prompts[:64], args.k)
    results["seconds"] = time.perf_counter() - t_start
    g = results["generation"]
    print(json.dumps(results, indent=1, default=str))
    print(f"\nbase {results['base']:.3f} | TAO {results['tao']['final']:.3f} | labeled SFT {results['sft']:.3f}")
    print("reward vs k: " + ", ".join(f"k={k}: {v:.3f}" for k, v in results["by_k"].items()))
    print(f"generation: batched {g['batched']:.0f} tok/s = {g['batched'] / g['one_sequence_at_a_time']:.1f}x one "
          f"sequence per call ({g['one_sequence_at_a_time']:.0f}), {g['batched'] / g['one_prompt_at_a_time']:.1f}x one "
          f"prompt per call ({g['one_prompt_at_a_time']:.0f}); total {results['seconds']:.0f}s")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
