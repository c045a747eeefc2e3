"""The GPU path on one machine without network access: generation, a GRPO LoRA round and the serving backends.

Builds a Llama-shaped model of about 0.5B parameters here (random weights, the byte-level BPE tokenizer the learner
builds for its tiny models: nothing comes from a hub), then measures
  - batched generation tokens/s with transformers (batch 1 and a full batch), and with vLLM (base and through a
    LoRA adapter) when vLLM is importable, in a child process so its memory is returned;
  - one GRPO step (TRL, LoRA, transformers sampling) and the peak GPU memory of the round, when TRL is importable
    (`--trl-wheel` installs carried wheels offline first; without TRL that part is skipped and says so);
  - the transformers serving backend's requests/s with two LoRA adapters (requests alternate base, a, b), and
    the vLLM serving backend's (a `vllm serve` it launches with the gateway's flags) when vLLM is importable.
Each part that fails is reported in the table and the rest still runs. One H100/H200: well under 10 minutes.

    python bench/gpu.py                              # the GPU run (cuda:0)
    python bench/gpu.py --trl-wheel trl-*.whl        # TRL carried as a wheel (repeat for missing dependencies)
    python bench/gpu.py --device cpu --tiny          # smoke test: a tiny model, a few tokens, under 2 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Size:
    """Model shape and workload; `FULL` is about 0.5B parameters, `TINY` the CPU smoke test."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    batch: int  # prompts per generate() call
    new_tokens: int
    grpo_prompts: int
    grpo_k: int
    grpo_steps: int
    grpo_new_tokens: int
    lora_r: int
    requests: int
    request_tokens: int
    vllm_prompts: int


FULL = Size(hidden=1024, layers=32, heads=16, kv_heads=8, batch=64, new_tokens=128, grpo_prompts=8, grpo_k=8,
            grpo_steps=4, grpo_new_tokens=128, lora_r=16, requests=48, request_tokens=32, vllm_prompts=256)  # fmt: skip
TINY = Size(hidden=64, layers=2, heads=4, kv_heads=2, batch=4, new_tokens=8, grpo_prompts=2, grpo_k=2, grpo_steps=2,
            grpo_new_tokens=8, lora_r=8, requests=6, request_tokens=4, vllm_prompts=8)  # fmt: skip
PROMPTS = ["What is 12 + 30?", "Name the capital of France.", "Answer with JSON only: the sum of 7 and 5.",
           "hello world, what is the order status?"]  # fmt: skip


class Table:
    """The rows printed at the end: part, measure, value, note."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, part: str, measure: str, value: str, note: str = "") -> None:
        self.rows.append((part, measure, value, note))
        print(f"  {part}: {measure} = {value} {note}".rstrip(), flush=True)

    def skip(self, part: str, why: str) -> None:
        self.add(part, "skipped", "-", why)

    def render(self) -> str:
        head = ("part", "measure", "value", "note")
        widths = [max(len(r[i]) for r in [head, *self.rows]) for i in range(4)]

        def line(r: tuple[str, ...]) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

        return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, self.rows)])


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def install_wheels(wheels: list[str]) -> None:
    """pip-install carried wheels with no index (the machine has no network) and no dependency resolution."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", *wheels]
    print("installing offline:", " ".join(wheels), flush=True)
    subprocess.run(cmd, check=True)
    importlib.invalidate_caches()


