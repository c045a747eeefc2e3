"""deploy/ stays true to the code: images, commands, ports and every TAOFLOW_* variable agree with the settings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from taoflow.cli import cli
from taoflow.settings import Settings

DEPLOY = Path(__file__).parents[1] / "deploy"
IMAGE = "taoflow:0.1.0"


def known_env() -> set[str]:
    out = {"TAOFLOW_CONFIG"}
    for comp in Settings().components().values():
        prefix = str(comp.model_config.get("env_prefix", ""))
        out |= {f"{prefix}{name}".upper() for name in type(comp).model_fields}
    return out


def check_env(env: dict[str, Any], where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    names = known_env()
    for key, value in env.items():
        if key.startswith("TAOFLOW_"):
            assert key in names, f"{where}: {key} is not a taoflow setting"
            if value is not None:
                monkeypatch.setenv(key, str(value))
    Settings().masked()  # every value parses (raises ConfigError otherwise)
    for key in list(os.environ):
        if key.startswith("TAOFLOW_"):
            monkeypatch.delenv(key)


def check_command(args: list[str], where: str) -> None:
    if args[:3] == ["python", "-m", "streams.lander"]:
        return
    assert args and args[0] in cli.commands, f"{where}: `taoflow {' '.join(args)}` is not a taoflow command"


def test_compose_services_agree_with_the_code(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = doc["services"]
    assert {"kafka", "worker", "lander", "learner", "vllm", "gateway"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:") and "latest" not in services["kafka"]["image"]
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    advertised = services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"].split("//")[1]
    for name in ("worker", "lander", "learner", "gateway"):
        svc = services[name]
        assert svc["image"] == IMAGE and svc["build"]["dockerfile"] == "deploy/Dockerfile"
        args = list(svc.get("entrypoint") or []) + list(svc.get("command") or [])
        check_command(args, name)
        env = svc["environment"]
        check_env(env, name, monkeypatch)
        assert env["TAOFLOW_KAFKA_BOOTSTRAP"] == advertised, name
        assert any(v.startswith("taoflow-data:/data") for v in svc["volumes"]), f"{name} needs the data volume"
    worker = services["worker"]["environment"]
    # workers land Parquet in parallel, never the DuckDB file (the lander service owns it)
    assert worker.get("TAOFLOW_STREAM_LAND_DUCKDB") == "false" and worker.get("TAOFLOW_STREAM_LAND", "true") != "false"
    assert worker["TAOFLOW_STREAM_PARQUET_URL"].startswith("/data/")
    assert services["worker"]["deploy"]["replicas"] >= 2
    gw = services["gateway"]["environment"]
    assert f"{gw['TAOFLOW_SERVE_PORT']}:{gw['TAOFLOW_SERVE_PORT']}" in services["gateway"]["ports"]
    vllm_port = services["vllm"]["command"][services["vllm"]["command"].index("--port") + 1]
    assert gw["TAOFLOW_SERVE_VLLM_URL"] == f"http://vllm:{vllm_port}/v1" and gw["TAOFLOW_SERVE_BACKEND"] == "vllm"
    assert "--enable-lora" in services["vllm"]["command"]
    assert services["vllm"]["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
    lander = services["lander"]["environment"]
    assert f"{lander['TAOFLOW_STREAM_SQL_PORT']}:{lander['TAOFLOW_STREAM_SQL_PORT']}" in services["lander"]["ports"]
    for gpu in ("learner", "vllm"):
        assert services[gpu]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    df = (DEPLOY / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["taoflow"]' in df and "torch==2.13.0" in df


def test_kubernetes_manifests_agree_with_the_code(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "taoflow.yaml").read_text()) if d]
    by_kind: dict[str, dict[str, Any]] = {}
    for d in docs:
        assert d["apiVersion"] and d["kind"] and d["metadata"]["name"]
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    config = by_kind["ConfigMap"]["taoflow-env"]["data"]
    deployments = by_kind["Deployment"]
    assert {"worker", "lander", "learner", "vllm", "gateway"} <= set(deployments)
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]["spec"]
        assert dep["spec"]["selector"]["matchLabels"] == dep["spec"]["template"]["metadata"]["labels"]
        c = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        if name == "vllm":
            assert "--enable-lora" in c["args"] and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
            assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
            continue
        assert c["image"] == IMAGE
        check_command(list(c.get("command") or []) + list(c.get("args") or []), name)
        check_env({**config, **env}, name, monkeypatch)
        ports = {p["containerPort"] for p in c.get("ports", [])}
        for key in ("TAOFLOW_SERVE_PORT", "TAOFLOW_STREAM_METRICS_PORT", "TAOFLOW_LEARNER_METRICS_PORT"):
            if key in env:
                assert int(env[key]) in ports, f"{name}: {key} is not a container port"
        if name == "lander":
            assert int(config["TAOFLOW_STREAM_SQL_PORT"]) in ports
    assert deployments["learner"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert (
        deployments["lander"]["spec"]["strategy"]["type"] == "Recreate"
        and deployments["lander"]["spec"]["replicas"] == 1
    )
    services = by_kind["Service"]
    for svc_name, dep_name in (("gateway", "gateway"), ("vllm", "vllm"), ("lander", "lander")):
        svc = services[svc_name]
        dep = deployments[dep_name]
        assert svc["spec"]["selector"] == dep["spec"]["template"]["metadata"]["labels"]
        ports = {p["containerPort"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
        assert all(p["targetPort"] in ports for p in svc["spec"]["ports"])
    gw_env = {
        e["name"]: e.get("value") for e in deployments["gateway"]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    vllm_port = services["vllm"]["spec"]["ports"][0]["port"]
    assert gw_env["TAOFLOW_SERVE_VLLM_URL"] == f"http://vllm.taoflow.svc:{vllm_port}/v1"
