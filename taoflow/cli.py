"""The `taoflow` command line: one command per component, user mistakes as one-line errors."""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from taoflow.exceptions import TaoflowError


class _Group(click.Group):
    """Turns taoflow's own errors into `error: ...` on stderr and exit code 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TaoflowError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


def _setup_logging(level: str) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    # logs go to stderr: stdout carries results (JSON, CSV, tables) that users pipe into other tools
    handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False, markup=False)
    logging.basicConfig(level=level, format="%(name)s: %(message)s", datefmt="[%X]", handlers=[handler], force=True)
    # library request logs (one line per HTTP request or Kafka reconnect) drown the story: shown only at DEBUG
    for noisy in ("kafka", "aiokafka", "httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def _settings() -> Any:
    from taoflow.settings import Settings

    return Settings()


def _wait_for_signal(alive: Any = None) -> None:
    """Block the main thread until SIGINT or SIGTERM, or until `alive()` turns false (raises then)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        if alive is not None and not alive():
            raise TaoflowError("the embedded broker process exited unexpectedly")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="taoflow")
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR (default: TAOFLOW_LOG_LEVEL or INFO).")
def cli(log_level: str | None) -> None:
    """taoflow: turn deployed agents' interactions into a better model, continuously."""
    level = (log_level or _settings().core.log_level).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise click.BadParameter(f"{log_level!r} is not one of DEBUG, INFO, WARNING, ERROR", param_hint="--log-level")
    _setup_logging(level)


@cli.command()
@click.option("--port", type=int, default=None, help="Port on loopback (default: TAOFLOW_BROKER_PORT or 9092).")
@click.option("--partitions", type=int, default=None, help="Partitions per topic (default: TAOFLOW_BROKER_PARTITIONS).")
def broker(port: int | None, partitions: int | None) -> None:
    """Run the embedded Kafka-compatible broker (memory storage) on loopback until Ctrl-C."""
    from taoflow.broker import EmbeddedBroker
    from taoflow.settings import Settings

    overrides: dict[str, Any] = {}
    if port is not None:
        overrides["port"] = port
    if partitions is not None:
        overrides["partitions"] = partitions
    settings = Settings(overrides={"broker": overrides})
    with EmbeddedBroker(settings) as b:
        click.echo(f"embedded broker ready on {b.bootstrap} (TAOFLOW_KAFKA_BOOTSTRAP={b.bootstrap}); Ctrl-C stops it")
        _wait_for_signal(b.alive)
    click.echo("broker stopped")


@cli.command()
@click.option("--workers", type=int, default=1, show_default=True, help="Stream worker processes (one group).")
@click.option("--no-learner", is_flag=True, help="Do not run the TAO scheduler.")
@click.option("--no-gateway", is_flag=True, help="Do not run the gateway.")
def up(workers: int, no_learner: bool, no_gateway: bool) -> None:
    """Everything on embedded defaults: broker (when no Kafka is configured), stream workers, learner, gateway.

    Children are restarted with backoff when they die; Ctrl-C stops them all once. Logs are interleaved with a
    [name] prefix.
    """
    from rich.console import Console
    from rich.markup import escape

    from taoflow.up import Supervisor

    if workers < 1:
        raise click.BadParameter("must be at least 1", param_hint="--workers")
    settings = _settings()
    console = Console(stderr=True, soft_wrap=True)

    def echo(name: str, color: str, line: str) -> None:
        console.print(f"[{color}]{name:>9}[/] | {escape(line)}", highlight=False)

    sup = Supervisor(settings, workers=workers, learner=not no_learner, gateway=not no_gateway, echo=echo)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sup.stop_event.set())
    host, port = settings.serve.host, settings.serve.port
    console.print(f"[bold]taoflow up[/]: Kafka {settings.bootstrap}"
                  + (" (embedded)" if settings.embedded else "") + f"; DuckDB {settings.core.duckdb_path}")  # fmt: skip
    if not no_gateway:
        console.print(f'  gateway   http://{host}:{port}/v1   (model "{settings.serve.model_name}")')
        console.print(f"  dashboard http://{host}:{port}/dashboard")
    console.print('  SQL       taoflow sql "SELECT * FROM operator_leaderboard"; Ctrl-C stops everything')
    sys.exit(sup.run())


