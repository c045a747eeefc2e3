"""Which adapter a round continues from, and what a published adapter records about how it was made.

The parent is the adapter the gateway serves: the `adapters` events (the table the lander fills from
`taoflow.adapters`) replayed the way the gateway's router replays them: `promoted` makes an adapter the
incumbent, `rolled_back` of the incumbent restores the one before it. A rolled-back adapter is never a parent,
and a published adapter still in canary is not one until it is promoted. `parent_from = "published"` (a learner
with no gateway, e.g. a benchmark) continues from the newest published adapter not rolled back.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from learners.exceptions import LearnerError
from streams.exceptions import QueryError
from streams.sqlapi import query
from taoflow.settings import Settings

log = logging.getLogger(__name__)

LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets")


def served_adapter(events: Iterable[tuple[str, str]], parent_from: str = "served") -> str | None:
    """The adapter to continue from, given (action, adapter) events oldest first; None: the base model.

    >>> ev = [("published", "a"), ("promoted", "a"), ("published", "b"), ("promoted", "b"), ("rolled_back", "b")]
    >>> served_adapter(ev), served_adapter(ev + [("published", "c")]), served_adapter(ev, "published")
    ('a', 'a', 'a')
    """
    incumbent: str | None = None
    history: list[str | None] = []
    published: list[str] = []
    rolled_back: set[str] = set()
    for action, name in events:
        if action == "published":
            published.append(name)
        elif action == "promoted" and name != incumbent:
            history.append(incumbent)
            incumbent = name
        elif action == "rolled_back":
            rolled_back.add(name)
            if name == incumbent:
                incumbent = history.pop() if history else None
    if parent_from == "published":
        return next((a for a in reversed(published) if a not in rolled_back), None)
    return incumbent


def adapter_events(settings: Settings) -> list[tuple[str, str]]:
    """(action, adapter) from the `adapters` table, oldest first (through the owner of the DuckDB file)."""

    sql = (
        "SELECT action, adapter FROM adapters WHERE action IN ('published', 'promoted', 'rolled_back') "
        "ORDER BY ts, CASE action WHEN 'published' THEN 0 WHEN 'promoted' THEN 1 ELSE 2 END"
    )
    try:
        return [(str(a), str(n)) for a, n in query(sql, settings).rows]
    except QueryError as exc:
        if str(exc).startswith("no outcome database") or ("adapters" in str(exc) and "does not exist" in str(exc)):
            return []  # nothing was ever landed, so nothing was ever published
        raise LearnerError(f"cannot read the adapters table to find the served adapter: {exc}") from None


def check_lora_shape(parent: Path, cfg: Any) -> None:
    """Training continues the parent's LoRA, so its shape wins; a setting that differs is an error, not ignored."""
    try:
        have = json.loads((parent / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise LearnerError(f"parent adapter {parent} has no readable adapter_config.json: {exc}") from None
    diffs = [
        f"{name}={have.get(key)!r} (learner.{name} is {want!r})"
        for name, key, want in (("lora_r", "r", cfg.lora_r), ("lora_alpha", "lora_alpha", cfg.lora_alpha))
        if have.get(key) != want
    ]
    if diffs:
        raise LearnerError(
            f"the served adapter {parent.name} has {', '.join(diffs)}; a round continues the parent's LoRA and "
            "cannot change its shape. Set those settings back to the parent's values, or start a new lineage "
            "from the base by rolling the adapter back (or with learner.parent_from and a fresh data directory)"
        )


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


_WEIGHTS = ("config.json", "generation_config.json", "*.safetensors", "*.bin", "*.safetensors.index.json")


def _model_dir(name_or_path: str) -> Path | None:
    path = Path(name_or_path)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:  # any miss means: not in the local cache
        return None


def base_model_hash(name_or_path: str, cache: Path) -> str | None:
    """sha256 over the base model's config and weight files; cached by file size and mtime (weights are large)."""
    root = _model_dir(name_or_path)
    if root is None:
        log.warning("base model %s is not a local directory or cached snapshot: its hash is not recorded", name_or_path)
        return None
    files = sorted({f for pattern in _WEIGHTS for f in root.glob(pattern) if f.is_file()})
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(root.resolve()))
    if entry and entry.get("stamp") == stamp:
        return str(entry["sha256"])
    total = hashlib.sha256()
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        total.update(f"{f.name} {h.hexdigest()}\n".encode())
    digest = total.hexdigest()
    known[str(root.resolve())] = {"stamp": stamp, "sha256": digest}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(known))
    return digest


def digest_tree(root: Path) -> tuple[str, dict[str, str]]:
    """sha256 of every file under `root` (relative paths), and the total over them: nothing copied goes unhashed."""
    per = {}
    total = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        h = hashlib.sha256(f.read_bytes()).hexdigest()
        per[rel] = h
        total.update(f"{rel} {h}\n".encode())
    return total.hexdigest(), per


def prompts_digest(hashes: Iterable[str]) -> str:
    """One hash for a set of prompt hashes (order-free)."""
    return hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()
