"""Every event model by name, the documents taoflow writes, and JSON Schema export (`taoflow schemas export DIR`)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from schemas.adapters import AdapterEvent
from schemas.base import EventModel
from schemas.dead_letters import DeadLetter
from schemas.feedback import FeedbackEvent
from schemas.interactions import InteractionEvent
from schemas.knowledge import KnowledgeFile
from schemas.scores import ScoreEvent
from schemas.sessions import SessionEvent
from schemas.utilities import UtilityEvent

EVENTS: dict[str, type[EventModel]] = {
    m.__name__: m
    for m in (InteractionEvent, FeedbackEvent, ScoreEvent, UtilityEvent, AdapterEvent, DeadLetter, SessionEvent)
}
# files, not events: no topic (`taoflow knowledge export` writes a KnowledgeFile)
DOCUMENTS: dict[str, type[BaseModel]] = {"KnowledgeFile": KnowledgeFile}


def json_schema(name: str) -> dict[str, object]:
    """The JSON Schema (2020-12, serialization form) of an event or document, by name."""
    model = EVENTS.get(name) or DOCUMENTS[name]
    schema = model.model_json_schema(mode="serialization")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://taoflow.dev/schemas/v1/{name}.schema.json"
    if name in EVENTS:
        schema["x-topic"] = EVENTS[name].topic
    return schema


def export_json_schemas(directory: str | Path) -> list[Path]:
    """Write `<Name>.schema.json` (JSON Schema 2020-12, serialization form) for every event and document."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in (*EVENTS, *DOCUMENTS):
        path = out / f"{name}.schema.json"
        path.write_text(json.dumps(json_schema(name), indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