@cli.command()
@click.option("--no-lander", is_flag=True, help="Do not land into DuckDB from this process (another one does).")
def worker(no_lander: bool) -> None:
    """The stream processors (a faust worker); several may run in one consumer group."""
    from streams.worker import run_worker
    from taoflow.settings import Settings

    settings = Settings(overrides={"stream": {"land": False}} if no_lander else {})
    run_worker(settings, loglevel=logging.getLevelName(logging.getLogger().level).lower())


@cli.command()
def lander() -> None:
    """The lander alone: sole owner of the DuckDB file, it lands every outcome topic and answers SQL on its port.

    `taoflow worker` starts one beside itself; run it alone where workers run with TAOFLOW_STREAM_LAND_DUCKDB=false
    (one lander per DuckDB file; a second one stands by until the first lets go)."""
    from streams.lander import main

    main()


@cli.command()
@click.option("--now", "run_now", is_flag=True, help="Also run a round right away (still subject to min_new_prompts).")
def learner(run_now: bool) -> None:
    """The TAO scheduler: runs rounds on an interval or cron schedule.

    Set TAOFLOW_LEARNER_INTERVAL_MINUTES or TAOFLOW_LEARNER_CRON, and TAOFLOW_LEARNER_MIN_NEW_PROMPTS. The
    job's next run time survives restarts; a round a crash interrupted is marked failed at start.
    """
    from learners.scheduler import run_scheduler

    run_scheduler(_settings(), run_now=run_now)


@cli.group(cls=_Group)
def tao() -> None:
    """TAO rounds."""


@tao.command("run")
@click.option("--k", type=int, default=None, help="Candidates per prompt (test-time compute); default learner.k.")
@click.option("--steps", type=int, default=None, help="RL optimizer steps; default learner.steps.")
@click.option("--mode", type=click.Choice(["grpo", "offline"]), default=None, help="Default learner.mode.")
def tao_run(k: int | None, steps: int | None, mode: str | None) -> None:
    """Run one TAO round now, with a progress bar per stage.

    Prompts come from the `interactions` table (inputs only); the scorers are learner.scorers, else the
    stream's. Prints the round's outcome; `taoflow sql "SELECT * FROM tao_rounds"` shows every round.
    """
    from learners.tao import run_round
    from taoflow.bars import StageBars, bars
    from taoflow.settings import Settings

    overrides = {key: v for key, v in (("k", k), ("steps", steps), ("mode", mode)) if v is not None}
    settings = Settings(overrides={"learner": overrides}) if overrides else _settings()
    with bars() as progress:
        result = run_round(settings, StageBars(progress))
    m = result.metrics
    click.echo(
        f"round {result.round_id}: {result.status}" + (f" -> adapter {result.adapter}" if result.adapter else "")
    )
    if result.error:
        click.echo(f"  {result.error}")
    if result.records:
        click.echo(f'  rows: {result.records}; see them with taoflow sql "SELECT * FROM round_history"')
    shown = ("prompts_selected", "prompts_informative", "prompts_uniform_skipped", "best_of_k_reward",
             "heldout_reward_current", "heldout_reward_new", "gain", "gain_lcb", "generation_tokens_per_s")  # fmt: skip
    for key in shown:
        if key in m:
            click.echo(f"  {key}: {m[key]:g}")
    if result.status == "failed":
        sys.exit(1)


