"""The learner's GPU path: one vLLM engine per round, released around training; the vLLM version and thread
constraint; GRPO sampling through vLLM; device selection (a training process that sees one GPU); sampling
that is the same on every backend; the reward model's device.

Everything but the `gpu`-marked tests runs on CPU: vLLM is replaced by a stand-in module that speaks its API
(`LLM`, `SamplingParams`, `LoRARequest`), and CUDA by patching torch's device queries where a test needs GPUs.
The `gpu` tests run a real round on CUDA and are skipped without one.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import json
import logging
import os
import shutil
import sys
import threading
import tomllib
import types
from pathlib import Path
from typing import Any

import pytest
import torch

# TRL's trainers are imported before a test puts a stand-in `vllm` in sys.modules: TRL probes for vLLM on import
from trl import DPOTrainer, GRPOTrainer, SFTTrainer  # noqa: F401

from learners import training
from learners.exceptions import LearnerError
from learners.generation import (
    VLLM_THREAD_SAFE,
    Sampling,
    TransformersGenerator,
    VllmEngine,
    adapter_rank,
    check_vllm,
    load_policy,
    physical_gpu,
    resolve_device,
)
from learners.progress import Reporter
from learners.records import RecordSink
from learners.tao import Round, run_round
from learners.tasks import arithmetic_prompts, solve
from learners.trainers import common, grpo
from taoflow.lora import vllm_lora_rank
from tests.learners.conftest import announce, land_prompts, learner_settings, make_adapter

ROOT = Path(__file__).parents[2]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


# ---------------------------------------------------------------------------------------------------------------
# a stand-in for the `vllm` package: its API as the learner calls it, every call recorded


@dataclasses.dataclass
class FakeSamplingParams:
    """vLLM's SamplingParams fields the learner sets, with vLLM's defaults (top_k 0: off)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = 16
    seed: int | None = None


@dataclasses.dataclass
class FakeLoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str


