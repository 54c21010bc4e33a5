"""The one way this package runs Lua: :class:`LuaScript`, read from ``scripts/``.

Every script is a file ``taskiq_redis_cluster/_redis/scripts/<name>.lua``
shipped with the package; a line ``--!include <helper>`` in it is replaced
by ``scripts/include/<helper>.lua``. :func:`load_script` returns its runner; the file is
read (through ``importlib.resources``, so a wheel, a zip or an editable
install all work) once per process, at first use, never at import.

A call sends ``EVALSHA`` and, when the node answers ``NOSCRIPT`` (a node
that restarted, a replica just promoted, ``SCRIPT FLUSH``), ``EVAL`` with the
source, which also caches it there. Both go to the master of the keys'
slot, either through the cluster client's own routing or, when the runner is
given an :class:`~._autopipeline.AutoPipeline`, in that pipeline's next
batch to the node; MOVED and ASK are followed on both paths. The brokers'
per-shard scripts (kick controls, trims, promotions, lease renewals) take
the pipeline: redis-py's cluster path costs several times the script's own
time in the client, and a worker runs a few of them per shard every second.
All keys of one call must share one slot (one hash tag): that is
checked before any I/O and raises
:class:`~taskiq_redis_cluster._errors.CrossSlotError`, instead of a
``CROSSSLOT`` from the server or redis-py's untyped cluster error.

Callers that batch raw commands on one connection (the plan store's
``EVALSHA`` + ``WAIT`` + ``ROLE``) take :meth:`LuaScript.command` and resend
with :meth:`LuaScript.eval_command` when the reply is ``NOSCRIPT``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from collections.abc import Sequence
from importlib import resources
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import NoScriptError

from .._errors import CrossSlotError
from .._keys import slot_of
from ._autopipeline import AutoPipeline, CommandFailure, Reply, redis_value

logger = logging.getLogger(__name__)

#: Package (resource anchor) and folder of the ``.lua`` files.
_ANCHOR = __package__ or "taskiq_redis_cluster._redis"
_FOLDER = "scripts"
_INCLUDES = "include"
_INCLUDE = re.compile(r"^--!include (\w+)\n", re.MULTILINE)

Key = str | bytes
Arg = str | bytes | int | float


class LuaScript:
    """One Lua script of the package; call it to run it on the cluster.

    Instances come from :func:`load_script`. The source and its SHA1 are
    read on first use and then kept for the life of the process.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._source: str | None = None
        self._sha: str | None = None

    def __repr__(self) -> str:
        return f"LuaScript({self.name!r})"

    def _read(self) -> None:
        # Two coroutines racing here read the same file twice; harmless.
        folder = resources.files(_ANCHOR).joinpath(_FOLDER)
        source = folder.joinpath(f"{self.name}.lua").read_text(encoding="utf-8")
        # EVAL scripts cannot import each other, so helpers several scripts
        # need (exact stream-id comparison) live once in include/ and are
        # spliced in where a script says ``--!include <name>``.
        includes = folder.joinpath(_INCLUDES)
        source = _INCLUDE.sub(
            lambda m: includes.joinpath(f"{m.group(1)}.lua").read_text(encoding="utf-8"), source
        )
        self._sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
        self._source = source

    @property
    def source(self) -> str:
        """The script's text (read from its file on first access)."""
        if self._source is None:
            self._read()
        assert self._source is not None
        return self._source

    @property
    def sha(self) -> str:
        """SHA1 of the source, as ``EVALSHA`` and ``SCRIPT LOAD`` name it."""
        if self._sha is None:
            self._read()
        assert self._sha is not None
        return self._sha

    def slot(self, keys: Sequence[Key]) -> int | None:
        """The one slot of ``keys`` (None without keys).

        :raises CrossSlotError: if the keys span two slots.
        """
        slots = {slot_of(key) for key in keys}
        if len(slots) > 1:
            raise CrossSlotError(keys=tuple(_text(key) for key in keys))
        return slots.pop() if slots else None

    def command(self, keys: Sequence[Key] = (), args: Sequence[Arg] = ()) -> tuple[Any, ...]:
        """``("EVALSHA", sha, len(keys), *keys, *args)``, for a raw batch.

        :raises CrossSlotError: if the keys span two slots.
        """
        self.slot(keys)
        return ("EVALSHA", self.sha, len(keys), *keys, *args)

    def eval_command(
        self, keys: Sequence[Key] = (), args: Sequence[Arg] = ()
    ) -> tuple[Any, ...]:
        """``("EVAL", source, len(keys), *keys, *args)``: the NOSCRIPT fallback.

        :raises CrossSlotError: if the keys span two slots.
        """
        self.slot(keys)
        return ("EVAL", self.source, len(keys), *keys, *args)

    async def submit(
        self, pipeline: AutoPipeline, keys: Sequence[Key], args: Sequence[Arg] = ()
    ) -> Reply:
        """Run the script in ``pipeline``'s next batch to the keys' master.

        The outcome is classified as for any auto-pipelined command, so a
        kick script's failure says whether it may have run.

        :raises CommandFailure: as the auto-pipeline raises it.
        :raises CrossSlotError: if the keys span two slots (nothing is sent).
        :raises ValueError: if there is no key to route by (nothing is sent).
        """
        if not keys:
            raise ValueError(f"script {self.name} has no key to route a pipelined call by")
        key = _text(keys[0])
        try:
            return await pipeline.submit(key, *self.command(keys, args))
        except CommandFailure as failure:
            if not isinstance(failure.error, NoScriptError):
                raise
        # Nothing ran (a restarted or promoted master); EVAL also caches it.
        logger.debug("Script %s not cached on its node; sending it with EVAL", self.name)
        return await pipeline.submit(key, *self.eval_command(keys, args))

    async def __call__(
        self,
        client: Redis | RedisCluster | AutoPipeline,
        keys: Sequence[Key] = (),
        args: Sequence[Arg] = (),
    ) -> Any:
        """Run the script on the master of the keys' slot; return its raw reply.

        Redis errors (connection loss, the script's own errors) propagate
        unchanged, also from an auto-pipeline (never wrapped in
        :class:`CommandFailure`); retrying is the caller's choice (see
        ``RetryPolicy``).

        :raises CrossSlotError: if the keys span two slots (nothing is sent).
        """
        if isinstance(client, AutoPipeline):
            return await redis_value(self.submit(client, keys, args))
        command = self.command(keys, args)
        try:
            return await client.execute_command(*command)
        except NoScriptError:
            # Nothing ran. EVAL caches the script on that node for next time.
            logger.debug("Script %s not cached on its node; sending it with EVAL", self.name)
            return await client.execute_command(*self.eval_command(keys, args))


@functools.cache
def load_script(name: str) -> LuaScript:
    """The runner of ``scripts/<name>.lua`` (one object per name and process).

    Nothing is read here; the file is read when the script is first used.
    """
    return LuaScript(name)


def script_names() -> list[str]:
    """Names of every ``.lua`` file shipped in ``scripts/``, sorted."""
    folder = resources.files(_ANCHOR).joinpath(_FOLDER)
    return sorted(
        entry.name[: -len(".lua")] for entry in folder.iterdir() if entry.name.endswith(".lua")
    )


def _text(key: Key) -> str:
    return key.decode("utf-8", "replace") if isinstance(key, bytes) else key