@cli.command()
@click.option("--port", type=int, default=None, help="Default TAOFLOW_SERVE_PORT (8000).")
def serve(port: int | None) -> None:
    """The OpenAI-compatible gateway and its model backend.

    Point any OpenAI client at http://HOST:PORT/v1 with model "taoflow" (routed by utility), an adapter's
    name, or "base". Every request becomes an interaction; post feedback to /v1/feedback with the
    interaction id from the response. Published adapters are loaded live as canaries.
    """
    from serving.server import run_server
    from taoflow.settings import Settings

    run_server(Settings(overrides={"serve": {"port": port}}) if port is not None else _settings())


@cli.command()
@click.argument("query")
@click.option("--format", "fmt", type=click.Choice(["table", "plain", "json", "csv"]), default=None,
              help="table on a terminal, plain (tab-separated, a header line) when piped")  # fmt: skip
def sql(query: str, fmt: str | None) -> None:
    """Run SQL over the outcome tables, also while ingestion runs."""
    from streams.sqlapi import query as run

    result = run(query, _settings())
    fmt = fmt or ("table" if sys.stdout.isatty() else "plain")
    if fmt == "plain":
        click.echo("\t".join(result.columns))
        for row in result.rows:
            click.echo("\t".join("" if v is None else str(v) for v in row))
    elif fmt == "json":
        click.echo(json.dumps(result.as_dicts(), default=str))
    elif fmt == "csv":
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(result.columns)
        writer.writerows(result.rows)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(*result.columns, show_lines=False)
        for column in table.columns:
            column.overflow = "fold"  # names users need are wrapped, never cut with an ellipsis
        for row in result.rows:
            table.add_row(*("" if v is None else str(v) for v in row))
        Console().print(table)
        click.echo(f"{len(result.rows)} row(s)", err=True)


@cli.command()
@click.option("--since", default=None, help="Only this recent: 30m, 2h, 7d, or an ISO time.")
@click.option("--task-type", default=None, help="Only this task type.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True,
              help="json: every section; csv: the reward series (bucket x adapter x task type).")  # fmt: skip
def report(since: str | None, task_type: str | None, fmt: str) -> None:
    """Continuous improvement over time, in the terminal.

    Reward over time per task type (sparklines, with markers where adapters were published, promoted or
    rolled back), the operator leaderboard, TAO rounds and data health, from the SQL views.
    """
    from rich.console import Console

    from taoflow import report as rep

    data = rep.gather(_settings(), rep.parse_since(since), task_type)
    if fmt == "json":
        click.echo(json.dumps(data, indent=1, default=str))
    elif fmt == "csv":
        click.echo(rep.to_csv(data), nl=False)
    else:
        rep.render(data, Console())


@cli.command()
@click.option("--port", type=int, default=8001, show_default=True)
def dashboard(port: int) -> None:
    """The web dashboard on its own (the gateway also serves it at /dashboard).

    Reward over time per adapter with publish/promote/rollback markers, operator utilities, TAO rounds,
    throughput and dead letters; refreshes by itself. Needs an admin key when keys are configured.
    """
    import uvicorn

    from serving.dashboard import build_dashboard_app

    settings = _settings()
    click.echo(f"dashboard on http://{settings.serve.host}:{port}/dashboard", err=True)
    uvicorn.run(build_dashboard_app(settings), host=settings.serve.host, port=port, log_level="warning")


