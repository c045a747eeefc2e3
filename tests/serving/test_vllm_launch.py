"""How the gateway starts vLLM: LoRA rank rounding, the settings behind `vllm serve`'s flags, and a real launch of a
stand-in `vllm` executable that records its command line and speaks just enough of the protocol to come up."""

from __future__ import annotations

import asyncio
import doctest
import json
import os
import stat
import sys
import typing
from pathlib import Path

import pytest

import taoflow.lora
from serving.backends import VllmBackend, build_backend
from serving.exceptions import BackendDown
from taoflow.exceptions import ConfigError
from taoflow.lora import VLLM_LORA_RANKS, vllm_lora_rank
from taoflow.settings import ServeSettings, Settings
from tests.conftest import free_port


def test_lora_ranks_round_up_to_one_vllm_accepts() -> None:
    assert [vllm_lora_rank(r) for r in (1, 2, 8, 9, 12, 16, 24, 33, 100, 129, 257, 320, 321, 512)] == [
        1, 8, 8, 16, 16, 16, 32, 64, 128, 256, 320, 320, 512, 512
    ]  # fmt: skip
    for r in range(1, 513):  # the smallest accepted rank that holds r
        got = vllm_lora_rank(r)
        assert got in VLLM_LORA_RANKS and got >= r and all(a < r for a in VLLM_LORA_RANKS if a < got)
    for bad in (0, 513):
        with pytest.raises(ConfigError):
            vllm_lora_rank(bad)
    assert doctest.testmod(taoflow.lora).failed == 0
    # the setting accepts exactly the ranks vLLM does
    field = ServeSettings.model_fields["vllm_max_lora_rank"].annotation
    assert set(typing.get_args(typing.get_args(field)[0])) == set(VLLM_LORA_RANKS)


def flags(argv: list[str]) -> dict[str, str | None]:
    """The `--name value` options of a command line (None for a bare switch)."""
    out: dict[str, str | None] = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            out[arg] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def settings(tmp_path: Path, learner: dict[str, object] | None = None, **serve: object) -> Settings:
    return Settings(overrides={
        "core": {"data_dir": tmp_path / "data", "base_model": "/models/base"},
        "learner": learner or {},
        "serve": {"backend": "vllm", "vllm_launch": True, **serve},
    })  # fmt: skip


def test_the_launch_command_follows_the_settings_and_bad_ones_fail_before_vllm_starts(tmp_path: Path) -> None:
    default = build_backend(settings(tmp_path))
    assert isinstance(default, VllmBackend)
    cmd = default.command
    assert cmd[:3] == ["vllm", "serve", "/models/base"]
    flag = flags(cmd)
    # four adapters resident (canary, incumbent, watched predecessor, one draining); rank = the learner's r=8
    assert flag["--enable-lora"] is None and flag["--max-loras"] == "4" and flag["--max-lora-rank"] == "8"
    assert "--max-cpu-loras" not in cmd and "--served-model-name" not in cmd and "--api-key" not in cmd

    tuned = build_backend(settings(tmp_path, {"lora_r": 12}, vllm_max_loras=2, vllm_max_cpu_loras=6,
                                   vllm_served_model_name="base", vllm_api_key="k3y"))  # fmt: skip
    assert isinstance(tuned, VllmBackend)
    assert flags(tuned.command) == {
        "--port": "8100",
        "--enable-lora": None,
        "--max-loras": "2",
        "--max-lora-rank": "16",
        "--max-cpu-loras": "6",
        "--served-model-name": "base",
    }
    assert tuned.model == "base" and tuned.model_for(None) == "base"  # requests name the served model
    assert "k3y" not in tuned.command
    explicit = build_backend(settings(tmp_path, {"lora_r": 12}, vllm_max_lora_rank=64))
    assert isinstance(explicit, VllmBackend) and flags(explicit.command)["--max-lora-rank"] == "64"

    with pytest.raises(ConfigError, match="vllm_max_lora_rank"):
        _ = settings(tmp_path, vllm_max_lora_rank=12).serve
    with pytest.raises(ConfigError, match="vllm_max_loras"):
        _ = settings(tmp_path, vllm_max_loras=0).serve
    with pytest.raises(ConfigError, match=r"MAX_CPU_LORAS \(2\) must be at least"):
        build_backend(settings(tmp_path, vllm_max_loras=4, vllm_max_cpu_loras=2))
    with pytest.raises(ConfigError, match="up to 512"):
        build_backend(settings(tmp_path, {"lora_r": 600}))


# a stand-in for `vllm serve`: writes what it was started with, then answers /v1/models (with the key vLLM would
# demand) until it is terminated
STAND_IN = """#!{python}
import json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

argv = sys.argv[1:]
keep = ("VLLM_API_KEY", "VLLM_ALLOW_RUNTIME_LORA_UPDATING")
with open({record!r}, "w") as f:
    json.dump({{"argv": argv, "env": {{k: os.environ.get(k) for k in keep}}}}, f)
name = argv[argv.index("--served-model-name") + 1] if "--served-model-name" in argv else argv[1]

class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def do_GET(self):
        ok = self.headers.get("Authorization") == "Bearer " + os.environ.get("VLLM_API_KEY", "")
        body = json.dumps({{"object": "list", "data": [{{"id": name, "parent": None}}]}}).encode()
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

HTTPServer(("127.0.0.1", int(argv[argv.index("--port") + 1])), H).serve_forever()
"""


def test_a_launched_vllm_gets_the_flags_and_its_key_through_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir, record = tmp_path / "bin", tmp_path / "vllm-started.json"
    bin_dir.mkdir()
    exe = bin_dir / "vllm"
    exe.write_text(STAND_IN.format(python=sys.executable, record=str(record)))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    port = free_port()
    backend = VllmBackend("/models/base", None, launch=True, port=port, api_key="s3cret", served_model_name="base",
                          max_loras=4, max_cpu_loras=8, max_lora_rank=16, start_timeout_s=60)  # fmt: skip

    async def run() -> None:
        await backend.start()  # returns once the server answers /v1/models with the key
        assert await backend.health()
        await backend.close()

    asyncio.run(run())
    started = json.loads(record.read_text())
    argv = started["argv"]
    assert argv[:2] == ["serve", "/models/base"] and "s3cret" not in argv
    assert flags(argv) == {"--port": str(port), "--enable-lora": None, "--max-loras": "4", "--max-lora-rank": "16",
                           "--max-cpu-loras": "8", "--served-model-name": "base"}  # fmt: skip
    assert started["env"] == {"VLLM_API_KEY": "s3cret", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    assert backend.proc.poll() is not None  # close() stopped the server it started


def test_a_launched_vllm_that_exits_fails_the_start_with_its_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "vllm"
    exe.write_text(f"#!{sys.executable}\nimport sys\nsys.exit(3)\n")  # e.g. a --max-lora-rank it refuses
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    backend = VllmBackend("/models/base", None, launch=True, port=free_port(), start_timeout_s=60)

    async def run() -> None:
        try:
            await backend.start()
        finally:
            await backend.close()

    with pytest.raises(BackendDown, match="exited with status 3"):
        asyncio.run(run())
