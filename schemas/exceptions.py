"""Errors raised by the event contracts."""

from taoflow.exceptions import TaoflowError


class EventValidationError(TaoflowError, ValueError):
    """An event does not match its schema; the message names each bad field and the problem."""