@cli.command()
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for repeatable runs.")
@click.option("--events", type=int, default=3000, show_default=True, help="Requests the agents send.")
@click.option("--fast", is_flag=True, help="A shortened run (1,500 requests, 50 training steps).")
def demo(seed: int, events: int, fast: bool) -> None:
    """The end-to-end demo on embedded defaults (what `make demo` runs).

    Simulated agents send math questions (a verifier scores the answers) and support chats (users report
    success later) through the gateway, which routes by the utilities the stream learns. A TAO round then
    trains an adapter on the landed math prompts (no labels), the gate checks it, the gateway hot-swaps it in
    as a canary and promotes it when it beats the base. Data goes to <TAOFLOW_DATA_DIR>/demo.
    """
    import shutil

    from rich.console import Console
    from rich.table import Table

    from taoflow.bars import bars
    from taoflow.demo import SUPPORT_QUALITY, run_demo
    from taoflow.settings import Settings

    console = Console()
    base = Settings()
    data_dir = base.core.data_dir / "demo"
    shutil.rmtree(data_dir, ignore_errors=True)
    settings = Settings(overrides={"core": {"data_dir": data_dir}})
    n = 1500 if fast else events
    where = "the embedded broker" if settings.embedded else settings.bootstrap
    console.print(f"[bold]taoflow demo[/]: {n} requests through the gateway and {where}; data in {data_dir}")
    with bars(console) as progress:  # a bar per phase's traffic and per round stage; phase lines print above them
        result = run_demo(settings, events=n, seed=seed, train_steps=50 if fast else 100, progress=progress,
                          log=lambda msg: progress.console.print(msg, highlight=False))  # fmt: skip
    table = Table("task", "operator", "true quality", "learned utility", title="What the loop learned")
    for column in table.columns:
        column.overflow = "fold"  # adapter names (`direct@tao-2026...`) are what users copy: never cut them
    for task, ops in sorted(result.utilities.items()):
        for op, u in sorted(ops.items(), key=lambda kv: -kv[1]):
            strategy, _, adapter = op.partition("@")
            if task == "support":
                truth = f"{SUPPORT_QUALITY.get(strategy, 0):.2f}"
            elif adapter == "base":
                truth = f"{result.math_success.get(strategy, 0):.2f} (verifier)"
            else:
                truth = "-"
            table.add_row(task, op, truth, f"{u:.3f}")
    console.print(table)
    for r in result.rounds:
        m = r.metrics
        before, after = m.get("heldout_reward_current", 0), m.get("heldout_reward_new", 0)
        adapter = f"; adapter {r.adapter}" if r.adapter else ""
        console.print(f"TAO round {r.round_id}: {r.status}; held-out reward {before:.3f} -> {after:.3f}{adapter}")
    console.print("Adapter events: " + (", ".join(f"{a} {n}" for a, n in result.events) or "none"))
    support = "match" if result.support_order_ok() else "do NOT match"
    math = "match" if result.math_order_ok() else "do not match"
    console.print(f"Support utilities {support} the strategies' true order; math utilities {math} the "
                  "verifier's. Adapter "
                  + ("published and promoted." if result.published and result.promoted else
                     "published, not promoted." if result.published else "not published.")
                  + f" {result.requests} requests, {result.failures} failed, {result.seconds:.0f}s.")  # fmt: skip
    console.print("Look further (the data stays in place):")
    examples = (
        "taoflow report",
        'taoflow sql "SELECT * FROM operator_leaderboard"',
        'taoflow sql "SELECT round_id, decision, reward_before, reward_after FROM round_history"',
    )
    for example in examples:
        console.print(f"  TAOFLOW_DATA_DIR={data_dir} {example}", markup=False, highlight=False)


@cli.group(cls=_Group)
def models() -> None:
    """Local model directories (no hub needed)."""


@models.command("make-tiny")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--hidden-size", type=int, default=64, show_default=True)
@click.option("--layers", type=int, default=2, show_default=True)
def models_make_tiny(directory: Path, seed: int, hidden_size: int, layers: int) -> None:
    """Build a tiny Llama-shaped model and tokenizer locally into DIRECTORY (no hub needed).

    The directory loads with transformers' from_pretrained like any model; point TAOFLOW_BASE_MODEL at it.
    """
    from learners.models import make_tiny

    path = make_tiny(directory, seed=seed, hidden_size=hidden_size, layers=layers)
    click.echo(f"tiny model written to {path}; use it with TAOFLOW_BASE_MODEL={path}")


@cli.group(cls=_Group)
def schemas() -> None:
    """Event contracts."""


