"""The one place that builds ``redis.asyncio.RedisCluster`` clients.

Every broker, backend, schedule source, the rebalancer and the exporter get
their client from :func:`connect`, which

* validates the URL (``redis://`` or ``rediss://``, ACL user and password),
* calls ``initialize()`` before the client is handed out, because a fresh
  redis-py client fails with ``'NoneType' object has no attribute
  'writelines'`` when 16 or more commands race on it,
* turns "cluster mode is disabled" into :class:`NotAClusterError`,
* never lets a password reach a log line, an exception or a ``repr``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, urlsplit, urlunsplit

from redis.asyncio import RedisCluster
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import AuthenticationError, RedisClusterException, RedisError, ResponseError
from redis.retry import Retry

from .._errors import ConfigurationError, ConnectError, InvalidURLError, NotAClusterError

logger = logging.getLogger(__name__)

_SCHEMES = ("redis", "rediss")


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``.

    The user name is kept because it helps to tell ACL users apart and is
    not a secret.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"{user}:***@{host}"
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is not None:
        netloc += f":{port}"
    return urlunsplit(SplitResult(parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass(frozen=True)
class ConnectionOptions:
    """How clients talk to the cluster; shared by every component.

    :param max_connections: connection pool size per cluster node.
    :param socket_timeout: seconds to wait for a reply. Blocking reads add
        their block time on top of this, so it only bounds a dead server.
    :param socket_connect_timeout: seconds to wait for a TCP/TLS connect.
    :param retries: redis-py's own retries (connection errors, cluster down).
    :param extra: further keyword arguments for ``RedisCluster``, e.g.
        ``ssl_ca_certs`` or ``ssl_cert_reqs`` for TLS.
    """

    max_connections: int = 64
    socket_timeout: float = 10.0
    socket_connect_timeout: float = 5.0
    retries: int = 3
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.extra.get("decode_responses"):
            # Stream entries, ids and stored records are read as bytes
            # everywhere; decoded replies would dead-letter every message.
            raise ConfigurationError(
                message="decode_responses=True is not supported: the clients must read bytes"
            )

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``RedisCluster.from_url``."""
        kwargs: dict[str, Any] = {
            "max_connections": self.max_connections,
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.socket_connect_timeout,
            "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), self.retries),
            "decode_responses": False,
        }
        kwargs.update(self.extra)
        return kwargs


def validate_url(url: str) -> SplitResult:
    """Parse and check a cluster URL without connecting.

    :raises InvalidURLError: for a scheme other than ``redis``/``rediss``, a
        missing host, a database number other than 0, or a bad port.
    """
    safe = redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidURLError(url=safe, reason=str(exc)) from None
    if parts.scheme not in _SCHEMES:
        raise InvalidURLError(url=safe, reason="the scheme must be redis:// or rediss://")
    if not parts.hostname:
        raise InvalidURLError(url=safe, reason="no host given")
    if port is None:
        raise InvalidURLError(url=safe, reason="no port given")
    path = parts.path.strip("/")
    if path not in ("", "0"):
        raise InvalidURLError(url=safe, reason="Redis Cluster has only database 0")
    return parts


async def connect(url: str, options: ConnectionOptions | None = None) -> RedisCluster:
    """Build, initialize and return a ready cluster client.

    The caller owns the client and must ``await client.aclose()`` once.

    :raises InvalidURLError: if the URL cannot be used.
    :raises NotAClusterError: if the server is not in cluster mode.
    :raises ConnectError: if no node can be reached or authentication fails.
    """
    validate_url(url)
    opts = options or ConnectionOptions()
    safe = redact_url(url)
    try:
        client = RedisCluster.from_url(url, **opts.client_kwargs())
    except (RedisClusterException, ValueError) as exc:
        raise InvalidURLError(url=safe, reason=_scrub(str(exc), url)) from None
    try:
        await client.initialize()
    except RedisClusterException as exc:
        await _close_quietly(client)
        if "cluster mode is not enabled" in str(exc).lower():
            raise NotAClusterError(url=safe) from None
        raise ConnectError(url=safe, reason=_scrub(str(exc), url)) from None
    except ResponseError as exc:
        await _close_quietly(client)
        if "cluster support disabled" in str(exc).lower():
            raise NotAClusterError(url=safe) from None
        raise ConnectError(url=safe, reason=_scrub(str(exc), url)) from None
    except AuthenticationError as exc:
        await _close_quietly(client)
        raise ConnectError(url=safe, reason=f"authentication failed: {exc}") from None
    except (RedisError, OSError) as exc:
        await _close_quietly(client)
        raise ConnectError(url=safe, reason=_scrub(str(exc), url)) from None
    logger.debug("Connected to Redis Cluster at %s", safe)
    return client


async def _close_quietly(client: RedisCluster) -> None:
    try:
        await client.aclose()
    except Exception:  # the client is being thrown away after a failure
        logger.debug("Ignoring error while closing a failed client", exc_info=True)


def _scrub(text: str, url: str) -> str:
    """Remove the password of ``url`` from ``text`` (redis-py may echo it)."""
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        text = text.replace(password, "***")
    return text
