"""Learner fixtures: a warmed-up tiny model (weak, not random) and prompts landed in the outcome table."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from pathlib import Path

from streams import store
from taoflow.settings import Settings

NO_KAFKA = "127.0.0.1:9"  # nothing listens: the learner writes the DuckDB file itself


def land_prompts(settings: Settings, prompts: list[str], task_type: str = "math") -> None:
    """Rows in `interactions` as the lander writes them (responses are placeholders: TAO never reads them)."""
    con = store.connect(settings.core.duckdb_path)
    now = datetime.now(UTC)
    values = [
        (str(uuid.uuid4()), now, "test", task_type, "direct", p, False, hashlib.sha256(p.encode()).hexdigest(), "-",
         None, 1.0, "{}", 0, i, None, False)
        for i, p in enumerate(prompts)
    ]  # fmt: skip
    cols = store.COLUMNS["interactions"][: len(values[0])]  # the later, optional columns take their defaults
    store.insert(con, "interactions", {c: [v[i] for v in values] for i, c in enumerate(cols)})
    con.close()


def learner_settings(data_dir: Path, base: Path, bootstrap: str = NO_KAFKA, **learner: object) -> Settings:
    cfg = {"scorers": [{"type": "arithmetic"}], "k": 4, "steps": 4, "max_new_tokens": 4, "max_prompts": 80,
           "learning_rate": 2e-3, "temperatures": [1.0], **learner}  # fmt: skip
    return Settings(overrides={"core": {"data_dir": data_dir, "base_model": str(base)},
                               "kafka": {"bootstrap": bootstrap}, "learner": cfg})  # fmt: skip


def land_rows(settings: Settings, items: list[tuple[object, str, dict]]) -> None:
    """`interactions` rows from (prompt, task_type, metadata): a prompt that is a list is a chat."""
    import json

    con = store.connect(settings.core.duckdb_path)
    now = datetime.now(UTC)
    values = []
    for i, (prompt, task, meta) in enumerate(items):
        chat = not isinstance(prompt, str)
        text = json.dumps(prompt) if chat else str(prompt)
        digest = hashlib.sha256(text.encode()).hexdigest()
        values.append((str(uuid.uuid4()), now, "test", task, "direct", text, chat, digest, "-", None, 1.0,
                       json.dumps(meta), 0, i, None, False))  # fmt: skip
    cols = store.COLUMNS["interactions"][: len(values[0])]  # the later, optional columns take their defaults
    store.insert(con, "interactions", {c: [v[i] for v in values] for i, c in enumerate(cols)})
    con.close()


def announce(settings: Settings, adapter: str, *actions: str) -> None:
    """AdapterEvents as the gateway emits them (published, promoted, rolled_back), into the `adapters` table."""
    import time

    from learners.records import RecordSink
    from schemas import AdapterEvent

    with RecordSink(settings, prefer_kafka=False) as sink:
        for action in actions:
            time.sleep(0.002)  # events of one adapter are ordered by ts
            sink.adapter_event(
                AdapterEvent(adapter=adapter, action=action, base_model=str(settings.core.base_model))  # type: ignore[arg-type]
            )


def make_adapter(settings: Settings, name: str, *, r: int = 8, noise: float = 0.0, seed: int = 0) -> Path:
    """A LoRA adapter in `adapters/<name>/` with a manifest; `noise` > 0 moves its B matrices off zero."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model

    from learners.generation import load_policy

    model, _ = load_policy(str(settings.core.base_model), None, device="cpu", dtype=None, trainable=True)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for pname, p in peft.named_parameters():
            if "lora_B" in pname and noise:
                p.normal_(0, noise)
    out = settings.core.adapters_dir / name
    peft.save_pretrained(str(out))
    (out / "manifest.json").write_text(json.dumps({"adapter": name, "sha256": "0" * 64}))
    return out
