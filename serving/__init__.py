"""Serving tier: OpenAI-compatible gateway, model backends, adapter hot-swap."""
