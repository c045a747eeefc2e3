"""Where a round's training runs, and the entry point of the training process. The trainers themselves, one per
algorithm, are `learners.trainers` (`grpo`, `rft`, `dpo`); `train(kind, ...)` runs one of them where `placement` says.

On CUDA, by default, in a child process (`python -m learners.training JOB`) whose CUDA_VISIBLE_DEVICES names only the
selected GPU (`learner.device`, `cuda:1` included). That is what selects a GPU for the Trainer: without a distributed
launcher it takes `cuda:0` and wraps the model in DataParallel over every visible GPU, which TRL's trainers refuse,
and CUDA_VISIBLE_DEVICES cannot change in a process that has already used CUDA. The child also returns all of
training's GPU memory when it exits. Several GPUs: `learner.accelerate_config` runs the child under `accelerate
launch` (DDP, DeepSpeed ZeRO-2, FSDP; examples in deploy/accelerate/). On CPU training runs in the learner's process
(`learner.train_process` says otherwise).

GRPO samples its own completions; with the vLLM backend it does so through TRL's vLLM integration
(`learners.trainers.grpo.grpo_sampling`: colocated by default, or a `trl vllm-serve` server), where TRL merges the
LoRA into the engine's weights after each step. Sampling is explicit there too (top_k off, no repetition penalty), as
in `learners.generation.Sampling`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from learners.exceptions import LearnerError
from learners.generation import cuda_index, physical_gpu
from learners.rewards.composite import CompositeScorer
from learners.rewards.registry import build_scorer
from learners.rewards.specs import ScorerSpec
from learners.trainers.dpo import train_offline
from learners.trainers.grpo import train_grpo
from learners.trainers.rft import train_rft

log = logging.getLogger(__name__)

PROGRESS = "taoflow-train-progress"
_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RUN_ID")  # fmt: skip


@dataclass(frozen=True)
class Placement:
    """Where a round trains: `child` (a process of its own) or inline; `device` is the trainer's device in that
    process; `cuda_visible` the child's CUDA_VISIBLE_DEVICES; `accelerate_config` its `accelerate launch` config."""

    child: bool
    device: str
    cuda_visible: str | None = None
    accelerate_config: Path | None = None


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        return 1


def placement(cfg: Any, device: str) -> Placement:
    """Where training runs for `learner.train_process` and the resolved `device` (see the module docstring)."""
    import torch

    cuda = device.startswith("cuda")
    gpus = torch.cuda.device_count() if cuda else 0
    mode = getattr(cfg, "train_process", "auto")
    launch = getattr(cfg, "accelerate_config", None)
    if launch is not None:
        return Placement(True, "cuda" if cuda else device, None, Path(launch))
    if mode == "inline" or (mode == "auto" and not cuda):
        if cuda and gpus > 1 and _world_size() <= 1:
            raise LearnerError(
                f"learner.train_process 'inline' with {gpus} GPUs visible: the Trainer would wrap the model in "
                "DataParallel, which TRL's trainers refuse. Use train_process auto (a training process that sees only "
                f"{device}), start the learner with CUDA_VISIBLE_DEVICES naming one GPU, or set accelerate_config"
            )
        return Placement(False, device)
    if not cuda:
        return Placement(True, device)
    index = cuda_index(device) or 0
    visible = physical_gpu(index)
    if gpus > 1:
        log.info(
            "%d GPUs visible and no `accelerate launch`: training runs on GPU %d only (CUDA_VISIBLE_DEVICES=%s in the "
            "training process), as TRL's trainers refuse DataParallel; for several GPUs set learner.accelerate_config "
            "(DDP, DeepSpeed ZeRO-2, FSDP: deploy/accelerate/)",
            gpus, index, visible,
        )  # fmt: skip
    return Placement(True, "cuda", visible)


def child_command(place: Placement, job: Path) -> list[str]:
    if place.accelerate_config is not None:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(place.accelerate_config),
                "-m", "learners.training", str(job)]  # fmt: skip
    return [sys.executable, "-m", "learners.training", str(job)]


