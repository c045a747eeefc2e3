"""taoflow: continuous learning for deployed LLM agents. The SDK entry point is `Emitter`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Emitter", "EmitterStats", "Settings", "__version__"]

if TYPE_CHECKING:
    from taoflow.emitter import Emitter, EmitterStats
    from taoflow.settings import Settings


def __getattr__(name: str) -> Any:
    # lazy, so `import schemas` (which needs taoflow.exceptions) does not pull in the SDK and Kafka client
    if name in ("Emitter", "EmitterStats"):
        from taoflow import emitter

        return getattr(emitter, name)
    if name == "Settings":
        from taoflow.settings import Settings

        return Settings
    raise AttributeError(f"module 'taoflow' has no attribute {name!r}")
