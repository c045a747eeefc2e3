"""deploy/ stays true to the code: images, commands, ports and every TAOFLOW_* variable agree with the settings."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from taoflow.cli import cli
from taoflow.settings import Settings

DEPLOY = Path(__file__).parents[1] / "deploy"
IMAGE = "taoflow:0.1.0"
# values for the variables compose requires (`${NAME:?...}`): the operator's secrets, random-looking here
SAMPLES = {
    "TAOFLOW_SERVE_API_KEYS": '["q8Jf0vN3pL2mX7rT"]',
    "TAOFLOW_SERVE_ADMIN_KEYS": '["Zt4kW9bYc2HsR6dE"]',
    "TAOFLOW_SERVE_VLLM_API_KEY": "Mv5nQ1xG8jK3pA0w",
}
_VAR = re.compile(r"\$\{([A-Z0-9_]+)(?::?[?-][^}]*)?\}")


def interpolate(value: Any) -> Any:
    """A compose value with its `${NAME...}` variables replaced by SAMPLES (KAFKA_* passwords get a sample too)."""
    if not isinstance(value, str):
        return value
    return _VAR.sub(lambda m: SAMPLES.get(m.group(1), f"sample-{m.group(1).lower()}"), value)


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
                monkeypatch.setenv(key, str(interpolate(value)))
    Settings().masked()  # every value parses (raises ConfigError otherwise)
    for key in list(os.environ):
        if key.startswith("TAOFLOW_"):
            monkeypatch.delenv(key)


def check_command(args: list[str], where: str) -> None:
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
    assert f"127.0.0.1:{gw['TAOFLOW_SERVE_PORT']}:{gw['TAOFLOW_SERVE_PORT']}" in services["gateway"]["ports"]
    vllm_port = services["vllm"]["command"][services["vllm"]["command"].index("--port") + 1]
    assert gw["TAOFLOW_SERVE_VLLM_URL"] == f"http://vllm:{vllm_port}/v1" and gw["TAOFLOW_SERVE_BACKEND"] == "vllm"
    assert "--enable-lora" in services["vllm"]["command"]
    assert services["vllm"]["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
    assert services["lander"]["environment"]["TAOFLOW_STREAM_SQL_ADVERTISE"] == services["lander"]["hostname"]
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


# security of what deploy/ ships (issue 13): nothing internal on the host, no placeholder secrets, keys from secrets,
# network policies, metrics bound where they are declared, Kafka principals allowed only what their code does

SECRET_NAME = re.compile(r"(KEY|KEYS|PASSWORD|TOKEN|SECRET)$")
PLACEHOLDER = re.compile(r"change[-_]?me|replace[-_]?me|placeholder|changeit|^x+$|^\*+$|^(secret|password)$", re.I)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def compose(*files: str) -> dict[str, Any]:
    """The compose services, later files' environment and depends_on merged over earlier ones (as compose does)."""
    services: dict[str, Any] = {}
    for name in files:
        for svc, spec in yaml.safe_load((DEPLOY / name).read_text())["services"].items():
            base = services.setdefault(svc, {})
            for key, value in spec.items():
                if isinstance(value, dict) and isinstance(base.get(key), dict):
                    base[key] = {**base[key], **value}
                else:
                    base[key] = value
    return services


def k8s_docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "taoflow.yaml").read_text()) if d]


def containers(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    deployments = (d for d in docs if d["kind"] == "Deployment")
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0] for d in deployments}


