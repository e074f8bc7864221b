"""Typed errors raised at the runtime's boundaries.

Firmware embeds the runtime, so every failure a caller can cause (a bad config, a missing data
set, a corrupt state file, a malformed frame) surfaces as one of these, with a message that names
the offending key, path or tensor, never as an exception from deep inside torch.
"""


class EdgeRuntimeError(Exception):
    """Base class of every error the runtime raises on purpose."""


class ConfigError(EdgeRuntimeError):
    """A YAML config is unreadable, has an unknown key, a wrong type or an impossible value."""


class DataError(EdgeRuntimeError):
    """A data set is missing, unreadable or does not match what the config asks for."""


class InputError(EdgeRuntimeError):
    """A batch handed to the runtime has the wrong shape, dtype, size or non-finite values."""


class StateError(EdgeRuntimeError):
    """A saved state or checkpoint is missing, truncated, corrupt, foreign or of another version."""