def peak_memory(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB process RSS"


def reset_peak(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


# -- the model ------------------------------------------------------------------------------------------------------


def build_model(size: Size, out: Path, device: str, dtype: Any) -> int:
    """A Llama-shaped causal LM with random weights and a locally trained tokenizer, saved as a model directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from learners.models import build_tokenizer

    tokenizer = build_tokenizer(0, vocab_size=4096)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.hidden * 4,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    del model
    reset_peak(device)
    return params


def make_adapter(model_dir: Path, out: Path, r: int, seed: int) -> Path:
    """A LoRA adapter on every linear layer with random (nonzero) weights, saved where PEFT and vLLM load it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    peft.save_pretrained(str(out))
    return out


# -- measurements ---------------------------------------------------------------------------------------------------


def bench_generate(size: Size, model_dir: Path, device: str, dtype: Any, table: Table) -> None:
    """transformers `generate`, sampling at temperature 1, every sequence forced to the full length."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()  # type: ignore[arg-type]
    for batch in (1, size.batch):
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        kw = {"max_new_tokens": size.new_tokens, "min_new_tokens": size.new_tokens, "do_sample": True,
              "temperature": 1.0, "top_p": None, "top_k": None, "pad_token_id": tok.pad_token_id}  # fmt: skip
        with torch.no_grad():
            model.generate(**enc, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
            sync(device)
            t0 = time.perf_counter()
            out = model.generate(**enc, **kw)
            sync(device)
        seconds = time.perf_counter() - t0
        tokens = (out.shape[1] - enc["input_ids"].shape[1]) * batch
        table.add("generate (transformers)", f"tokens/s, batch {batch}", f"{tokens / seconds:,.0f}",
                  f"{tokens} tokens in {seconds:.2f} s")  # fmt: skip
    table.add("generate (transformers)", "peak memory", peak_memory(device))
    del model
    reset_peak(device)


def bench_grpo(size: Size, model_dir: Path, device: str, dtype: Any, work: Path, table: Table) -> None:
    """One GRPO round as the learner runs it: TRL's GRPOTrainer, a fresh LoRA adapter, transformers sampling."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    data = Dataset.from_list([{"prompt": PROMPTS[i % len(PROMPTS)]} for i in range(size.grpo_prompts * 4)])
    stamps: list[float] = []

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sync(device)
            stamps.append(time.perf_counter())

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sync(device)
            stamps.append(time.perf_counter())

    def length_reward(completions: list[Any], **kwargs: Any) -> list[float | None]:
        return [min(len(str(c)), 200) / 200 for c in completions]

    cuda = device.startswith("cuda")
    args = GRPOConfig(
        output_dir=str(work / "grpo"), max_steps=size.grpo_steps, learning_rate=1e-5, logging_steps=1,
        save_strategy="no", report_to=[], seed=0, use_cpu=not cuda, bf16=cuda and str(dtype) == "torch.bfloat16",
        disable_tqdm=True, num_generations=size.grpo_k, per_device_train_batch_size=size.grpo_k * size.grpo_prompts,
        max_completion_length=size.grpo_new_tokens, temperature=1.0, beta=0.04,
    )  # fmt: skip
    lora = LoraConfig(r=size.lora_r, lora_alpha=2 * size.lora_r, target_modules="all-linear", task_type="CAUSAL_LM")
    reset_peak(device)
    trainer = GRPOTrainer(model=model, reward_funcs=length_reward, args=args, train_dataset=data,
                          processing_class=tok, peft_config=lora, callbacks=[Clock()])  # fmt: skip
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the table reports; not a log dict per step
    trainer.train()
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    later = steps[1:] or steps  # the first step pays for warm-up
    sequences = size.grpo_k * size.grpo_prompts
    table.add("GRPO round (TRL, LoRA)", "seconds/step", f"{statistics.median(later):.2f}",
              f"median of {len(later)} after the first ({steps[0]:.2f} s); {sequences} completions of <= "
              f"{size.grpo_new_tokens} tokens per step, r={size.lora_r}")  # fmt: skip
    table.add("GRPO round (TRL, LoRA)", "peak memory", peak_memory(device), f"trl {_version('trl')}")
    del trainer, model
    reset_peak(device)


def bench_transformers_serving(size: Size, model_dir: Path, adapters: list[Path], device: str, table: Table) -> None:
    """The gateway's transformers backend: one generation at a time, switching adapters per request."""
    from serving.backends import GenRequest, TransformersBackend

    async def run() -> tuple[float, int]:
        backend = TransformersBackend(str(model_dir), device)
        await backend.start()
        for path in adapters:
            await backend.load_adapter(path.name, str(path))
        names: list[str | None] = [None, *(p.name for p in adapters)]

        def req(i: int) -> GenRequest:
            msg = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
            return GenRequest(messages=msg, adapter=names[i % len(names)], max_tokens=size.request_tokens, seed=i)

        await backend.generate(req(0))  # warm-up
        t0 = time.perf_counter()
        gens = await asyncio.gather(*(backend.generate(req(i)) for i in range(size.requests)))
        seconds = time.perf_counter() - t0
        await backend.close()
        return seconds, sum(g.completion_tokens for g in gens)

    seconds, tokens = asyncio.run(run())
    note = f"{size.requests} requests alternating base and 2 adapters, {tokens} tokens in {seconds:.2f} s"
    table.add("serve (transformers backend)", "requests/s", f"{size.requests / seconds:.2f}", note)
    reset_peak(device)


def bench_vllm_serving(size: Size, model_dir: Path, adapters: list[Path], table: Table) -> None:
    """The gateway's vLLM backend against a `vllm serve` it launches with the gateway's flags."""
    from serving.backends import GenRequest, VllmBackend
    from taoflow.lora import vllm_lora_rank

    sys_bin = str(Path(sys.executable).parent)
    os.environ["PATH"] = f"{sys_bin}{os.pathsep}{os.environ.get('PATH', '')}"  # the `vllm` next to this Python

    async def run() -> tuple[float, float, int]:
        port = 8100 + os.getpid() % 500
        backend = VllmBackend(str(model_dir), None, launch=True, port=port, max_lora_rank=vllm_lora_rank(size.lora_r),
                              start_timeout_s=420)  # fmt: skip
        t_start = time.perf_counter()
        await backend.start()
        started = time.perf_counter() - t_start
        try:
            for path in adapters:
                await backend.load_adapter(path.name, str(path))
            names: list[str | None] = [None, *(p.name for p in adapters)]
            n = size.requests * 4

            def req(i: int) -> GenRequest:
                return GenRequest(prompt=PROMPTS[i % len(PROMPTS)], adapter=names[i % len(names)],
                                  max_tokens=size.request_tokens, seed=i)  # fmt: skip

            await backend.generate(req(0))
            t0 = time.perf_counter()
            gens = await asyncio.gather(*(backend.generate(req(i)) for i in range(n)))
            return time.perf_counter() - t0, started, sum(g.completion_tokens for g in gens)
        finally:
            await backend.close()

    seconds, started, tokens = asyncio.run(run())
    n = size.requests * 4
    note = f"{n} concurrent requests alternating base and 2 adapters, {tokens} tokens; server up in {started:.0f} s"
    table.add("serve (vLLM backend)", "requests/s", f"{n / seconds:.2f}", note)


def vllm_child(model_dir: str, adapter: str, size_name: str, util: float) -> None:
    """(In its own process, so vLLM's memory goes back when it exits.) Offline batched generation, base and LoRA;
    prints one JSON line of results."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from taoflow.lora import vllm_lora_rank

    size = TINY if size_name == "tiny" else FULL
    t0 = time.perf_counter()
    llm = LLM(model=model_dir, dtype="bfloat16", enable_lora=True, max_loras=2,
              max_lora_rank=vllm_lora_rank(size.lora_r), gpu_memory_utilization=util, seed=0)  # fmt: skip
    started = time.perf_counter() - t0
    params = SamplingParams(temperature=1.0, max_tokens=size.new_tokens, min_tokens=size.new_tokens, ignore_eos=True)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(size.vllm_prompts)]
    llm.generate(prompts[:2], params, use_tqdm=False)
    out: dict[str, Any] = {"startup_s": started, "version": _version("vllm")}
    for label, lora in (("base", None), ("lora", LoRARequest("a", 1, adapter))):
        t0 = time.perf_counter()
        res = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        seconds = time.perf_counter() - t0
        out[label] = sum(len(r.outputs[0].token_ids) for r in res) / seconds
    print("VLLM_RESULT " + json.dumps(out), flush=True)


def bench_vllm_generate(size: Size, model_dir: Path, adapter: Path, util: float, tiny: bool, table: Table) -> None:
    cmd = [sys.executable, __file__, "--vllm-child", str(model_dir), str(adapter), "--gpu-memory-utilization",
           str(util)] + (["--tiny"] if tiny else [])  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("VLLM_RESULT ")), None)
    if line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"vLLM child exited {proc.returncode}: {' / '.join(tail)}")
    res = json.loads(line.removeprefix("VLLM_RESULT "))
    n = size.vllm_prompts
    table.add("generate (vLLM)", f"tokens/s, {n} prompts", f"{res['base']:,.0f}",
              f"vllm {res['version']}, engine up in {res['startup_s']:.0f} s")  # fmt: skip
    table.add("generate (vLLM)", f"tokens/s, {n} prompts, LoRA r={size.lora_r}", f"{res['lora']:,.0f}")


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "?"


def part(table: Table, name: str, fn: Any, *args: Any) -> None:
    """Run one measurement; a failure becomes a table row (the other parts still run)."""
    print(f"{name} ...", flush=True)
    t0 = time.perf_counter()
    try:
        fn(*args, table)
    except Exception as exc:
        traceback.print_exc()
        table.add(name, "failed", "-", f"{type(exc).__name__}: {str(exc)[:160]}")
    print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and workload (smoke test)")
    ap.add_argument("--trl-wheel", action="append", default=[], metavar="PATH",
                    help="a wheel to pip-install offline first (TRL or a dependency it lacks); repeatable")  # fmt: skip
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.35,
                    help="vLLM's share of GPU memory (its engine and server run one after the other)")  # fmt: skip
    ap.add_argument("--skip-vllm", action="store_true", help="leave out the vLLM parts even when vLLM is importable")
    ap.add_argument("--vllm-child", nargs=2, metavar=("MODEL", "ADAPTER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.vllm_child:
        model, adapter = args.vllm_child
        vllm_child(model, adapter, "tiny" if args.tiny else "full", args.gpu_memory_utilization)
        return
    if args.trl_wheel:
        install_wheels(args.trl_wheel)

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t_all = time.perf_counter()
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA GPU is visible: run with --device cpu --tiny for the smoke test")
    size = TINY if args.tiny else FULL
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    table = Table()
    where = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()})"
    print(f"bench/gpu.py on {where}; torch {torch.__version__}, transformers {_version('transformers')}, "
          f"peft {_version('peft')}, trl {_version('trl') if has('trl') else 'absent'}, "
          f"vllm {_version('vllm') if has('vllm') else 'absent'}", flush=True)  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="taoflow-gpu-bench-") as tmp:
        work = Path(tmp)
        model_dir = work / "model"
        t0 = time.perf_counter()
        params = build_model(size, model_dir, device, dtype)
        table.add("model", "parameters", f"{params / 1e6:,.1f} M",
                  f"Llama-shaped, {size.layers} layers x {size.hidden}, {dtype}, built in "
                  f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
        adapters = [make_adapter(model_dir, work / name, size.lora_r, seed) for seed, name in enumerate(("a", "b"))]

        part(table, "generate (transformers)", bench_generate, size, model_dir, device, dtype)
        if has("trl") and has("datasets"):
            part(table, "GRPO round (TRL, LoRA)", bench_grpo, size, model_dir, device, dtype, work)
        else:
            missing = [m for m in ("trl", "datasets") if not has(m)]
            table.skip("GRPO round (TRL, LoRA)", f"{' and '.join(missing)} not importable: pass --trl-wheel PATH")
        part(table, "serve (transformers backend)", bench_transformers_serving, size, model_dir, adapters, device)
        if args.skip_vllm or not has("vllm"):
            why = "--skip-vllm" if args.skip_vllm else "vllm not importable"
            table.skip("generate (vLLM)", why)
            table.skip("serve (vLLM backend)", why)
        elif not cuda:
            table.skip("generate (vLLM)", "vLLM runs on the GPU only")
            table.skip("serve (vLLM backend)", "vLLM runs on the GPU only")
        else:
            util = args.gpu_memory_utilization
            part(table, "generate (vLLM)", bench_vllm_generate, size, model_dir, adapters[0], util, args.tiny)
            part(table, "serve (vLLM backend)", bench_vllm_serving, size, model_dir, adapters)
    table.add("total", "wall time", f"{time.perf_counter() - t_all:.0f} s")
    print()
    print(table.render())


if __name__ == "__main__":
    main()