def child_env(place: Placement) -> dict[str, str]:
    """The learner's environment, less any launcher variables (a single-process child is not a rank; accelerate
    sets its own), with the selected GPU alone visible, and this process's import path (scorer callables)."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
    if place.cuda_visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = place.cuda_visible
    env["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in sys.path)
    return env


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if value is not None and type(value).__module__ == "torch":  # a torch.dtype
        return str(value).removeprefix("torch.")
    return value


def run_child(cmd: list[str], env: dict[str, str], progress: Callable[[int], None] | None) -> tuple[int, list[str]]:
    """Run the training process to its end: its progress lines drive `progress`, the rest is logged at debug level.
    Returns its exit status and its last lines of output. It is killed (its whole process group) if this returns
    early; it exits by itself if the learner dies (`_watch_parent`)."""
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    tail: deque[str] = deque(maxlen=40)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(PROGRESS):
                if progress:
                    progress(int(line.split()[1]))
                continue
            tail.append(line.rstrip())
            log.debug("training process: %s", line.rstrip())
        return proc.wait(), list(tail)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def train_in_child(
    kind: str,
    cfg: Any,
    *,
    place: Placement,
    scorer_specs: list[dict[str, Any]],
    progress: Callable[[int], None] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """`train_<kind>(cfg, **kwargs)` in a child process placed as `place` says; its metrics."""
    with tempfile.TemporaryDirectory(prefix="taoflow-train-") as tmp:
        result_path = Path(tmp) / "result.json"
        job = {
            "kind": kind,
            "cfg": cfg.model_dump(mode="json") if hasattr(cfg, "model_dump") else dict(vars(cfg)),
            "scorers": scorer_specs,
            "device": place.device,
            "parent_pid": os.getpid(),
            "result": str(result_path),
            "kwargs": {k: _jsonable(v) for k, v in kwargs.items()},
        }
        job_path = Path(tmp) / "job.json"
        job_path.write_text(json.dumps(job, default=str))
        rc, tail = run_child(child_command(place, job_path), child_env(place), progress)
        try:
            result = json.loads(result_path.read_text())
        except (OSError, ValueError):
            result = {}
    if "error" in result:
        raise LearnerError(str(result["error"]))
    if rc != 0 or "metrics" not in result:
        last = "\n".join(tail[-15:])
        raise LearnerError(f"the training process exited with status {rc}; its last lines:\n{last}")
    return {k: float(v) for k, v in result["metrics"].items()}


def train(
    kind: str,
    cfg: Any,
    *,
    place: Placement,
    scorer: CompositeScorer | None = None,
    scorer_specs: list[dict[str, Any]] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """One of `train_grpo` / `train_rft` / `train_offline` (`kind`: grpo, rft, offline), where `place` says."""
    if kind not in _TRAINERS:
        raise LearnerError(f"unknown training kind {kind!r}")
    if place.child:
        return train_in_child(kind, cfg, place=place, scorer_specs=scorer_specs or [], **kwargs)
    if kind == "grpo":
        kwargs["scorer"] = scorer
    return _TRAINERS[kind](cfg, device=place.device, **kwargs)


def _watch_parent(pid: int) -> None:
    """Exit when the learner that started this process is gone (a SIGKILLed learner cannot stop its children)."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(3)
            except PermissionError:
                pass

    threading.Thread(target=watch, name="taoflow-parent-watch", daemon=True).start()


def run_job(job: dict[str, Any]) -> dict[str, float]:
    """The training a child process was given (see `train_in_child`); the metrics it returns."""
    import torch
    from pydantic import TypeAdapter

    device = job["device"]
    if device == "cuda" and _world_size() > 1:  # a rank of `accelerate launch`: its own GPU
        device = f"cuda:{int(os.environ.get('LOCAL_RANK') or 0)}"
    main_rank = int(os.environ.get("RANK") or 0) == 0

    def progress(n: int) -> None:
        if main_rank:
            print(f"{PROGRESS} {n}", flush=True)

    kw = dict(job["kwargs"])
    for key in ("parent", "start", "out"):
        if kw.get(key) is not None:
            kw[key] = Path(kw[key])
    if kw.get("dtype") is not None:
        kw["dtype"] = getattr(torch, kw["dtype"])
    if job["kind"] == "grpo":
        specs = TypeAdapter(list[ScorerSpec]).validate_python(job["scorers"])
        kw["scorer"] = CompositeScorer([build_scorer(s, device=device) for s in specs])
    cfg = SimpleNamespace(**job["cfg"])
    return _TRAINERS[job["kind"]](cfg, device=device, progress=progress, **kw)


def main(argv: list[str] | None = None) -> int:
    """`python -m learners.training JOB.json`: the child process of `train_in_child`."""
    args = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(args[0]).read_text())
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _watch_parent(int(job["parent_pid"]))
    main_rank = int(os.environ.get("RANK") or 0) == 0
    try:
        metrics = run_job(job)
    except LearnerError as exc:
        if main_rank:
            Path(job["result"]).write_text(json.dumps({"error": str(exc)}))
        return 1
    if main_rank:
        Path(job["result"]).write_text(json.dumps({"metrics": metrics}))
    return 0


_TRAINERS: dict[str, Callable[..., dict[str, float]]] = {
    "grpo": train_grpo,
    "rft": train_rft,
    "offline": train_offline,
}

if __name__ == "__main__":
    sys.exit(main())