def k8s_env(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def test_compose_publishes_only_the_gateway_and_only_on_loopback() -> None:
    for files in (("docker-compose.yml",), ("docker-compose.yml", "docker-compose.sasl.yml")):
        services = compose(*files)
        published = {name: svc["ports"] for name, svc in services.items() if svc.get("ports")}
        assert set(published) == {"gateway"}, f"{files}: only the gateway may be published on the host: {published}"
        for port in published["gateway"]:
            assert str(port).startswith("127.0.0.1:"), f"the gateway is published as {port}; bind it to 127.0.0.1"
        for name, svc in services.items():
            env = svc.get("environment") or {}
            sql_host = env.get("TAOFLOW_STREAM_SQL_HOST")
            assert sql_host not in ("0.0.0.0", "::"), f"{name}: the SQL endpoint must not bind every interface"
    assert "0.0.0.0" not in (DEPLOY / "PRODUCTION.md").read_text().split("## Gateway")[0], "PRODUCTION.md: no 0.0.0.0"


def test_no_placeholder_or_literal_secrets_ship() -> None:
    services = compose("docker-compose.yml", "docker-compose.sasl.yml")
    for name, svc in services.items():
        for key, value in (svc.get("environment") or {}).items():
            if SECRET_NAME.search(key) and not key.startswith("VLLM_ALLOW"):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]+\}", str(value)), (
                    f"compose {name}: {key} must be a required variable `${{NAME:?set it}}`, not {value!r}"
                )
        for key, value in (svc.get("environment") or {}).items():
            assert not PLACEHOLDER.search(str(value)), f"compose {name}: {key}={value!r} looks like a placeholder"
    jaas = services["kafka"]["environment"]["KAFKA_LISTENER_NAME_SASL_PLAIN_SASL_JAAS_CONFIG"]
    passwords = re.findall(r'(?:password|user_\w+)="([^"]*)"', jaas)
    assert len(passwords) == 7 and all(re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", p) for p in passwords), jaas
    docs = k8s_docs()
    assert not [d for d in docs if d["kind"] == "Secret"], "k8s: ship no Secret objects; the operator creates them"
    for name, c in containers(docs).items():
        for key, e in k8s_env(c).items():
            if SECRET_NAME.search(key) and not key.startswith("VLLM_ALLOW"):
                assert "secretKeyRef" in e.get("valueFrom", {}), f"k8s {name}: {key} must come from a Secret"
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            for word in re.findall(r"[\w*-]+", path.read_text()):
                assert not re.fullmatch(r"change[-_]?me([-_]too)?|replace[-_]?me", word, re.I), f"{path}: {word}"


def test_vllm_requires_a_key_from_a_secret_that_the_gateway_sends() -> None:
    services = compose("docker-compose.yml")
    vllm, gw = services["vllm"], services["gateway"]["environment"]
    # vLLM reads VLLM_API_KEY as its --api-key; the environment keeps the key out of the host's process list
    assert "--api-key" not in vllm["command"], "no key on the command line (ps shows it to every host user)"
    var = re.fullmatch(r"\$\{([A-Z0-9_]+):\?[^}]+\}", vllm["environment"]["VLLM_API_KEY"])
    assert var and gw["TAOFLOW_SERVE_VLLM_API_KEY"].startswith("${" + var.group(1) + ":?")
    assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"  # the hot-swap needs it; the key guards it
    assert all(not str(v).startswith("taoflow-data:/data") for v in vllm["volumes"]), "vLLM sees the adapters only"
    cs = containers(k8s_docs())
    ref = k8s_env(cs["vllm"])["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert k8s_env(cs["gateway"])["TAOFLOW_SERVE_VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == ref
    assert "--api-key" not in cs["vllm"]["args"]
    assert [m for m in cs["vllm"]["volumeMounts"] if m["name"] == "data"] == [
        {"name": "data", "mountPath": "/data/adapters", "subPath": "adapters", "readOnly": True}
    ]


def options(argv: list[str]) -> dict[str, str | None]:
    """The `--name value` options of a command line (None for a bare switch)."""
    out: dict[str, str | None] = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            out[arg] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def launch_options(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, str | None]:
    """The options the gateway would start `vllm serve` with, under these TAOFLOW_* variables."""
    from serving.backends import VllmBackend, build_backend

    for key, value in env.items():
        if key.startswith("TAOFLOW_") and isinstance(value, str):
            monkeypatch.setenv(key, interpolate(value))
    backend = build_backend(Settings(overrides={"serve": {"vllm_launch": True}}))
    for key in list(os.environ):
        if key.startswith("TAOFLOW_"):
            monkeypatch.delenv(key)
    assert isinstance(backend, VllmBackend)
    return {"--model": backend.command[2], **options(backend.command[3:])}


def test_the_vllm_service_starts_as_the_gateway_would_launch_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # --max-loras, --max-cpu-loras, --served-model-name and --max-lora-rank (the learner's lora_r rounded up to a
    # rank vLLM accepts): a server started otherwise reloads adapters on every switch or refuses the learner's
    for args, envs in (
        (compose("docker-compose.yml")["vllm"]["command"],
         [compose("docker-compose.yml")[s]["environment"] for s in ("learner", "gateway")]),
        (containers(k8s_docs())["vllm"]["args"],
         [next(d for d in k8s_docs() if d["kind"] == "ConfigMap")["data"]]
         + [{e["name"]: e.get("value") for e in containers(k8s_docs())[s].get("env", [])}
            for s in ("learner", "gateway")]),
    ):  # fmt: skip
        want = launch_options({k: v for env in envs for k, v in env.items()}, monkeypatch)
        have = options(args)
        assert have.pop("--port") and want.pop("--port")  # the port is checked against the gateway's URL above
        assert have.pop("--max-cpu-loras", None) in (None, *[str(n) for n in range(int(want["--max-loras"] or 1), 65)])
        # unnamed, vLLM serves the base model under its --model, which is the name the gateway asks for
        assert have.pop("--served-model-name", have["--model"]) == want.pop("--served-model-name", want["--model"])
        assert have == want
        assert "--api-key" not in args  # the key travels in VLLM_API_KEY


def test_network_policies_deny_by_default_and_allow_each_declared_port_narrowly() -> None:
    docs = k8s_docs()
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}, "a default-deny policy"
    labels = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] == "Deployment"
    }

    def ingress_for(app: dict[str, str], port: int) -> list[dict[str, Any]]:
        rules = []
        for p in policies:
            if p["spec"]["podSelector"].get("matchLabels") == app:
                rules += [r for r in p["spec"].get("ingress", []) if port in {x["port"] for x in r["ports"]}]
        return rules

    for name, c in containers(docs).items():
        for port in (p["containerPort"] for p in c.get("ports", [])):
            rules = ingress_for(labels[name], port)
            assert rules, f"k8s {name}: port {port} is declared but no NetworkPolicy admits anyone to it"
            if name != "gateway":  # the public API is the only port open to any source
                assert all(r.get("from") for r in rules), f"k8s {name}:{port} is open to every pod"
    (vllm_rule,) = ingress_for(labels["vllm"], 8000)
    assert vllm_rule["from"] == [{"podSelector": {"matchLabels": labels["gateway"]}}], "only the gateway reaches vLLM"


