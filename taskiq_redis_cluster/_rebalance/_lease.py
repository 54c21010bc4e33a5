"""The lease that lets one rebalancer run at a time.

``SET NX PX`` at ``_keys.rebalance_lease_key``, renewed in the background
and released with compare-and-delete; a second rebalancer gets
:class:`~taskiq_redis_cluster._errors.RebalanceLockedError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from types import TracebackType
from typing import Any

from redis.asyncio import RedisCluster
from redis.exceptions import RedisError

from .._errors import RebalanceError, RebalanceLockedError
from .._keys import DEFAULT_PREFIX, rebalance_lease_key
from .._redis import load_script

logger = logging.getLogger(__name__)

# Compare-and-extend and compare-and-delete (see the files in _redis/scripts/).
_RENEW = load_script("rebalance_lease_renew")
_RELEASE = load_script("rebalance_lease_release")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _holder_token() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class RebalanceLease:
    """The lease that lets one rebalancer run at a time.

    ``SET key token NX PX ttl``; a background task extends it every third
    of ``ttl`` (only while the key still holds our token) and the lease is
    released with a compare-and-delete script, so a rebalancer never deletes
    a lease another one took after ours expired. If the lease cannot be
    renewed for a whole ``ttl``, or someone else holds it, :meth:`check`
    raises and the rebalancer stops before its next plan change.

    Use as ``async with RebalanceLease(client, prefix=...)``.
    """

    def __init__(
        self,
        client: RedisCluster,
        *,
        prefix: str = DEFAULT_PREFIX,
        ttl: float = 30.0,
        wait: float = 0.0,
    ) -> None:
        self._client = client
        self.key = rebalance_lease_key(prefix)
        self.token = _holder_token()
        self._ttl_ms = max(1000, int(ttl * 1000))
        self._wait = wait
        self._renewer: asyncio.Task[None] | None = None
        self._lost: str | None = None
        self._renewed_at = 0.0

    async def acquire(self) -> None:
        """Take the lease, waiting up to ``wait`` seconds for a holder to leave.

        :raises RebalanceLockedError: if another rebalancer holds it.
        """
        deadline = time.monotonic() + self._wait
        # Bounded: one pass per 0.05..0.5 s of waiting, plus a few quick
        # retries when the lease expires between our SET and GET.
        for _ in range(int(self._wait / 0.05) + 10):
            ok = await self._client.set(self.key, self.token, nx=True, px=self._ttl_ms)
            if ok:
                break
            holder = await self._client.get(self.key)
            ttl = await self._client.pttl(self.key)
            if holder is None:
                continue  # expired between SET and GET: try again at once
            if time.monotonic() >= deadline:
                raise RebalanceLockedError(key=self.key, holder=_text(holder), ttl_ms=int(ttl))
            await asyncio.sleep(min(0.5, max(0.05, deadline - time.monotonic())))
        else:
            raise RebalanceLockedError(key=self.key, holder="unknown", ttl_ms=-1)
        self._renewed_at = time.monotonic()
        self._lost = None
        self._renewer = asyncio.create_task(self._renew_loop(), name="tqrc-rebalance-lease")
        logger.info("Acquired the rebalance lease %s as %s", self.key, self.token)

    async def _renew_loop(self) -> None:
        interval = self._ttl_ms / 3000
        while True:
            await asyncio.sleep(interval)
            try:
                extended = await _RENEW(
                    self._client, keys=[self.key], args=[self.token, self._ttl_ms]
                )
            except (RedisError, OSError) as exc:
                if time.monotonic() - self._renewed_at > self._ttl_ms / 1000:
                    self._lost = f"could not renew it for {self._ttl_ms} ms ({exc})"
                    logger.error("Rebalance lease lost: %s", self._lost)
                    return
                logger.warning("Renewing the rebalance lease failed (%s); retrying", exc)
                continue
            if int(extended) != 1:
                self._lost = "it expired and was taken or removed by someone else"
                logger.error("Rebalance lease lost: %s", self._lost)
                return
            self._renewed_at = time.monotonic()

    def check(self) -> None:
        """Raise if the lease is no longer ours (called before every plan change).

        :raises RebalanceError: when the lease was lost.
        """
        if self._renewer is None:
            raise RebalanceError(message="the rebalance lease is not held")
        if self._lost is not None:
            raise RebalanceError(message=f"the rebalance lease was lost: {self._lost}")
        if time.monotonic() - self._renewed_at > self._ttl_ms / 1000:
            raise RebalanceError(message="the rebalance lease was not renewed in time")

    async def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (idempotent)."""
        renewer, self._renewer = self._renewer, None
        if renewer is None:
            return
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewer
        try:
            await _RELEASE(self._client, keys=[self.key], args=[self.token])
        except (RedisError, OSError) as exc:  # it expires on its own
            logger.warning("Could not release the rebalance lease (%s); it expires", exc)
        else:
            logger.info("Released the rebalance lease %s", self.key)

    async def __aenter__(self) -> RebalanceLease:
        await self.acquire()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.release()


__all__ = ["RebalanceLease"]
