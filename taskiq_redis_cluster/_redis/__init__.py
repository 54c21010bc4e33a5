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
    scrub,
    url_secrets,
    validate_url,
)
from ._internals import reinitialize_nodes
from ._lua import LuaScript, load_script
from ._pinned import Target, on_slot_master
from ._retry import (
    Outcome,
    Recovery,
    RetryPolicy,
    error_kind,
    is_transient,
    master_trouble,
    recovery,
    retry_policy,
    write_outcome,
)

__all__ = [
    "AutoPipeline",
    "CommandFailure",
    "ConnectionOptions",
    "LuaScript",
    "Outcome",
    "Recovery",
    "Reply",
    "RetryPolicy",
    "Target",
    "Unroutable",
    "connect",
    "error_kind",
    "is_transient",
    "load_script",
    "master_trouble",
    "on_slot_master",
    "recovery",
    "redact_url",
    "redis_value",
    "reinitialize_nodes",
    "retry_policy",
    "scrub",
    "send_batch",
    "url_secrets",
    "validate_url",
    "write_outcome",
]
