"""The root of every error taoflow raises on purpose, and the errors of the tying-together layer."""


class TaoflowError(Exception):
    """Base of every error taoflow raises on purpose; the CLI prints these as one line."""


class ConfigError(TaoflowError):
    """A setting is missing or invalid; the message names the setting and how to fix it."""


class BrokerError(TaoflowError):
    """The embedded broker could not be started or did not answer."""


class SpoolError(TaoflowError):
    """The SDK's local spool could not be opened or written."""


class SpoolFullError(SpoolError):
    """The spool reached its size bound and the policy is `error`."""
