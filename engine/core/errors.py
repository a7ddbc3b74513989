"""The runtime's errors, one module so every layer can raise them without importing another's code.

Each message is one line naming the culprit (a config key, a bundle file, a request field);
the service maps them to gRPC status codes (engine/app/service.py).
"""
from __future__ import annotations


class ConfigError(ValueError):
    """One line: `<file>: <dotted.key>: <what is wrong>`. The server refuses to start."""


class BundleError(RuntimeError):
    """A bundle that must not be served; the message names the file and the fault."""


class InvalidRequest(ValueError):
    """A request field is wrong; the message names the field. Maps to INVALID_ARGUMENT."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class Overloaded(RuntimeError):
    """The in-flight limit or an event buffer is full. Maps to RESOURCE_EXHAUSTED."""


class DeadlineExceeded(RuntimeError):
    """The deadline cannot be met and the config says to fail rather than degrade."""
