"""Task controls: the labels that change how a kick is queued, read once.

``delay``, ``dedup_key`` (with ``dedup_ttl``) and ``priority`` mean the
same for every broker that implements them, so their parsing, their limits
and the kick script's reply live here, one of each, for the stream and the
list broker. Values are checked before any I/O: a bad one raises
:class:`InvalidOptionError` and nothing is written.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from taskiq import BrokerMessage

from .._errors import InvalidOptionError
from .._keys import ShardKeys
from .._redis import AutoPipeline, LuaScript, Reply
from ._base import DEDUP_KEY_LABEL

logger = logging.getLogger(__name__)

#: Label: seconds (int, float or a numeric string) before the task may run.
DELAY_LABEL = "delay"
#: Label: an integer, higher runs sooner (taskiq's convention); see
#: ``StreamOptions.priority_lanes``.
PRIORITY_LABEL = "priority"
#: Label: seconds a ``dedup_key`` blocks other kicks with the same key.
DEDUP_TTL_LABEL = "dedup_ttl"
#: Longest accepted delay or dedup TTL (ten years), so a typo in the unit
#: is refused instead of parking a task forever.
_MAX_CONTROL_SECONDS = 10 * 365 * 86_400
_DUPLICATE = b"duplicate"
#: Label taskiq's retry middlewares put on the re-kick of a failed task.
_RETRIES_LABEL = "_retries"


@dataclass(frozen=True)
class TaskControls:
    """What a kick's labels ask for beyond a plain write (ms; key as text).

    ``retry``: the kick is a retry of a failed task (same task id), which
    a dedup key held by that task id must not block. ``lane``: the priority
    lane the ``priority`` label picks (0 without one).
    """

    delay_ms: int
    dedup_key: str | None
    dedup_ttl_ms: int
    retry: bool = False
    lane: int = 0


def _label_priority(value: Any) -> int:
    """A ``priority`` label as an int (an int, or a string of one).

    :raises InvalidOptionError: for anything else, and for a negative value.
    """
    priority: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        priority = value
    elif isinstance(value, str):
        try:
            priority = int(value.strip())
        except ValueError:
            priority = None
    elif isinstance(value, float) and value.is_integer():
        priority = int(value)
    if priority is None or priority < 0:
        raise InvalidOptionError(
            option=f"{PRIORITY_LABEL} label",
            reason=f"must be a non-negative integer (higher runs sooner), got {value!r}",
        )
    return priority


def _label_ms(label: str, value: Any, *, allow_zero: bool) -> int:
    """Seconds given in a label, as whole ms rounded up (never early).

    :raises InvalidOptionError: for anything but a finite, non-negative
        number of seconds (a bool, NaN, a word...), before any I/O.
    """
    seconds: float | None = None
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except ValueError:
            seconds = None
    if seconds is None or not math.isfinite(seconds):
        raise InvalidOptionError(
            option=f"{label} label", reason=f"must be a number of seconds, got {value!r}"
        )
    if seconds < 0 or (seconds == 0 and not allow_zero) or seconds > _MAX_CONTROL_SECONDS:
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidOptionError(
            option=f"{label} label",
            reason=f"must be {bound} and at most {_MAX_CONTROL_SECONDS} seconds, got {value!r}",
        )
    return math.ceil(seconds * 1000)


def read_controls(
    labels: Mapping[str, Any],
    *,
    dedup_ttl: float,
    lane_of: Callable[[int], int] | None = None,
) -> TaskControls | None:
    """The controls ``labels`` ask for; None for a plain write.

    ``dedup_ttl`` is the broker's default (seconds) for a ``dedup_key``
    without a ``dedup_ttl`` label. ``lane_of`` maps a ``priority`` to a
    lane; without it the label is not read at all (a broker without lanes
    ignores it, as before task controls existed).

    :raises InvalidOptionError: for a bad ``delay``, ``dedup_ttl`` or
        ``priority``.
    """
    delay = labels.get(DELAY_LABEL)
    dedup = labels.get(DEDUP_KEY_LABEL)
    priority = labels.get(PRIORITY_LABEL) if lane_of is not None else None
    delay_ms = 0 if delay is None else _label_ms(DELAY_LABEL, delay, allow_zero=True)
    lane = 0 if priority is None or lane_of is None else lane_of(_label_priority(priority))
    if dedup is None or dedup == "":
        return TaskControls(delay_ms, None, 0, lane=lane) if delay_ms or lane else None
    ttl = labels.get(DEDUP_TTL_LABEL)
    ttl_ms = _label_ms(DEDUP_TTL_LABEL, dedup_ttl if ttl is None else ttl, allow_zero=False)
    return TaskControls(delay_ms, str(dedup), ttl_ms, labels.get(_RETRIES_LABEL) is not None,
                        lane)


async def kick_controlled(
    pipeline: AutoPipeline,
    script: LuaScript,
    target: str,
    keys: ShardKeys,
    message: BrokerMessage,
    controls: TaskControls,
    *extra: Any,
) -> Reply:
    """Run a broker's controlled-kick script: one atomic step on the shard.

    ``target`` is where a due task goes (the shard's stream or lane, or its
    list); the script gets the shard's delayed set and, with a dedup key,
    its marker. The arguments both scripts share come first, then
    ``extra``. A duplicate is logged; the reply tells the caller the rest.

    :raises CommandFailure: as the auto-pipeline raises it.
    """
    script_keys = [target, keys.delayed]
    if controls.dedup_key is not None:
        script_keys.append(keys.dedup(controls.dedup_key))
    args = [message.message, controls.delay_ms, controls.dedup_ttl_ms, message.task_id,
            "1" if controls.retry else "0", *extra]
    reply = await script.submit(pipeline, script_keys, args)
    holder = duplicate_of(reply)
    if holder is not None:
        logger.debug("Task %s not queued: its dedup key %r is held by task %s",
                     message.task_id, controls.dedup_key, holder)
    return reply


def duplicate_of(reply: Reply) -> str | None:
    """The task id holding the dedup key when a kick script answered "duplicate"."""
    value = reply.value
    if isinstance(value, list) and value and value[0] == _DUPLICATE:
        holder = value[1]
        return holder.decode() if isinstance(holder, bytes) else str(holder)
    return None


__all__ = [
    "DEDUP_TTL_LABEL",
    "DELAY_LABEL",
    "PRIORITY_LABEL",
    "TaskControls",
    "duplicate_of",
    "kick_controlled",
    "read_controls",
]
