"""Talking to Redis: client construction, auto-pipelining, Lua scripts, retries."""

from __future__ import annotations

from ._autopipeline import (
    AutoPipeline,
    CommandFailure,
    Reply,
    Unroutable,
    redis_value,
    send_batch,
)
from ._connection import (
    ConnectionOptions,
    connect,
    redact_url,
    validate_url,
)
from ._internals import reinitialize_nodes
from ._lua import LuaScript, load_script
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
    "LuaScript",
    "Outcome",
    "Reply",
    "RetryPolicy",
    "Unroutable",
    "connect",
    "error_kind",
    "is_transient",
    "load_script",
    "redact_url",
    "redis_value",
    "reinitialize_nodes",
    "send_batch",
    "validate_url",
    "write_outcome",
]
