"""Where an adapter lives and whether its files are the ones the learner published (manifest sha256 per file).

An AdapterEvent only names an adapter: its directory is always `adapters_dir / name`, never the event's `path`,
and it is loaded only when every file in it matches `manifest.json` (written by the learner's publish step).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from serving.exceptions import AdapterRefused

ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def check_name(name: str) -> str:
    """`name` when it is a valid adapter name (letters, digits, `_`, `-`; at most 64), else AdapterRefused."""
    if not ADAPTER_NAME.fullmatch(name):
        raise AdapterRefused(
            f"adapter name {name[:80]!r} is not allowed: use 1 to 64 letters, digits, '_' or '-'", status=400
        )
    return name


def adapter_dir(root: Path, name: str) -> Path:
    """The adapter's directory, `root/name` resolved; refused if it resolves outside `root` (a symlink out)."""
    check_name(name)
    base = root.resolve()
    path = (base / name).resolve()
    if path.parent != base:
        raise AdapterRefused(f"adapter {name}: {base / name} resolves to {path}, outside {base}; remove the link")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_adapter(path: Path, name: str, expected: str | None = None) -> str:
    """Check every file of the adapter at `path` against its manifest; returns the adapter's sha256.

    Every file listed must be a regular file (not a link) with the listed sha256; a file in the directory that the
    manifest does not list is refused (loaders read any `adapter_*` / config file they find there); the digest over
    the files (as the learner computes it) must equal the manifest's `sha256` and, when given, `expected` (the
    event's `sha256`). Subdirectories are not read by the loaders and are ignored. Blocking: run in a thread.
    """
    try:
        doc = json.loads((path / MANIFEST).read_bytes())
    except FileNotFoundError:
        raise AdapterRefused(f"adapter {name}: no {MANIFEST} in {path}; only published adapters load") from None
    except (OSError, ValueError) as exc:
        raise AdapterRefused(f"adapter {name}: cannot read {path / MANIFEST}: {exc}") from None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict) or not files or not all(isinstance(v, str) for v in files.values()):
        raise AdapterRefused(f"adapter {name}: {MANIFEST} lists no files with their sha256 ('files')")
    if doc.get("adapter") not in (None, name):
        raise AdapterRefused(f"adapter {name}: its {MANIFEST} is for adapter {doc.get('adapter')!r}")
    total = hashlib.sha256()
    root = path.resolve()
    for fname in sorted(files, key=lambda f: f.split("/")):  # the learner's order (learners.lineage.digest_tree)
        parts = fname.split("/")
        if fname == MANIFEST or "\\" in fname or any(p in ("", ".", "..") for p in parts):
            raise AdapterRefused(f"adapter {name}: {MANIFEST} lists an invalid file name {fname[:80]!r}")
        f = path / fname
        if any((path / "/".join(parts[: i + 1])).is_symlink() for i in range(len(parts))) or not f.is_file():
            raise AdapterRefused(f"adapter {name}: {fname} listed in {MANIFEST} is missing or not a regular file")
        if not f.resolve().is_relative_to(root):
            raise AdapterRefused(f"adapter {name}: {fname} lies outside the adapter's directory")
        digest = _sha256(f)
        if digest != files[fname]:
            raise AdapterRefused(
                f"adapter {name}: {fname} has sha256 {digest[:12]}…, the manifest says {files[fname][:12]}…; "
                "the files changed after publishing (corrupt or tampered): republish the adapter"
            )
        total.update(f"{fname} {digest}\n".encode())
    # every file in the directory, subdirectories too (a DPO round's `ref/` adapter is copied with it)
    present = (p.relative_to(path).as_posix() for p in path.rglob("*") if not p.is_dir())
    extra = sorted(f for f in present if f != MANIFEST and f not in files)
    if extra:
        raise AdapterRefused(f"adapter {name}: files not in {MANIFEST}: {', '.join(extra[:5])}; remove them")
    sha = total.hexdigest()
    for what, want in (("manifest", doc.get("sha256")), ("event", expected)):
        if want is not None and want != sha:
            raise AdapterRefused(f"adapter {name}: files digest {sha[:12]}… is not the {what}'s {str(want)[:12]}…")
    return sha
