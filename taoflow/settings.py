"""Settings: one pydantic-settings class per component, `TAOFLOW_` environment, optional `taoflow.toml`."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar, overload

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from learners.rewards.specs import ScorerSpec
from schemas.base import Limits
from taoflow.exceptions import ConfigError

CONFIG_FILE_ENV = "TAOFLOW_CONFIG"
CORE = "core"  # the component whose settings sit at the top level
DEFAULT_CONFIG_FILE = "taoflow.toml"


def config_file() -> Path | None:
    """`$TAOFLOW_CONFIG`, else `./taoflow.toml` when it exists."""
    explicit = os.environ.get(CONFIG_FILE_ENV)
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"{CONFIG_FILE_ENV}={explicit} does not name a file; fix the path or unset it")
        return path
    local = Path(DEFAULT_CONFIG_FILE)
    return local if local.is_file() else None


class _TomlSection(PydanticBaseSettingsSource):
    """Reads one table of taoflow.toml (the top level for the core settings)."""

    def __init__(self, settings_cls: type[BaseSettings], section: str | None) -> None:
        super().__init__(settings_cls)
        self._data: dict[str, Any] = {}
        path = config_file()
        if path is None:
            return
        try:
            doc = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        table = doc.get(section, {}) if section else {k: v for k, v in doc.items() if not isinstance(v, dict)}
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{section}] must be a table")
        self._data = table

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)  # unknown keys reach validation and fail there (extra="forbid")


class _Component(BaseSettings):
    """Base: init kwargs > environment > taoflow.toml section > defaults; unknown keys are errors.

    A component names its section once, in its class statement (`class StreamSettings(_Component, section="stream")`):
    its variables are `TAOFLOW_<SECTION>_*` and its table `[section]` (the core's: `TAOFLOW_*` and the top level), and
    `Settings` holds it under that name."""

    model_config = SettingsConfigDict(extra="forbid")
    section: ClassVar[str] = ""
    toml_section: ClassVar[str | None] = None

    def __init_subclass__(cls, section: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.section = section
        cls.toml_section = None if section == CORE else section

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls.model_config["env_prefix"] = "TAOFLOW_" if cls.section == CORE else f"TAOFLOW_{cls.section.upper()}_"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _TomlSection(settings_cls, cls.toml_section)

    def masked(self) -> dict[str, Any]:
        """The values as JSON-able data, secrets shown as `**********`."""
        return self.model_dump(mode="json")


class CoreSettings(_Component, section="core"):
    """Where data lives and which model to start from."""

    data_dir: Path = Path(".taoflow")
    base_model: str | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    metrics_host: str = Field(
        default="127.0.0.1",
        description="address the worker's and the learner's Prometheus /metrics bind (0.0.0.0 in a pod a "
        "NetworkPolicy guards, so the scraper reaches the declared port)",
    )

    @property
    def duckdb_path(self) -> Path:
        return self.data_dir / "taoflow.duckdb"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"


class KafkaSettings(_Component, section="kafka"):
    """The Kafka cluster; `bootstrap` unset means the embedded broker."""

    bootstrap: str | None = None
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    client_id: str = "taoflow"

    def security_kwargs(self) -> dict[str, Any]:
        """Security options in the spelling both kafka-python and aiokafka accept."""
        kw: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.sasl_mechanism:
            kw["sasl_mechanism"] = self.sasl_mechanism
            kw["sasl_plain_username"] = self.sasl_username
            kw["sasl_plain_password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        if self.security_protocol in ("SSL", "SASL_SSL"):
            import ssl

            ctx = ssl.create_default_context(cafile=self.ssl_cafile)
            if self.ssl_certfile:
                ctx.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
            kw["ssl_context"] = ctx
        return kw


class BrokerSettings(_Component, section="broker"):
    """The embedded Kafka-compatible broker (Tansu, memory storage) on loopback."""

    host: str = "127.0.0.1"
    port: int = 9092
    partitions: int = 4
    startup_timeout_s: float = 30.0
    cluster_id: str = "taoflow"

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"


class LimitsSettings(_Component, section="limits"):
    """Event size bounds enforced by the schemas."""

    max_prompt_bytes: int = Limits.max_prompt_bytes
    max_response_bytes: int = Limits.max_response_bytes
    max_metadata_bytes: int = Limits.max_metadata_bytes
    max_event_bytes: int = Limits.max_event_bytes
    max_ts_age_s: float = Field(default=Limits.max_ts_age_s, gt=0, description="oldest event timestamp accepted")
    max_ts_ahead_s: float = Field(default=Limits.max_ts_ahead_s, ge=0, description="farthest future timestamp accepted")

    def limits(self) -> Limits:
        return Limits(**self.model_dump())


class SdkSettings(_Component, section="sdk"):
    """The agent SDK (Emitter): spool location and bounds, delivery timing."""

    spool_dir: Path | None = None
    spool_max_bytes: int = 256 * 1024 * 1024
    spool_segment_bytes: int = 8 * 1024 * 1024
    on_full: Literal["drop_newest", "drop_oldest", "error"] = "drop_newest"
    max_pending: int = 100_000
    linger_ms: int = 5
    delivery_timeout_ms: int = 10_000
    reconnect_backoff_s: float = 1.0


class StreamSettings(_Component, section="stream"):
    """The stream processors: batching, scorers, ACT-R parameters, landing."""

    app_id: str = "taoflow-worker"
    batch_size: int = Field(default=2000, ge=1)
    land_batch_size: int = Field(default=10_000, ge=1)
    land_batch_ms: int = Field(default=200, ge=1)
    web_port: int = Field(default=0, ge=0, description="faust web server port; 0 disables it")
    fetch_wait_ms: int = Field(default=20, ge=1, description="longest a fetch waits for new data (latency)")
    session_timeout_s: float = Field(default=10.0, gt=0, description="consumer-group session timeout")
    recovery_stall_s: float = Field(
        default=60.0, gt=0, description="a worker whose assigned partitions have had no table recovery running and "
        "a suspended flow for this long exits (its partitions go to other workers; a supervisor restarts it)",
    )  # fmt: skip
    sql_port: int = Field(default=0, ge=0, description="SQL endpoint of the DuckDB owner; 0 picks a free one")
    sql_host: str = Field(default="127.0.0.1", description="address the DuckDB owner's SQL endpoint binds")
    sql_advertise: str | None = Field(
        default=None, description="host other containers reach that endpoint at (written to lander.json)"
    )
    sql_timeout_s: float = Field(default=30.0, gt=0, description="a SQL query running longer is stopped")
    sql_max_rows: int = Field(default=100_000, ge=1, description="rows a SQL result may have")
    sql_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, description="JSON bytes a SQL result may have")
    sql_max_concurrent: int = Field(default=2, ge=1, description="SQL queries the lander runs at once; more: 429")
    sql_max_body: int = Field(default=64 * 1024, ge=1024, description="bytes a SQL request body may have")
    alpha: float = Field(default=0.2, gt=0, le=1)
    initial_utility: float = 0.0
    knowledge_discount: float = Field(
        default=0.1, gt=0, le=1,
        description="share of an imported utility's reward count kept as evidence (`taoflow knowledge import`); "
        "the rest is discounted so that this deployment's own rewards soon outweigh another model's",
    )  # fmt: skip
    discount: float = Field(default=0.0, ge=0, description="reward lost per second between selection and reward")
    noise_s: float = Field(default=0.1, ge=0, description="scale of the Logistic(0, s) selection noise")
    scorers: list[ScorerSpec] = Field(default_factory=list)
    feedback_weights: dict[str, float] = Field(
        default_factory=lambda: {k: 1.0 for k in ("thumbs", "rating", "followup", "implemented", "task_success")}
    )
    join_ttl_s: float = Field(
        default=7 * 24 * 3600.0, gt=0,
        description="how long an interaction waits for feedback (join state kept), and feedback for its interaction; "
        "feedback for an unknown interaction goes to the dead letters after this",
    )  # fmt: skip
    expire_every_s: float = Field(default=60.0, gt=0, description="how often expired join state is removed")
    stop_timeout_s: float = Field(
        default=20.0, gt=0, description="a worker or lander asked to stop exits within this (broker unreachable too)"
    )
    max_record_bytes: int = Field(
        default=1_000_000, ge=64 * 1024,
        description="largest output record the worker sends (Kafka's default max.message.bytes is 1 MiB); a record's "
        "outputs over it go to the dead letters",
    )  # fmt: skip
    max_parked_feedback: int = Field(
        default=32, ge=1, description="feedback events kept for an interaction not yet arrived; more: dead letters"
    )
    max_parked_bytes: int = Field(
        default=256 * 1024, ge=1024, description="bytes of feedback kept for one interaction that has not arrived"
    )
    max_feedback_per_interaction: int = Field(
        default=256, ge=1, description="distinct feedback events one interaction takes; more: dead letters"
    )
    max_session_steps: int = Field(
        default=1024, ge=1, description="steps one multi-step session joins; later steps are scored but not joined"
    )
    land: bool = Field(default=True, description="run the lander process beside the worker (DuckDB and/or Parquet)")
    land_duckdb: bool = Field(default=True, description="land in the DuckDB file (one owner, others stand by)")
    parquet_url: str | None = Field(
        default=None,
        description="also land the event tables as hive-partitioned Parquet (by date, task type) under this "
        "directory or object-store URL; every worker lands its share in parallel",
    )
    metrics_port: int = Field(default=0, ge=0, le=65535, description="Prometheus /metrics of the worker; 0: off")


Strategy = Literal["plain", "cot", "structured"]


class LearnerSettings(_Component, section="learner"):
    """TAO rounds: prompt selection, test-time compute, scoring, RL, the gate, and the schedule."""

    # select
    task_types: list[str] | None = Field(default=None, description="only prompts of these task types")
    window_hours: float | None = Field(default=None, gt=0, description="only prompts this recent; unset: all")
    max_prompts: int = Field(default=256, ge=2, description="distinct prompts per round (by content hash)")
    heldout_fraction: float = Field(default=0.2, gt=0, lt=1, description="share of prompts drawn fresh for the gate")
    task_quotas: dict[str, int] = Field(
        default_factory=dict, description="most prompts per task type in a round ('default' for unlisted types)"
    )
    session_prompts: dict[str, Literal["steps", "first"]] = Field(
        default_factory=dict,
        description="per task type ('default' for unlisted types): train on every step of multi-step sessions "
        "('steps', the default) or on each session's first prompt only ('first': the task as the agent got it)",
    )
    parent_from: Literal["served", "published"] = Field(
        default="served", description="continue from the adapter the gateway serves, or the last one published"
    )
    heldout_id_digits: int = Field(
        default=4, ge=1, description="numbers this long count as ids in the split's normal form (1: every number)"
    )
    heldout_near_duplicate: float = Field(
        default=0.7, gt=0, le=1, description="MinHash Jaccard at which a training prompt is too near a held-out one"
    )
    # generate (k is the test-time-compute budget)
    backend: Literal["transformers", "vllm"] = "transformers"
    device: str = Field(
        default="auto",
        description="auto, cpu, cuda, cuda:1 ...: the one GPU a round generates, scores and trains on (training on "
        "CUDA runs in a child process that sees only this GPU; several GPUs: accelerate_config)",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    k: int = Field(default=8, ge=2, description="candidates per prompt: the test-time-compute budget")
    k_max: int | None = Field(
        default=None, ge=2, description="adaptive k: most candidates for a prompt whose first k failed; unset: 2*k"
    )
    temperatures: list[float] = Field(default_factory=lambda: [0.7, 1.0], min_length=1)
    strategies: list[Strategy] = Field(default_factory=lambda: list[Strategy](["plain"]), min_length=1)
    max_new_tokens: int = Field(default=128, ge=1)
    generation_batch_size: int = Field(default=64, ge=1, description="prompts per generate() call")
    # score: empty means the stream's scorers
    scorers: list[ScorerSpec] = Field(default_factory=list)
    # train
    mode: Literal["grpo", "offline", "rft", "rft+grpo"] = Field(
        default="grpo",
        description="online GRPO, DPO on stored best/worst (offline), SFT on verified best candidates (rft), or both",
    )
    reward_threshold: float = Field(
        default=0.5, ge=0, le=1, description="a candidate at or above it passed (rft trains on it; adaptive k)"
    )
    rft_per_prompt: int = Field(default=1, ge=1, description="rft: distinct best passing candidates kept per prompt")
    rft_steps: int | None = Field(default=None, ge=1, description="rft optimizer steps; unset: steps")
    kl_beta: float = Field(
        default=0.04, ge=0, description="GRPO KL weight against the parent adapter (TRL's default 0 lets rounds drift)"
    )
    steps: int = Field(default=30, ge=1, description="optimizer steps per round")
    learning_rate: float = Field(default=5e-4, gt=0)
    batch_prompts: int = Field(default=4, ge=1, description="prompts per RL step")
    lora_r: int = Field(default=8, ge=1)
    lora_alpha: int = Field(default=16, ge=1)
    lora_target_modules: list[str] | str = "all-linear"
    trl: dict[str, Any] = Field(default_factory=dict, description="extra fields for TRL's GRPOConfig / DPOConfig")
    # the GPU path (README, "The learner on GPUs")
    vllm_gpu_memory_utilization: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="share of the GPU's memory a vLLM engine may take (the round's engine; GRPO's colocated one). "
        "vLLM refuses to start unless that much is free: 0.5 leaves room for the reward model, the learner's CUDA "
        "context and a gateway on the same GPU; raise it on a GPU the learner has alone",
    )
    vllm_sleep_mode: bool = Field(
        default=True,
        description="backend vllm: the round's engine sleeps (weights to CPU memory, KV cache freed) while the "
        "adapter trains and wakes for the gate; false: it is deleted and built again",
    )
    grpo_vllm_mode: Literal["colocate", "server", "off"] = Field(
        default="colocate",
        description="backend vllm: how GRPO samples its completions: TRL's vLLM engine on the training GPU "
        "(colocate), a `trl vllm-serve --model BASE` server (server; not `vllm serve`), or transformers (off)",
    )
    vllm_server_host: str = Field(default="127.0.0.1", description="grpo_vllm_mode server: the `trl vllm-serve` host")
    vllm_server_port: int = Field(default=8000, ge=1, le=65535, description="grpo_vllm_mode server: its port")
    train_process: Literal["auto", "inline", "child"] = Field(
        default="auto",
        description="where the trainer runs: a child process (auto on CUDA: it sees only the selected GPU, and "
        "all its memory is returned when it exits) or in the learner's own process (auto on CPU)",
    )
    accelerate_config: Path | None = Field(
        default=None,
        description="train under `accelerate launch --config_file` this file: several GPUs with DDP, DeepSpeed "
        "ZeRO-2 or FSDP (examples in deploy/accelerate/); its num_processes and gpu_ids choose the GPUs",
    )
    # gate
    gate_margin: float = Field(default=0.0, description="least mean held-out reward gain to publish")
    gate_confidence: float = Field(default=0.9, gt=0, lt=1, description="paired bootstrap one-sided confidence")
    gate_samples: int = Field(default=1, ge=1, description="responses per held-out prompt and policy")
    gate_temperature: float = Field(default=1.0, ge=0, description="the gate samples as the gateway serves (0: greedy)")
    gate_top_p: float = Field(default=1.0, gt=0, le=1)
    gate_alpha_spending: Literal["basel", "none"] = Field(
        default="basel",
        description="basel: round i against one parent tests at (1-confidence)*6/(pi^2 i^2), so all rounds together "
        "publish a no-gain adapter with probability at most 1-confidence; none: every round at 1-confidence",
    )
    gate_task_margin: float = Field(
        default=0.05, ge=0, description="refuse when any task type's mean held-out reward drops by more than this"
    )
    # schedule
    interval_minutes: float | None = Field(default=60.0, gt=0)
    cron: str | None = Field(default=None, description="crontab expression; replaces interval_minutes")
    min_new_prompts: int = Field(default=32, ge=0, description="skip a scheduled round until this many new prompts")
    metrics_port: int = Field(default=0, ge=0, le=65535, description="Prometheus /metrics of `taoflow learner`")
    seed: int = 0

    @model_validator(mode="after")
    def _gpu_placement(self) -> LearnerSettings:
        if self.accelerate_config is not None:
            if self.train_process == "inline":
                raise ValueError("accelerate_config runs the trainer under `accelerate launch`: not with inline")
            if re.fullmatch(r"cuda:\d+", self.device):
                raise ValueError(
                    f"device {self.device!r} with accelerate_config: the accelerate config's gpu_ids choose the "
                    "training GPUs; set device to cuda or auto"
                )
        return self


class OperatorSpec(BaseModel):
    """A serving strategy: a system prompt and/or a template around the user's last message."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=120, pattern=r"^[^@/]+$")
    system_prompt: str | None = None
    template: str | None = Field(default=None, description="e.g. 'Answer briefly: {prompt}'")


class ServeSettings(_Component, section="serve"):
    """The gateway: address, auth, limits, backend, operators per task type, adapter lifecycle."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    model_name: str = Field(default="taoflow", description="the routed model name clients ask for")
    backend: Literal["transformers", "vllm", "openai"] = "transformers"
    device: str = "auto"
    vllm_url: str | None = Field(default=None, description="attach to a running vLLM OpenAI server (…/v1)")
    vllm_launch: bool = Field(default=False, description="start `vllm serve` with runtime LoRA ourselves")
    api_keys: list[SecretStr] = Field(default_factory=list, description="bearer tokens; empty: no auth (loopback)")
    admin_keys: list[SecretStr] = Field(default_factory=list, description="bearer tokens of the admin scope")
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024)
    max_tokens: int = Field(default=256, ge=1, description="default and upper bound of max_tokens")
    operators: dict[str, list[OperatorSpec]] = Field(
        default_factory=lambda: {"default": [OperatorSpec(name="default")]},
        description="per task type; 'default' serves task types not listed",
    )
    canary_fraction: float = Field(default=0.1, ge=0, le=1, description="least share of traffic a canary gets")
    session_ttl_s: float = Field(
        default=3600.0, gt=0, description="how long a multi-step session keeps its operator after its last step"
    )
    max_sessions: int = Field(default=100_000, ge=1, description="sessions whose operator a gateway keeps (LRU)")
    # release decisions: a sequential test on canary vs incumbent rewards (serving/release.py, bench/canary.py)
    release_alpha: float = Field(
        default=0.05, gt=0, lt=1, description="error rate of each release decision (promote a no-better canary, ...)"
    )
    release_tau: float = Field(
        default=0.05, gt=0, description="the reward difference the test is tuned to detect fastest (mixture scale)"
    )
    release_min_effect: float = Field(default=0.0, ge=0, description="promote only when better by more than this")
    rollback_margin: float = Field(default=0.0, ge=0, description="roll back when worse by more than this")
    promote_after: int = Field(default=30, ge=2, description="least rewards per side before any decision")
    release_max_rewards: int = Field(
        default=20_000, ge=2, description="canary rewards after which an undecided canary is rolled back (unproven)"
    )
    watch_fraction: float = Field(
        default=0.05, ge=0, le=1, description="traffic share the previous adapter keeps while a promoted one is watched"
    )
    agent_id: str = "gateway"
    vllm_api_key: SecretStr | None = Field(
        default=None, description="bearer key of the vLLM server (its VLLM_API_KEY / --api-key)"
    )
    # how a launched vLLM server is started (`vllm serve` flags); an attached one must be started with the same
    vllm_max_loras: int = Field(
        default=4, ge=1, description="adapters vLLM keeps on the GPU at once (--max-loras): canary, incumbent and a "
        "watched predecessor stay resident instead of reloading from disk on every switch",
    )  # fmt: skip
    vllm_max_cpu_loras: int | None = Field(
        default=None, ge=1, description="adapters vLLM caches in CPU memory (--max-cpu-loras, at least "
        "vllm_max_loras; default: vLLM's, equal to vllm_max_loras)",
    )  # fmt: skip
    vllm_max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] | None = Field(
        default=None, description="--max-lora-rank, one of the ranks vLLM accepts; default: the learner's "
        "lora_r rounded up to one (taoflow.lora.vllm_lora_rank)",
    )  # fmt: skip
    vllm_served_model_name: str | None = Field(
        default=None, description="the name vLLM serves the base model under (--served-model-name; default: the "
        "base model's path or id)",
    )  # fmt: skip
    vllm_start_timeout_s: float = Field(
        default=900.0, ge=0, description="how long start-up waits for the vLLM server (launched or attached) to "
        "answer before the gateway gives up; 0: do not wait",
    )  # fmt: skip
    metrics_keys: list[SecretStr] = Field(
        default_factory=list, description="bearer tokens that may read /metrics (admin keys may too)"
    )
    trusted_keys: list[SecretStr] = Field(
        default_factory=list,
        description="API keys that may set reserved metadata (scorer references) and X-Taoflow-Agent; admin keys "
        "and the no-auth mode are trusted too",
    )
    reserved_metadata_keys: list[str] = Field(
        default_factory=lambda: ["answer", "answers", "reference", "expected"],
        description="client metadata keys scorers trust; dropped from untrusted callers' interactions",
    )
    rate_limit_per_s: float = Field(default=100.0, ge=0, description="requests per second per API key; 0: off")
    rate_limit_burst: int = Field(default=1000, ge=1, description="token-bucket size per API key")
    allow_open: bool = Field(
        default=False, description="start with no keys on a non-loopback host (anyone who reaches it may use it)"
    )
    upstream_url: str | None = Field(
        default=None, description="the OpenAI-compatible server of backend 'openai' (…/v1: vLLM, Ollama, a hosted API)"
    )
    upstream_api_key: SecretStr | None = Field(default=None, description="bearer key the gateway sends upstream")
    upstream_model: str | None = Field(
        default=None, description="the upstream's model name for the base model (default: core.base_model)"
    )
    upstream_timeout_s: float = Field(
        default=120.0, gt=0, description="connect and per-read limit on upstream calls (a stalled stream is cut)"
    )


C = TypeVar("C", bound=_Component)


class _Slot(Generic[C]):
    """A component of `Settings` under its section's name, validated (with the overrides) on first use and kept."""

    def __init__(self, cls: type[C]) -> None:
        self.cls = cls

    def __set_name__(self, owner: type, name: str) -> None:
        if name != self.cls.section:
            raise TypeError(f"Settings.{name} holds {self.cls.__name__}, whose section is {self.cls.section!r}")

    @overload
    def __get__(self, obj: None, owner: type) -> _Slot[C]: ...
    @overload
    def __get__(self, obj: Settings, owner: type) -> C: ...
    def __get__(self, obj: Settings | None, owner: type) -> _Slot[C] | C:
        if obj is None:
            return self
        name = self.cls.section
        try:
            value = self.cls(**obj.overrides.get(name, {}))
        except ValidationError as exc:
            problems = "; ".join(
                f"{name}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False)
            )
            raise ConfigError(f"invalid settings: {problems}") from None
        obj.__dict__[name] = value  # kept: the instance attribute shadows this (non-data) descriptor from now on
        return value


@dataclass
class Settings:
    """All component settings; each reads its own `TAOFLOW_<COMPONENT>_*` variables and `[component]` table."""

    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    core = _Slot(CoreSettings)
    kafka = _Slot(KafkaSettings)
    broker = _Slot(BrokerSettings)
    limits = _Slot(LimitsSettings)
    sdk = _Slot(SdkSettings)
    stream = _Slot(StreamSettings)
    learner = _Slot(LearnerSettings)
    serve = _Slot(ServeSettings)

    @property
    def embedded(self) -> bool:
        """True when no Kafka cluster is configured, so the embedded broker is used."""
        return not self.kafka.bootstrap

    @property
    def bootstrap(self) -> str:
        """The bootstrap servers every component connects to."""
        return self.kafka.bootstrap or self.broker.bootstrap

    def components(self) -> dict[str, _Component]:
        return {name: getattr(self, name) for name, v in vars(type(self)).items() if isinstance(v, _Slot)}

    def environ(self) -> dict[str, str]:
        """These settings as `TAOFLOW_*` variables (secrets in clear), to hand to a child process."""
        import json

        out: dict[str, str] = {}
        for comp in self.components().values():
            prefix = str(comp.model_config.get("env_prefix", ""))
            for name in type(comp).model_fields:
                value = getattr(comp, name)
                if value is None:
                    continue
                if isinstance(value, SecretStr):
                    value = value.get_secret_value()
                if isinstance(value, list) and any(isinstance(v, SecretStr) for v in value):
                    text = json.dumps([v.get_secret_value() if isinstance(v, SecretStr) else v for v in value])
                elif isinstance(value, (list, dict)):
                    text = json.dumps(comp.model_dump(mode="json", by_alias=True)[name])
                else:
                    text = str(value)
                out[f"{prefix}{name}".upper()] = text
        return out

    def masked(self) -> dict[str, dict[str, Any]]:
        """Every setting, secrets masked: what `taoflow config` prints."""
        return {name: comp.masked() for name, comp in self.components().items()}
