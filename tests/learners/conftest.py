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
         None, 1.0, "{}", 0, i)
        for i, p in enumerate(prompts)
    ]  # fmt: skip
    cols = store.COLUMNS["interactions"]
    store.insert(con, "interactions", {c: [v[i] for v in values] for i, c in enumerate(cols)})
    con.close()


def learner_settings(data_dir: Path, base: Path, bootstrap: str = NO_KAFKA, **learner: object) -> Settings:
    cfg = {"scorers": [{"type": "arithmetic"}], "k": 4, "steps": 4, "max_new_tokens": 4, "max_prompts": 80,
           "learning_rate": 2e-3, "temperatures": [1.0], **learner}  # fmt: skip
    return Settings(overrides={"core": {"data_dir": data_dir, "base_model": str(base)},
                               "kafka": {"bootstrap": bootstrap}, "learner": cfg})  # fmt: skip
