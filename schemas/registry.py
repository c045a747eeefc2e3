"""Every event model by name, and JSON Schema export (`taoflow schemas export DIR`)."""

from __future__ import annotations

import json
from pathlib import Path

from schemas.adapters import AdapterEvent
from schemas.base import EventModel
from schemas.dead_letters import DeadLetter
from schemas.feedback import FeedbackEvent
from schemas.interactions import InteractionEvent
from schemas.scores import ScoreEvent
from schemas.utilities import UtilityEvent

EVENTS: dict[str, type[EventModel]] = {
    m.__name__: m for m in (InteractionEvent, FeedbackEvent, ScoreEvent, UtilityEvent, AdapterEvent, DeadLetter)
}


def export_json_schemas(directory: str | Path) -> list[Path]:
    """Write `<EventName>.schema.json` (JSON Schema 2020-12, serialization form) for every event."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in EVENTS.items():
        schema = model.model_json_schema(mode="serialization")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://taoflow.dev/schemas/v1/{name}.schema.json"
        schema["x-topic"] = model.topic
        path = out / f"{name}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
