"""The gate's false-publish rate with no-op adapters: at most its stated level (1 - gate_confidence) per lineage.

End to end: `--rounds` rounds through the real learner (`learners.tao.Round`) whose update is a no-op: the adapter
it gates is a fresh LoRA with B = 0 (zero LoRA), so it answers exactly as its parent and any gain is noise. Three
settings, each its own lineage:
  served        the gate as the gateway samples (both policies with the same seed: common random numbers)
  independent   the new adapter sampled with a different seed than its parent (a no-gain adapter whose
                answers still differ by sampling noise: the hard case for the statistics)
  unspent       as independent, with alpha spending off (every round at 1 - gate_confidence): the problem
                that spending fixes, about 1 round in 10 published
Then the statistics alone, over many lineages (`--lineages` of `--rounds` no-gain rounds, paired held-out rewards
drawn as the end-to-end rounds produce them): the share of lineages that ever publish a no-gain adapter.

    python bench/gate_calibration.py [--rounds 50] [--lineages 400]
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learners.gate import decide, spent_alpha  # noqa: E402
from learners.records import RecordSink  # noqa: E402
from learners.state import round_lock  # noqa: E402
from learners.tao import Round  # noqa: E402
from learners.tasks import arithmetic_prompts, make_warm_model  # noqa: E402
from taoflow.settings import Settings  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from tao import land  # noqa: E402


class NoOpRound(Round):
    """A round whose update is a zero LoRA (the parent's answers exactly); optionally sampled with its own seed."""

    independent = False

    def train(self, sets: Any, out: Path) -> None:
        from peft import get_peft_model

        from learners.generation import load_policy
        from learners.trainers.common import lora_config, save_adapter

        model, _ = load_policy(self.base_model, None, device="cpu", dtype=None, trainable=True)
        save_adapter(get_peft_model(model, lora_config(self.cfg)), out)

    def respond(self, prompts: list[Any], adapter: Path | None) -> list[list[str]]:
        if not self.independent or adapter == self.parent:
            return super().respond(prompts, adapter)
        self.seed += 7919  # the new side draws its own samples
        try:
            return super().respond(prompts, adapter)
        finally:
            self.seed -= 7919


def lineage(data_dir: Path, base: Path, prompts: list[str], *, rounds: int, independent: bool, spending: str,
            label: str) -> dict[str, Any]:  # fmt: skip
    settings = Settings(overrides={
        "core": {"data_dir": data_dir, "base_model": str(base)},
        "kafka": {"bootstrap": "127.0.0.1:9"},
        "learner": {"scorers": [{"type": "arithmetic"}], "k": 2, "k_max": 2, "steps": 1, "max_new_tokens": 4,
                    "max_prompts": 1000, "temperatures": [1.0], "heldout_fraction": 0.3, "gate_samples": 4,
                    "gate_alpha_spending": spending, "parent_from": "published", "seed": 0},
    })  # fmt: skip
    land(settings, [("math", p, "") for p in prompts])
    published, diffs = 0, []
    cls = type("R", (NoOpRound,), {"independent": independent})
    t0 = time.perf_counter()
    for r in range(rounds):
        with round_lock(settings), RecordSink(settings, prefer_kafka=False) as sink:
            res = cls(settings, sink).run()
        if res.status == "failed":
            raise RuntimeError(res.error)
        published += res.status == "published"
        diffs.append(res.metrics.get("gain", 0.0))
        if (r + 1) % 10 == 0:
            print(f"  {label}: {r + 1}/{rounds} rounds, {published} published ({time.perf_counter() - t0:.0f}s)",
                  flush=True)  # fmt: skip
    return {"rounds": rounds, "published": published, "seconds": time.perf_counter() - t0}


def simulated(lineages: int, rounds: int, alpha: float, n: int, samples: int, seed: int) -> dict[str, float]:
    """Share of no-gain lineages that ever publish, and of rounds published, with and without spending."""
    rng = random.Random(seed)
    out = {}
    for policy in ("basel", "none"):
        ever = rounds_published = 0
        for _ in range(lineages):
            index, any_pub = 1, False
            for r in range(rounds):
                rates = [rng.random() for _ in range(n)]
                draw = [[sum(rng.random() < p for _ in range(samples)) / samples for p in rates] for _ in (0, 1)]
                d = decide(draw[0], draw[1], ["t"] * n, alpha=spent_alpha(alpha, index, policy), margin=0.0,
                           task_margin=1.0, seed=r)  # fmt: skip
                if d.publish:
                    any_pub, index, rounds_published = True, 1, rounds_published + 1
                else:
                    index += 1
            ever += any_pub
        out[f"{policy}_lineages_ever_published"] = ever / lineages
        out[f"{policy}_rounds_published"] = rounds_published / (lineages * rounds)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--lineages", type=int, default=400)
    ap.add_argument("--statistics-only", action="store_true", help="skip the rounds through the learner")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (more than the free cores thrashes)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("learners").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    alpha = 0.1  # 1 - gate_confidence (the default 0.9)
    results = {}
    settings = [("served", False, "basel"), ("independent", True, "basel"), ("unspent", True, "none")]
    with tempfile.TemporaryDirectory(prefix="taoflow-bench-gate-") as tmp:
        root = Path(tmp)
        prompts = arithmetic_prompts(60, seed=5)
        for label, independent, spending in [] if args.statistics_only else settings:
            base = root / "warm"
            if not base.exists():
                make_warm_model(base, steps=200, examples=60)
            results[label] = lineage(root / label, base, prompts, rounds=args.rounds, independent=independent,
                                     spending=spending, label=label)  # fmt: skip
    sim = simulated(args.lineages, args.rounds, alpha, n=18, samples=4, seed=1)
    print(f"\nno-op rounds through the real learner, gate at 90% (alpha {alpha}), {args.rounds} rounds each:")
    for label, r in results.items():
        print(f"  {label:12s} published {r['published']}/{r['rounds']} ({r['seconds']:.0f}s)")
    print(f"statistics alone, {args.lineages} lineages x {args.rounds} no-gain rounds: lineages that ever publish "
          f"{sim['basel_lineages_ever_published']:.3f} with basel spending (stated level {alpha}), "
          f"{sim['none_lineages_ever_published']:.3f} without; rounds published {sim['basel_rounds_published']:.4f} "
          f"vs {sim['none_rounds_published']:.4f}")  # fmt: skip
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