class FakeVllm:
    """Installs `vllm`, `vllm.lora.request` into sys.modules; `events` records what the learner did with them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, version: str = "0.11.0", sleep: bool = True) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.engines: list[Any] = []
        events, engines = self.events, self.engines

        class LLM:
            def __init__(self, **kwargs: Any) -> None:
                self.kwargs = kwargs
                self.visible = os.environ.get("CUDA_VISIBLE_DEVICES")
                self.llm_engine = types.SimpleNamespace(
                    engine_core=types.SimpleNamespace(shutdown=lambda: events.append(("shutdown",)))
                )
                engines.append(self)
                events.append(("build",))

            def generate(self, prompts: list[str], params: Any, lora_request: Any = None, use_tqdm: bool = True) -> Any:
                events.append(("generate", lora_request, params))
                out = []
                for prompt in prompts:
                    answer = solve(prompt)
                    # half the samples right, half wrong: every prompt carries signal for GRPO and the gate
                    texts = [f" {(answer or 0) + (i % 2)}" for i in range(params.n)]
                    out.append(
                        types.SimpleNamespace(outputs=[types.SimpleNamespace(text=t, token_ids=[7, 8]) for t in texts])
                    )
                return out

        if sleep:

            def do_sleep(self: Any, level: int = 1) -> None:
                events.append(("sleep", level))

            def wake_up(self: Any, tags: Any = None) -> None:
                events.append(("wake_up",))

            LLM.sleep = do_sleep  # type: ignore[attr-defined]
            LLM.wake_up = wake_up  # type: ignore[attr-defined]

        vllm = types.ModuleType("vllm")
        vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
        vllm.__version__ = version  # type: ignore[attr-defined]
        vllm.LLM = LLM  # type: ignore[attr-defined]
        vllm.SamplingParams = FakeSamplingParams  # type: ignore[attr-defined]
        lora = types.ModuleType("vllm.lora")
        request = types.ModuleType("vllm.lora.request")
        request.LoRARequest = FakeLoRARequest  # type: ignore[attr-defined]
        for name, module in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
            monkeypatch.setitem(sys.modules, name, module)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append(("empty_cache",)))

    def names(self) -> list[str]:
        return [e[0] for e in self.events]


class RecordingReporter(Reporter):
    def __init__(self, events: list[tuple[Any, ...]]) -> None:
        self.events = events

    def stage(self, name: str, total: int | None = None) -> None:
        self.events.append((f"stage:{name}",))

    def advance(self, n: int = 1) -> None:
        self.events.append(("advance",))

    def done(self, name: str, seconds: float, note: str = "") -> None:
        self.events.append((f"done:{name}",))


# ---------------------------------------------------------------------------------------------------------------
# 1. one vLLM engine per round


def _vllm_round(tmp_path: Path, warm_model: Path, fake: FakeVllm, **learner: Any) -> tuple[Any, Path, Any]:
    settings = learner_settings(
        tmp_path / "d", warm_model, backend="vllm", grpo_vllm_mode="off", lora_r=12, steps=1, max_prompts=24,
        gate_margin=-1.0, gate_task_margin=1.0, vllm_gpu_memory_utilization=0.42, **learner,
    )  # fmt: skip
    land_prompts(settings, arithmetic_prompts(24, seed=41))
    parent = make_adapter(settings, "parent-a", r=12)
    announce(settings, "parent-a", "published", "promoted")
    with RecordSink(settings, prefer_kafka=False) as sink:
        result = Round(settings, sink, RecordingReporter(fake.events)).run()
    return result, parent, settings


def test_a_vllm_round_builds_one_engine_serving_parent_and_new_adapter_and_sleeps_through_training(
    tmp_path, warm_model, monkeypatch
) -> None:
    fake = FakeVllm(monkeypatch)
    result, parent, _ = _vllm_round(tmp_path, warm_model, fake)
    assert result.status == "published", result

    (engine,) = fake.engines  # generation and both gate policies on one engine
    kw = engine.kwargs
    assert kw["enable_lora"] is True and kw["max_loras"] >= 2 and kw["enable_sleep_mode"] is True
    assert kw["max_lora_rank"] == 16 == vllm_lora_rank(12), "r=12 rounds up to a rank vLLM accepts"
    assert kw["gpu_memory_utilization"] == 0.42 and kw["dtype"] == "float32"
    assert result.metrics["vllm_engines_built"] == 1.0

    names = fake.names()
    gens = [e for e in fake.events if e[0] == "generate"]
    parent_req = gens[0][1]
    assert parent_req.lora_path == str(parent.resolve()), "generation samples from the served parent"
    gate = [e[1] for e in fake.events[names.index("stage:gate") :] if e[0] == "generate"]
    assert len(gate) == 2 and gate[0] == parent_req, "the gate's parent is the same LoRA request, not a reload"
    new_req = gate[1]
    assert new_req.lora_int_id != parent_req.lora_int_id and new_req.lora_path.endswith("adapter")

    # the engine sleeps before the first optimizer step, PyTorch's cache is emptied after the last, then it wakes
    first_step = names.index("advance", names.index("stage:train"))
    last_step = max(i for i, n in enumerate(names) if n == "advance" and i < names.index("done:train"))
    assert names.index("sleep") < first_step and fake.events[names.index("sleep")] == ("sleep", 1)
    assert "empty_cache" in names[last_step : names.index("wake_up")]
    assert names.index("done:train") < names.index("wake_up") < names.index("generate", names.index("stage:gate"))
    assert names.count("wake_up") == 1 and names[-1] == "empty_cache" and "shutdown" in names[-3:]


def test_without_sleep_mode_the_engine_is_deleted_for_training_and_built_again_for_the_gate(
    tmp_path, warm_model, monkeypatch
) -> None:
    fake = FakeVllm(monkeypatch, sleep=False)
    result, _, _ = _vllm_round(tmp_path, warm_model, fake)
    assert result.status == "published", result
    names = fake.names()
    assert names.count("build") == 2 and result.metrics["vllm_engines_built"] == 2.0
    first_step = names.index("advance", names.index("stage:train"))
    assert names.index("shutdown") < first_step < names.index("build", names.index("stage:train"))
    rebuild = names.index("build", names.index("stage:train"))
    assert "empty_cache" in names[first_step:rebuild], "training's cached memory is returned before the rebuild"
    assert all("enable_sleep_mode" not in e.kwargs for e in fake.engines)


def test_the_engine_is_sized_for_the_parents_real_rank_and_sees_only_the_selected_gpu(
    tmp_path, warm_model, monkeypatch
) -> None:
    fake = FakeVllm(monkeypatch)
    settings = learner_settings(tmp_path / "d", warm_model)
    parent = make_adapter(settings, "wide", r=24)
    doc = json.loads((parent / "adapter_config.json").read_text())
    doc["rank_pattern"] = {"q_proj": 40}
    (parent / "adapter_config.json").write_text(json.dumps(doc))
    assert adapter_rank(parent) == 40 and adapter_rank(None) == 0

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    engine = VllmEngine(
        str(warm_model), max_lora_rank=vllm_lora_rank(max(8, adapter_rank(parent))), dtype="bfloat16", seed=3,
        gpu_memory_utilization=0.3, device="cuda:1",
    )  # fmt: skip
    gen = engine.generator(parent)
    out = gen.generate(["Order 1: What is 2 + 3?"], n=2, temperature=0.7, max_new_tokens=4)
    assert out == [[" 5", " 6"]] and gen.tokens == 4
    (llm,) = fake.engines
    assert llm.kwargs["max_lora_rank"] == 64 and llm.visible == "5", "the engine's process sees GPU 1 of '2,5'"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,5", "the learner's own environment is restored"
    assert engine.generator(parent).engine.lora(parent) == engine.lora(parent), "one LoRA id per adapter"
    engine.close()
    assert fake.names()[-2:] == ["shutdown", "empty_cache"] and engine.llm is None


# ---------------------------------------------------------------------------------------------------------------
# 2. vLLM's thread constraint: the extra pins a version without it, and an older one is refused by name


def _in_thread(fn: Any) -> BaseException | Any:
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as exc:
            box.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return box[0]


def test_an_old_vllm_is_refused_outside_the_main_thread_and_the_gpu_extra_pins_a_newer_one(
    monkeypatch, tmp_path, warm_model
) -> None:
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert extra == [f"vllm>={VLLM_THREAD_SAFE}"] and VLLM_THREAD_SAFE == "0.10.2"

    FakeVllm(monkeypatch, version="0.10.1")
    assert check_vllm() == "0.10.1", "the main thread can build an engine on any version"
    err = _in_thread(check_vllm)
    assert isinstance(err, LearnerError) and "vLLM 0.10.1" in str(err) and "vllm>=0.10.2" in str(err)

    # a scheduled round (a background thread) fails at its start, before it generates anything
    settings = learner_settings(tmp_path / "d", warm_model, backend="vllm")

    def start_round() -> Any:
        with RecordSink(settings, prefer_kafka=False) as sink:
            return Round(settings, sink)

    assert isinstance(_in_thread(start_round), LearnerError)

    FakeVllm(monkeypatch, version="0.10.2")
    assert _in_thread(check_vllm) == "0.10.2"
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed
    with pytest.raises(LearnerError, match=r"taoflow\[gpu\]"):
        check_vllm()


# ---------------------------------------------------------------------------------------------------------------
# 3. GRPO samples through vLLM


@pytest.mark.parametrize(
    ("backend", "mode", "installed", "want"),
    [
        ("vllm", "colocate", True, {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.35}),
        ("vllm", "server", True, {"use_vllm": True, "vllm_mode": "server", "vllm_server_host": "10.1.2.3",
                                  "vllm_server_port": 8123}),
        ("vllm", "off", True, {"use_vllm": False}),
        ("vllm", "colocate", False, {"use_vllm": False}),
        ("transformers", "colocate", True, {"use_vllm": False}),
    ],
)  # fmt: skip
def test_grpo_config_samples_as_grpo_vllm_mode_says(monkeypatch, tmp_path, backend, mode, installed, want) -> None:
    from trl import GRPOConfig

    from taoflow.settings import Settings

    if installed:
        FakeVllm(monkeypatch)
    else:
        monkeypatch.delitem(sys.modules, "vllm", raising=False)
        monkeypatch.setattr(grpo.importlib.util, "find_spec", lambda name, *a: None)
    cfg = Settings(overrides={"learner": {
        "backend": backend, "grpo_vllm_mode": mode, "vllm_gpu_memory_utilization": 0.35,
        "vllm_server_host": "10.1.2.3", "vllm_server_port": 8123,
    }}).learner  # fmt: skip
    fields = grpo.grpo_sampling(cfg)
    config = common.trl_config(GRPOConfig, {"output_dir": str(tmp_path), "use_cpu": True, **fields}, cfg.trl)
    for key, value in want.items():
        assert getattr(config, key) == value, key
    # explicit sampling whatever the mode: nothing left to a model's generation_config
    assert (config.top_k, config.top_p, config.repetition_penalty, config.min_p) == (0, 1.0, 1.0, 0.0)
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    assert set(fields) <= names, "only fields this TRL has"
    if want["use_vllm"] and mode == "colocate":
        assert "vllm_server_host" not in fields
    # learner.trl still wins over the defaults
    over = common.trl_config(GRPOConfig, {"output_dir": str(tmp_path), "use_cpu": True, **fields}, {"top_k": 5})
    assert over.top_k == 5


# ---------------------------------------------------------------------------------------------------------------
# 4. device selection: a training process that sees only the selected GPU


def _gpus(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def _cfg(**learner: Any) -> Any:
    from taoflow.settings import Settings

    return Settings(overrides={"learner": learner}).learner


def test_cuda_1_trains_in_a_process_that_sees_only_gpu_1_and_says_so(monkeypatch, caplog) -> None:
    _gpus(monkeypatch, 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(LearnerError, match="only 2 GPU"):
        resolve_device("cuda:2")

    with caplog.at_level(logging.INFO, logger="learners.training"):
        place = training.placement(_cfg(device="cuda:1"), "cuda:1")
    assert place == training.Placement(child=True, device="cuda", cuda_visible="1")
    assert "2 GPUs visible" in caplog.text and "GPU 1 only" in caplog.text and "DataParallel" in caplog.text
    assert training.placement(_cfg(), "cuda") == training.Placement(True, "cuda", "0")

    env = training.child_env(place)
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and "WORLD_SIZE" not in env
    assert str(ROOT) in env["PYTHONPATH"].split(os.pathsep), "the child imports this checkout's learners"
    assert training.child_command(place, Path("/j.json"))[1:] == ["-m", "learners.training", "/j.json"]

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # the learner itself was given two GPUs
    assert training.placement(_cfg(), "cuda:1").cuda_visible == "6" == physical_gpu(1)

    with pytest.raises(LearnerError, match="DataParallel"):
        training.placement(_cfg(train_process="inline"), "cuda:0")
    _gpus(monkeypatch, 1)
    assert training.placement(_cfg(train_process="inline"), "cuda:0") == training.Placement(False, "cuda:0")


def test_cpu_trains_inline_and_accelerate_config_launches_the_trainer_under_accelerate(monkeypatch) -> None:
    from taoflow.exceptions import ConfigError

    assert training.placement(_cfg(), "cpu") == training.Placement(False, "cpu")
    assert training.placement(_cfg(train_process="child"), "cpu") == training.Placement(True, "cpu")

    _gpus(monkeypatch, 4)
    config = ROOT / "deploy" / "accelerate" / "ddp.yaml"
    place = training.placement(_cfg(accelerate_config=str(config)), "cuda")
    assert place == training.Placement(True, "cuda", None, config)
    cmd = training.child_command(place, Path("/j.json"))
    assert cmd[1:] == ["-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "learners.training",
                       "/j.json"]  # fmt: skip
    assert training.child_env(place).get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")
    with pytest.raises(ConfigError, match="gpu_ids"):
        _cfg(accelerate_config=str(config), device="cuda:1")
    with pytest.raises(ConfigError, match="inline"):
        _cfg(accelerate_config=str(config), train_process="inline")


def test_the_accelerate_examples_are_valid_accelerate_configs() -> None:
    import yaml

    kinds = {}
    for path in sorted((ROOT / "deploy" / "accelerate").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        assert doc["num_machines"] == 1 and doc["num_processes"] >= 2 and doc["mixed_precision"] == "bf16", path
        kinds[path.stem] = doc["distributed_type"]
    assert kinds == {"ddp": "MULTI_GPU", "deepspeed_zero2": "DEEPSPEED", "fsdp": "FSDP"}


def test_the_training_process_reports_progress_and_its_failure(tmp_path) -> None:
    """`run_child`/`train_in_child` against stand-in processes (a real trainer child: the gpu and slow tests)."""
    steps: list[int] = []
    script = f"import sys; print('loading'); print('{training.PROGRESS} 1', flush=True); print('{training.PROGRESS} 1')"
    rc, tail = training.run_child([sys.executable, "-c", script + "; sys.exit(3)"], dict(os.environ), steps.append)
    assert (rc, tail, steps) == (3, ["loading"], [1, 1])


def test_a_training_job_runs_as_the_child_runs_it(tmp_path, warm_model, monkeypatch) -> None:
    """The job a child process is given, run by the child's own entry point (`training.main`) in this process:
    what crosses the process boundary (settings, scorers, rows, paths, dtype) is enough to train and report."""
    settings = learner_settings(tmp_path / "d", warm_model, steps=1, k=2)
    launched: list[list[str]] = []

    def run_here(cmd: list[str], env: dict[str, str], progress: Any) -> tuple[int, list[str]]:
        launched.append(cmd)
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = training.main([cmd[-1]])
        for line in out.getvalue().splitlines():
            if line.startswith(training.PROGRESS):
                progress(int(line.split()[1]))
        return rc, []

    monkeypatch.setattr(training, "run_child", run_here)
    rows = [{"prompt": p, "source": p, "task_type": "math", "metadata": {}} for p in arithmetic_prompts(4, seed=5)]
    steps: list[int] = []
    specs = [s.model_dump(mode="json", by_alias=True) for s in settings.learner.scorers]
    metrics = training.train(
        "grpo", settings.learner, place=training.Placement(True, "cpu"), scorer_specs=specs, rows=rows,
        base_model=str(warm_model), parent=None, start=None, out=tmp_path / "out", dtype=torch.float32, seed=1,
        temperature=1.0, progress=steps.append,
    )  # fmt: skip
    assert launched[0][1:3] == ["-m", "learners.training"]
    assert metrics["train_steps"] == 1.0 and steps == [1]
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()

    with pytest.raises(LearnerError, match="no preference pairs"):  # the child's LearnerError, word for word
        training.train("offline", settings.learner, place=training.Placement(True, "cpu"), pairs=[],
                       base_model=str(warm_model), parent=None, out=tmp_path / "o2", dtype=None, seed=1)  # fmt: skip


@pytest.mark.slow
def test_a_round_trains_in_a_real_child_process(tmp_path, warm_model) -> None:
    """train_process child on CPU: the path every CUDA round takes, through a real `python -m learners.training`
    (slow: the child imports torch and TRL again; 17 s on the shared 2-core machine, more under load)."""
    settings = learner_settings(tmp_path / "d", warm_model, train_process="child", steps=1, max_prompts=24,
                                gate_margin=-1.0, gate_task_margin=1.0)  # fmt: skip
    land_prompts(settings, arithmetic_prompts(24, seed=43))
    events: list[tuple[Any, ...]] = []
    with RecordSink(settings, prefer_kafka=False) as sink:
        result = Round(settings, sink, RecordingReporter(events)).run()
    assert result.status == "published", result
    assert result.metrics["train_steps"] == 1.0
    names = [e[0] for e in events]
    assert "advance" in names[names.index("stage:train") : names.index("done:train")], "the child's step arrived"


# ---------------------------------------------------------------------------------------------------------------
# 5. sampling that is the same on every backend


def _generation_config(model_dir: Path, **extra: Any) -> None:
    path = model_dir / "generation_config.json"
    doc = json.loads(path.read_text())
    doc.update(extra)
    path.write_text(json.dumps(doc))


def test_a_models_generation_config_defaults_never_apply(tmp_path) -> None:
    from learners.models import make_tiny

    plain = make_tiny(tmp_path / "plain")
    penalised = tmp_path / "penalised"
    shutil.copytree(plain, penalised)
    _generation_config(penalised, repetition_penalty=1.3, top_k=3, no_repeat_ngram_size=2)

    prompts = ["What is 2 + 3?", "hello world", "the answer is"]
    outs = {}
    for name, path in (("plain", plain), ("penalised", penalised)):
        model, tok = load_policy(str(path), None, device="cpu", dtype=None)
        gen = TransformersGenerator(model, tok, seed=7)
        outs[name] = (
            gen.generate(prompts, n=1, temperature=1.0, max_new_tokens=12, greedy=True),
            gen.generate(prompts, n=3, temperature=0.9, max_new_tokens=12),
        )
        if name == "penalised":  # the test can tell: transformers left to itself applies the model's defaults
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            ids = model.generate(**enc, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)
            own = tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            assert [[t] for t in own] != outs[name][0]
    assert outs["penalised"] == outs["plain"], "greedy and sampled output ignore the model's generation_config"


def test_vllm_sampling_params_come_from_the_same_settings() -> None:
    greedy = Sampling(n=4, temperature=0.7, max_new_tokens=9, top_p=0.8, greedy=True)
    p = greedy.vllm_params(FakeSamplingParams, seed=11)
    assert (p.n, p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.max_tokens, p.seed) == (
        1, 0.0, 1.0, 0, 1.0, 9, 11,
    )  # fmt: skip
    kw = greedy.transformers_kwargs()
    assert (kw["do_sample"], kw["num_return_sequences"], kw["repetition_penalty"], kw["max_new_tokens"]) == (
        False, 1, 1.0, 9,
    )  # fmt: skip

    sampled = Sampling(n=4, temperature=0.7, max_new_tokens=9, top_p=0.8)
    p = sampled.vllm_params(FakeSamplingParams, seed=11)
    kw = sampled.transformers_kwargs()
    assert (p.n, p.temperature, p.top_p, p.min_p, p.repetition_penalty) == (4, 0.7, 0.8, 0.0, 1.0)
    assert (kw["num_return_sequences"], kw["temperature"], kw["top_p"], kw["top_k"], kw["repetition_penalty"]) == (
        4, 0.7, 0.8, 0, 1.0,
    )  # fmt: skip

    @dataclasses.dataclass
    class OldSamplingParams(FakeSamplingParams):
        top_k: int = -1  # vLLM releases whose "off" is -1

    assert sampled.vllm_params(OldSamplingParams, seed=0).top_k == -1


# ---------------------------------------------------------------------------------------------------------------
# 6. the reward model's device


def test_the_reward_model_runs_where_the_settings_say(tmp_path, monkeypatch) -> None:
    from learners.models import make_tiny_reward_model
    from learners.rewards.registry import build_scorer
    from learners.rewards.specs import RewardModelSpec
    from learners.tao import build_round_scorer
    from taoflow.settings import Settings

    path = str(make_tiny_reward_model(tmp_path / "rm"))
    settings = Settings(overrides={"core": {"data_dir": tmp_path / "d"},
                                   "learner": {"scorers": [{"type": "reward_model", "path": path}]}})  # fmt: skip
    (scorer,) = build_round_scorer(settings, "cpu").scorers
    assert scorer.fn.device == "cpu" and next(scorer.fn.model.parameters()).device.type == "cpu"
    assert scorer.fn([" 5"], prompts=["What is 2 + 3?"])[0] is not None

    _gpus(monkeypatch, 2)
    moved: list[str] = []

    def to(self: Any, *args: Any, **kwargs: Any) -> Any:
        moved.append(str(args[0] if args else kwargs.get("device")))
        return self

    monkeypatch.setattr(torch.nn.Module, "to", to)
    assert build_scorer(RewardModelSpec(path=path)).fn.device == "cuda", "with a GPU, there by default"
    assert build_round_scorer(settings, "cuda:1").scorers[0].fn.device == "cuda:1", "the learner's device"
    pinned = RewardModelSpec(path=path, device="cpu")
    assert build_scorer(pinned, device="cuda:1").fn.device == "cpu", "a device in the spec wins"
    assert moved == ["cuda", "cuda:1", "cpu"]


# ---------------------------------------------------------------------------------------------------------------
# 7. on a GPU: real rounds (skipped without CUDA)


@pytest.mark.gpu
@needs_cuda
def test_gpu_a_grpo_round_on_cuda_trains_one_step_in_a_child_process(tmp_path, warm_model) -> None:
    settings = learner_settings(tmp_path / "d", warm_model, device="cuda", steps=1, max_prompts=24,
                                gate_margin=-1.0, gate_task_margin=1.0)  # fmt: skip
    land_prompts(settings, arithmetic_prompts(24, seed=44))
    result = run_round(settings, prefer_kafka=False)
    assert result.status == "published", result
    assert result.metrics["train_steps"] == 1.0
    assert torch.cuda.memory_allocated() < 64 * 2**20, "nothing of the round stays on the learner's GPU"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_device_cuda_n_generates_on_gpu_n_and_trains_there(tmp_path, warm_model) -> None:
    last = torch.cuda.device_count() - 1
    settings = learner_settings(tmp_path / "d", warm_model, device=f"cuda:{last}", steps=1, max_prompts=24,
                                gate_margin=-1.0, gate_task_margin=1.0)  # fmt: skip
    land_prompts(settings, arithmetic_prompts(24, seed=45))
    result = run_round(settings, prefer_kafka=False)
    assert result.status == "published", result
    # generation and the gate ran on GPU `last` in this process (training: in a child that sees only that GPU)
    used, first = torch.cuda.max_memory_allocated(last), torch.cuda.max_memory_allocated(0)
    assert used > 2**20 and first < used / 10, (used, first)


@pytest.mark.gpu
@needs_cuda
def test_gpu_a_vllm_round_builds_one_engine(tmp_path) -> None:
    pytest.importorskip("vllm")
    from learners.tasks import make_warm_model

    model = make_warm_model(tmp_path / "m", steps=200, hidden_size=128, heads=2)  # head size 64, as vLLM's kernels
    settings = learner_settings(tmp_path / "d", model, device="cuda", backend="vllm", steps=1, max_prompts=24,
                                gate_margin=-1.0, gate_task_margin=1.0, vllm_gpu_memory_utilization=0.3)  # fmt: skip
    land_prompts(settings, arithmetic_prompts(24, seed=46))
    result = run_round(settings, prefer_kafka=False)
    assert result.status == "published", result
    assert result.metrics["vllm_engines_built"] == 1.0 and result.metrics["train_steps"] == 1.0