def test_metrics_bind_where_their_ports_are_declared() -> None:
    assert "metrics_host" in type(Settings().core).model_fields  # TAOFLOW_METRICS_HOST
    for name, c in containers(k8s_docs()).items():
        env = k8s_env(c)
        ports = {p["containerPort"] for p in c.get("ports", [])}
        for key in ("TAOFLOW_STREAM_METRICS_PORT", "TAOFLOW_LEARNER_METRICS_PORT"):
            if key in env:
                assert int(env[key]["value"]) in ports, f"k8s {name}: {key} is not declared as a container port"
                host = env.get("TAOFLOW_METRICS_HOST", {})
                assert host.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP", (
                    f"k8s {name}: metrics on loopback cannot be scraped at the declared port; set TAOFLOW_METRICS_HOST "
                    "to the pod IP"
                )
        sql = env.get("TAOFLOW_STREAM_SQL_HOST")
        assert sql is None or sql.get("value") not in ("0.0.0.0", "::"), f"k8s {name}: bind the pod IP, not 0.0.0.0"
    for name, svc in compose("docker-compose.yml").items():
        cenv: dict[str, str] = svc.get("environment") or {}
        exposed = {int(p) for p in svc.get("expose", [])}
        for key in ("TAOFLOW_STREAM_METRICS_PORT", "TAOFLOW_LEARNER_METRICS_PORT"):
            if key in cenv:
                declared = int(cenv[key]) in exposed
                bound = cenv.get("TAOFLOW_METRICS_HOST", "127.0.0.1") not in LOOPBACK
                assert declared == bound, f"compose {name}: {key} declared={declared} but bound off loopback={bound}"


def _script_acls() -> dict[tuple[str, str], set[str]]:
    """(principal, topic) -> operations, from the `acl` lines of deploy/kafka-acls.sh (continuations joined)."""
    text = (DEPLOY / "kafka-acls.sh").read_text().replace("\\\n", " ")
    names = dict(re.findall(r"\b([A-Z])=(taoflow\.[\w.-]+)", text))
    out: dict[tuple[str, str], set[str]] = {}
    for line in text.splitlines():
        if line.startswith("acl "):
            head, _, resources = line.partition(" -- ")
            user, *ops = head.split()[1:]
            for t in re.findall(r'--topic "\$(\w)"', resources):
                out.setdefault((user, names[t]), set()).update(ops)
    return out


def test_kafka_principals_write_only_what_their_code_writes() -> None:
    writers = {
        "taoflow.adapters": {"learner", "gateway"},
        "taoflow.utilities": {"worker"},
        "taoflow.interactions": {"sdk", "gateway"},
        "taoflow.feedback": {"sdk", "gateway"},
        "taoflow.scores": {"worker"},
        "taoflow.dead-letters": {"worker"},
        "taoflow.learner.records": {"learner"},
        "taoflow.sessions": {"worker"},
        "taoflow.worker.rewards": {"worker"},
        "taoflow.worker.sessions": {"worker"},
        "taoflow.worker.session-joins": {"worker"},
    }
    script = _script_acls()
    users = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "kafka-users.yaml").read_text()) if d]
    strimzi: dict[tuple[str, str], set[str]] = {}
    for u in users:
        for acl in u["spec"]["authorization"]["acls"]:
            if acl["resource"]["type"] == "topic" and acl["resource"]["patternType"] == "literal":
                key = (u["metadata"]["name"].removeprefix("taoflow-"), acl["resource"]["name"])
                strimzi.setdefault(key, set()).update(acl["operations"])
    for acls, where in ((script, "kafka-acls.sh"), (strimzi, "kafka-users.yaml")):
        for topic, allowed in writers.items():
            actual = {user for (user, t), ops in acls.items() if t == topic and "Write" in ops}
            assert actual == allowed, f"{where}: {topic} writable by {sorted(actual)}; the code needs {sorted(allowed)}"
        assert ("lander", "taoflow.learner.records") in acls and not any(
            "Write" in ops for (user, _), ops in acls.items() if user == "lander"
        ), f"{where}: the lander reads every topic and writes none"
    # every prefixed / wildcard grant is the workers' own changelogs, never taoflow.*
    assert 'taoflow." --resource-pattern-type' not in (DEPLOY / "kafka-acls.sh").read_text()
