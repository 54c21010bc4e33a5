"""Talking to Redis: client construction, auto-pipelining, retries."""

from __future__ import annotations

from ._autopipeline import (
    AutoPipeline,
    CommandFailure,
    Reply,
    Unroutable,
)
from ._connection import (
    ConnectionOptions,
    connect,
    redact_url,
    validate_url,
)
from ._retry import (
    Outcome,
    RetryPolicy,
    error_kind,
    is_transient,
    write_outcome,
)

__all__ = [
    "AutoPipeline",
    "CommandFailure",
    "ConnectionOptions",
    "Outcome",
    "Reply",
    "RetryPolicy",
    "Unroutable",
    "connect",
    "error_kind",
    "is_transient",
    "redact_url",
    "validate_url",
    "write_outcome",
]
