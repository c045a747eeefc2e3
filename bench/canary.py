"""Release decisions by simulation: how often a canary is promoted or rolled back, and after how many rewards, under
the sequential test (`serving.release`) and under the utility rule it replaces, measured the same way.

Each simulated canary sees a stream of rewards: every reward comes from the canary with probability
`canary_fraction` (the gateway's default share), else from the incumbent; rewards are Bernoulli (success/failure)
or continuous (Beta, same means). Cases: equal quality, canary +0.05 better, canary -0.05 worse, and a regression
after promotion (the canary is +0.05 better until promoted, then 0.10 worse than its predecessor, which keeps
`watch_fraction` of the traffic). The sequential test is evaluated after every reward (vectorised across canaries);
the utility rule runs the gateway's real `Router` on ACT-R utilities, as the stream would update them.

    python bench/canary.py [--canaries 1000] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.release import SequentialTest, radius  # noqa: E402

BASE_MEAN = 0.5


@dataclass
class Outcome:
    promoted: float
    rolled_back: float
    expired: float
    rewards_median: float  # canary rewards when decided (promoted or rolled back)
    rewards_p80: float
    seconds: float


def _rewards(rng: np.random.Generator, mean: np.ndarray, kind: str) -> np.ndarray:
    if kind == "bernoulli":
        return (rng.random(mean.shape) < mean).astype(np.float64)
    k = 4.0  # Beta(k m, k (1 - m)): mean m, variance m (1 - m) / 5
    return rng.beta(k * mean, k * (1 - mean))


def sequential(
    rng: np.random.Generator, n: int, delta: float, kind: str, rule: SequentialTest, share: float, block: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Per canary: the verdict (1 promote, -1 roll back, 0 expired) and the canary rewards when it was reached."""
    verdict = np.zeros(n, dtype=np.int8)
    at = np.full(n, rule.max_rewards, dtype=np.int64)
    open_ = np.arange(n)
    s = np.zeros((n, 2))  # sum, per side (0 canary, 1 reference)
    q = np.zeros((n, 2))  # sum of squares
    c = np.zeros((n, 2), dtype=np.int64)
    while open_.size:
        m = open_.size
        is_c = rng.random((m, block)) < share
        mean = np.where(is_c, BASE_MEAN + delta, BASE_MEAN)
        r = _rewards(rng, mean, kind)
        rc, rr = np.where(is_c, r, 0.0), np.where(is_c, 0.0, r)
        nc = c[open_, 0, None] + np.cumsum(is_c, axis=1)
        nr = c[open_, 1, None] + np.cumsum(~is_c, axis=1)
        sc = s[open_, 0, None] + np.cumsum(rc, axis=1)
        sr = s[open_, 1, None] + np.cumsum(rr, axis=1)
        qc = q[open_, 0, None] + np.cumsum(rc * rc, axis=1)
        qr = q[open_, 1, None] + np.cumsum(rr * rr, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            mc, mr = sc / np.maximum(nc, 1), sr / np.maximum(nr, 1)
            vc = np.where(nc > 1, np.maximum((qc - nc * mc * mc) / (nc - 1), 1e-4), 0.25)
            vr = np.where(nr > 1, np.maximum((qr - nr * mr * mr) / (nr - 1), 1e-4), 0.25)
            var = vc / np.maximum(nc, 1) + vr / np.maximum(nr, 1)
            rad = radius(var, rule.tau, rule.alpha, log=np.log)
        diff = mc - mr
        ready = (nc >= rule.min_rewards) & (nr >= rule.min_rewards)
        promote = ready & (diff - rad > rule.min_effect)
        rollback = ready & (diff + rad < -rule.margin)
        expire = nc >= rule.max_rewards
        hit = promote | rollback | expire
        first = np.where(hit.any(axis=1), hit.argmax(axis=1), -1)
        done = first >= 0
        idx = open_[done]
        f = first[done]
        rows = np.nonzero(done)[0]
        verdict[idx] = np.where(promote[rows, f], 1, np.where(rollback[rows, f], -1, 0))
        at[idx] = nc[rows, f]
        keep = ~done
        for arr, a, b in ((c, nc, nr), (s, sc, sr), (q, qc, qr)):
            arr[open_[keep], 0] = a[keep, -1]
            arr[open_[keep], 1] = b[keep, -1]
        open_ = open_[keep]
    return verdict, at


def utility_rule(
    rng: np.random.Generator, n: int, delta: float, kind: str, share: float, after_delta: float | None = None,
    max_steps: int = 200_000, alpha: float = 0.2, initial: float = 0.0, need: int = 20, margin: float = 0.1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """The gateway's previous rule (before the sequential test, commit a34ee90): ACT-R utilities (alpha 0.2, from
    0), bias-corrected; promote once the canary has `need` rewards and is ahead, roll back when it is behind by
    `margin`; after a promotion the predecessor keeps the canary's share and the promoted adapter is rolled back
    when, `need` rewards later, it is behind by `margin`. Vectorised across canaries, one reward per step.
    With `after_delta`, a promoted canary's quality changes to that; `later` marks the promoted ones rolled back."""

    def unbiased(u: np.ndarray, k: np.ndarray) -> np.ndarray:
        left = (1 - alpha) ** k
        return np.where(k > 0, (u - left * initial) / np.maximum(1 - left, 1e-300), initial)

    verdict = np.zeros(n, dtype=np.int8)
    at = np.zeros(n, dtype=np.int64)
    later = np.zeros(n, dtype=np.int8)
    u = np.full((n, 2), initial)  # column 0: the canary (then the promoted adapter), 1: the incumbent / predecessor
    k = np.zeros((n, 2), dtype=np.int64)
    quality = np.stack([np.full(n, BASE_MEAN + delta), np.full(n, BASE_MEAN)], axis=1)
    promoted_at = np.zeros(n, dtype=np.int64)
    live = np.ones(n, dtype=bool)  # still being decided (a canary, or a promotion still watched)
    rows = np.arange(n)
    for _step in range(max_steps):
        if not live.any():
            break
        canary_share = np.where(verdict == 1, 1 - share, share)  # promoted: the predecessor keeps `share`
        side = np.where(rng.random(n) < canary_share, 0, 1)
        r = _rewards(rng, quality[rows, side], kind)
        upd = live
        u[rows[upd], side[upd]] += alpha * (r[upd] - u[rows[upd], side[upd]])
        k[rows[upd], side[upd]] += 1
        both = (k[:, 0] > 0) & (k[:, 1] > 0)
        diff = np.where(both, unbiased(u[:, 0], k[:, 0]) - unbiased(u[:, 1], k[:, 1]), 0.0)
        deciding = live & (verdict == 0) & both & (k[:, 0] >= need)
        up = deciding & (diff > 0)
        down = deciding & (diff < -margin)
        verdict[up], at[up] = 1, k[up, 0]
        verdict[down], at[down] = -1, k[down, 0]
        live &= ~down
        if after_delta is None:
            live &= ~up
        else:
            quality[up, 0] = BASE_MEAN + after_delta
            promoted_at[up] = k[up, 0]
            watched = live & (verdict == 1) & ~up & (k[:, 0] - promoted_at >= need) & (diff < -margin)
            later[watched] = -1
            live &= ~watched
    return verdict, at, later


def watch(
    rng: np.random.Generator, n: int, after_delta: float, kind: str, rule: SequentialTest, share: float
) -> np.ndarray:
    """After promotion: the promoted adapter (challenger) against its predecessor (share of traffic), fresh window;
    returns the rewards of the promoted adapter until rolled back (max_rewards: not rolled back)."""
    verdict, at = sequential(rng, n, after_delta, kind, rule, 1 - share)
    return np.where(verdict == -1, at, -1)


def _summary(verdict: np.ndarray, at: np.ndarray, seconds: float) -> Outcome:
    decided = at[verdict != 0]
    return Outcome(
        promoted=float((verdict == 1).mean()),
        rolled_back=float((verdict == -1).mean()),
        expired=float((verdict == 0).mean()),
        rewards_median=float(np.median(decided)) if decided.size else float("nan"),
        rewards_p80=float(np.percentile(decided, 80)) if decided.size else float("nan"),
        seconds=seconds,
    )


def run(
    canaries: int,
    seed: int,
    rule: SequentialTest,
    share: float = 0.1,
    kinds: tuple[str, ...] = ("bernoulli", "beta"),
    current: bool = True,
) -> dict[tuple[str, str, str], Any]:
    """Every case for both rules; keys (rule, kind, case)."""
    out: dict[tuple[str, str, str], Any] = {}
    for kind in kinds:
        for case, delta in (("equal", 0.0), ("better +0.05", 0.05), ("worse -0.05", -0.05)):
            rng = np.random.default_rng([seed, hash(kind) % 1000, int(delta * 100) + 50])
            t = time.perf_counter()
            v, a = sequential(rng, canaries, delta, kind, rule, share)
            out[("sequential", kind, case)] = _summary(v, a, time.perf_counter() - t)
            if current:
                t = time.perf_counter()
                v, a, _ = utility_rule(rng, canaries, delta, kind, share)
                out[("utility", kind, case)] = _summary(v, a, time.perf_counter() - t)
        # a regression after promotion: +0.05 until promoted, then -0.10 against the predecessor
        rng = np.random.default_rng([seed, hash(kind) % 1000, 999])
        t = time.perf_counter()
        v, _ = sequential(rng, canaries, 0.05, kind, rule, share)
        promoted = int((v == 1).sum())
        back = watch(rng, promoted, -0.10, kind, rule, share)
        rolled = back[back >= 0]
        out[("sequential", kind, "regression after promotion")] = Outcome(
            promoted=promoted / canaries, rolled_back=float((back >= 0).mean()) if promoted else float("nan"),
            expired=float((back < 0).mean()) if promoted else float("nan"),
            rewards_median=float(np.median(rolled)) if rolled.size else float("nan"),
            rewards_p80=float(np.percentile(rolled, 80)) if rolled.size else float("nan"),
            seconds=time.perf_counter() - t,
        )  # fmt: skip
        if current:
            t = time.perf_counter()
            v, a, later = utility_rule(rng, canaries, 0.05, kind, share, after_delta=-0.10)
            promoted = int((v == 1).sum())
            out[("utility", kind, "regression after promotion")] = Outcome(
                promoted=promoted / canaries,
                rolled_back=float((later[v == 1] == -1).mean()) if promoted else float("nan"),
                expired=float((later[v == 1] == 0).mean()) if promoted else float("nan"),
                rewards_median=float("nan"), rewards_p80=float("nan"), seconds=time.perf_counter() - t,
            )  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--canaries", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--share", type=float, default=0.1, help="the canary's share of traffic")
    args = ap.parse_args()
    rule = SequentialTest()  # the gateway's defaults; evaluated here vectorised across canaries
    t0 = time.perf_counter()
    results = run(args.canaries, args.seed, rule, args.share)
    print(f"{args.canaries} canaries per case, canary share {args.share}, seed {args.seed}; sequential rule: "
          f"alpha {rule.alpha}, tau {rule.tau}, min {rule.min_rewards} rewards per side, cap {rule.max_rewards} "
          f"canary rewards; {time.perf_counter() - t0:.0f} s")  # fmt: skip
    print(
        "| rule | rewards | case | promoted | rolled back | undecided at cap | canary rewards to decide: median | p80 |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (name, kind, case), o in results.items():
        print(f"| {name} | {kind} | {case} | {o.promoted:.3f} | {o.rolled_back:.3f} | {o.expired:.3f} | "
              f"{o.rewards_median:.0f} | {o.rewards_p80:.0f} |")  # fmt: skip
    print(
        "regression after promotion: 'promoted' is the share promoted first; 'rolled back' and 'undecided' are "
        "shares of the promoted ones; rewards are the promoted adapter's until its rollback"
    )


if __name__ == "__main__":
    main()