@schemas.command("export")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def schemas_export(directory: Path) -> None:
    """Write the JSON Schema of every event into DIRECTORY."""
    from schemas.registry import export_json_schemas

    try:
        paths = export_json_schemas(directory)
    except OSError as exc:
        raise TaoflowError(f"cannot write schemas to {directory}: {exc.strerror}") from None
    for p in paths:
        click.echo(str(p))


@cli.group(cls=_Group)
def knowledge() -> None:
    """Portable knowledge: which strategy works for which task type, across base models and deployments."""


@knowledge.command("export")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def knowledge_export(file: Path) -> None:
    """Write the operators and their learned utilities (with the base model, adapters and times) to FILE (JSON)."""
    from taoflow.knowledge import dumps, export_knowledge

    doc = export_knowledge(_settings())
    try:
        file.write_text(dumps(doc))
    except OSError as exc:
        raise TaoflowError(f"cannot write {file}: {exc.strerror}") from None
    tasks = len({u.task_type for u in doc.utilities})
    click.echo(f"exported {len(doc.utilities)} utilities of {tasks} task type(s) to {file} (id {doc.export_id})")


@knowledge.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--adapter", default=None, help="Seed the strategies on this adapter (default: the base model).")
@click.option(
    "--discount",
    type=float,
    default=None,
    help="Share of exported rewards kept as evidence (default TAOFLOW_STREAM_KNOWLEDGE_DISCOUNT).",
)
@click.option("--dry-run", is_flag=True, help="Show what would be seeded; send nothing.")
def knowledge_import(file: Path, adapter: str | None, discount: float | None, dry_run: bool) -> None:
    """Seed this deployment's utilities from FILE: the stream worker applies each seed once (importing a file
    again is a no-op), never over utilities learned here, and fresh rewards soon outweigh it."""
    from taoflow.knowledge import load, plan_import, seed_records, send

    settings = _settings()
    plan = plan_import(load(file), settings, adapter=adapter, discount=discount)
    for line in plan.lines(settings.core.base_model):
        click.echo(line)
    if plan.missing:
        click.echo("to route them too, declare them in taoflow.toml (then import again) as:")
        click.echo(plan.toml(settings), nl=False)
    if dry_run:
        click.echo(f"dry run: {len(plan.seeds)} seed(s) not sent")
        return
    send(settings, seed_records(plan))
    click.echo(f"sent {len(plan.seeds)} seed(s) to the stream worker; `taoflow report` shows imported vs learned "
               "evidence once they are applied")  # fmt: skip


_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):[^/\s]*@")  # password up to the last @


def _mask_urls(value: Any) -> Any:
    """Passwords inside URLs (`s3://user:pass@host`, `postgresql://u:p@h/db`) masked like SecretStr values.

    >>> _mask_urls({"url": "http://u:p@h/x", "n": 1})
    {'url': 'http://u:**********@h/x', 'n': 1}
    """
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"\g<head>:**********@", value)
    if isinstance(value, dict):
        return {k: _mask_urls(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_urls(v) for v in value]
    return value


@cli.command("config")
@click.option("--format", "fmt", type=click.Choice(["json", "env"]), default="json", show_default=True)
def config_show(fmt: str) -> None:
    """Print the effective settings, secrets masked."""
    settings = _settings()
    data = _mask_urls(settings.masked())
    if fmt == "json":
        click.echo(json.dumps(data, indent=2))
        return
    prefixes = {"core": "TAOFLOW_", "kafka": "TAOFLOW_KAFKA_", "broker": "TAOFLOW_BROKER_"}
    for section, values in data.items():
        prefix = prefixes.get(section, f"TAOFLOW_{section.upper()}_")
        for key, value in values.items():
            click.echo(f"{prefix}{key.upper()}={'' if value is None else value}")


def main() -> None:
    cli(prog_name="taoflow")


if __name__ == "__main__":
    main()
