"""Wire contracts: one pydantic v2 model per topic, strict, versioned, size-bounded."""

from schemas.adapters import AdapterEvent
from schemas.base import DEFAULT_LIMITS, SCHEMA_VERSION, EventModel, Limits, new_event_id, parse_event, utcnow
from schemas.dead_letters import DeadLetter
from schemas.exceptions import EventValidationError
from schemas.feedback import FEEDBACK_KINDS, FeedbackEvent
from schemas.interactions import ChatMessage, InteractionEvent, prompt_text
from schemas.registry import EVENTS, export_json_schemas
from schemas.scores import ScoreEvent
from schemas.sessions import SessionEvent
from schemas.utilities import UtilityEvent

__all__ = [
    "DEFAULT_LIMITS",
    "EVENTS",
    "FEEDBACK_KINDS",
    "SCHEMA_VERSION",
    "AdapterEvent",
    "ChatMessage",
    "DeadLetter",
    "EventModel",
    "EventValidationError",
    "FeedbackEvent",
    "InteractionEvent",
    "Limits",
    "ScoreEvent",
    "SessionEvent",
    "UtilityEvent",
    "export_json_schemas",
    "new_event_id",
    "parse_event",
    "prompt_text",
    "utcnow",
]
