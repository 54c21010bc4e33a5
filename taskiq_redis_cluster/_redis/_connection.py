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
from urllib.parse import SplitResult, unquote, unquote_plus, urlsplit, urlunsplit

from redis.asyncio import RedisCluster
from redis.asyncio.retry import Retry
from redis.exceptions import AuthenticationError, RedisClusterException, RedisError, ResponseError

from .._errors import ConnectError, InvalidOptionError, InvalidURLError, NotAClusterError
from ._retry import RetryPolicy

logger = logging.getLogger(__name__)

_SCHEMES = ("redis", "rediss")


#: Query parameters whose value is a secret. redis-py passes every query
#: parameter it does not know to the connection as a string keyword, so
#: ``?password=`` and ``?ssl_password=`` (the TLS key's passphrase) are
#: credentials; any other name with one of these words is treated as one too,
#: because hiding a harmless value costs nothing and showing a secret does.
_SECRET_PARAM_WORDS = ("password", "passwd", "pwd", "secret", "token", "credential", "auth")

_REDACTED = "***"
_UNPARSEABLE = "<unparseable URL>"

#: redis-py client keywords this package sets itself, with the reason a
#: caller's value is refused rather than passed through (docs/brokers.md
#: lists them for users). A user's ``retry`` would make redis-py re-send a
#: write whose outcome is unknown, which the brokers' kick rule forbids
#: (see ``_retry``).
_OWNED_CLIENT_KEYWORDS: Mapping[str, str] = {
    "retry": "redis-py's retries are set from ConnectionOptions.retries (0 for brokers, so "
    "that a kick whose outcome is unknown is never re-sent); set retries instead",
    "retry_on_error": "which errors are retried is decided by the package (see "
    "docs/guarantees.md); a broker never lets redis-py re-send a kick",
    "cluster_error_retry_attempts": "deprecated by redis-py and replaced here by "
    "ConnectionOptions.retries",
    "decode_responses": "the clients must read bytes: stream entries, ids and stored records "
    "are decoded by the package, and decoded replies would dead-letter every message",
}


def _is_secret_param(name: str) -> bool:
    lowered = unquote_plus(name).lower()
    return any(word in lowered for word in _SECRET_PARAM_WORDS)


def redact_url(url: str) -> str:
    """Return ``url`` with every password replaced by ``***``.

    Covers each place redis-py reads a credential from: the userinfo
    (``user:pass@`` and ``:pass@``, percent-encoded or not), ``?password=``,
    ``?ssl_password=`` and any other query parameter whose name looks like a
    credential. A URL whose userinfo cannot be told apart from its host (an
    unencoded ``/``, ``?`` or ``#`` in the password, or a bad port) comes back
    as ``<unparseable URL>`` rather than half-redacted.

    The user name is kept because it helps to tell ACL users apart and is
    not a secret.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return _UNPARSEABLE
    # An "@" after the host means the userinfo held a character that ended
    # the authority early (e.g. "redis://:pa#ss@h:7000"): the password then
    # sits in the path, query or fragment where no rule below would find it.
    if "@" in parts.path + parts.query + parts.fragment:
        return _UNPARSEABLE
    netloc = parts.netloc
    if parts.password is not None:
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        netloc = f"{user}:{_REDACTED}@{host}"
        if port is not None:
            netloc += f":{port}"
    query = "&".join(
        f"{piece.split('=', 1)[0]}={_REDACTED}"
        if _is_secret_param(piece.split("=", 1)[0])
        else piece
        for piece in parts.query.split("&")
    )
    return urlunsplit(SplitResult(parts.scheme, netloc, parts.path, query, parts.fragment))


def url_secrets(url: str, *more: str | None) -> set[str]:
    """Every form a secret of ``url`` (and of ``more``) may take in a message.

    The raw and the percent-decoded password of the userinfo, the values of
    credential-like query parameters (raw and decoded), plus the extra
    secrets given (e.g. a password read from a file). redis-py decodes
    before it uses them, so an error text may hold either form.
    """
    found: set[str] = {m for m in more if m}
    try:
        parts = urlsplit(url)
    except ValueError:
        return found
    if parts.password:
        found |= {parts.password, unquote(parts.password)}
    for piece in parts.query.split("&"):
        name, sep, value = piece.partition("=")
        if sep and value and _is_secret_param(name):
            found |= {value, unquote_plus(value)}
    return {s for s in found if s}


def scrub(text: str, url: str, *more: str | None) -> str:
    """``text`` with ``url`` redacted and every secret of it replaced by ``***``."""
    if url:
        text = text.replace(url, redact_url(url))
    # Longest first, so that a secret containing another is replaced whole.
    for secret in sorted(url_secrets(url, *more), key=len, reverse=True):
        text = text.replace(secret, _REDACTED)
    return text


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
    :param password: the password, handed to redis-py as a keyword so that it
        never has to be part of a URL that might be logged or shown by
        ``ps``. A password in the URL takes precedence (redis-py's rule).
        Never shown by ``repr``.
    """

    max_connections: int = 64
    socket_timeout: float = 10.0
    socket_connect_timeout: float = 5.0
    retries: int = 3
    extra: Mapping[str, Any] = field(default_factory=dict)
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name, value in self.extra.items():
            reason = _OWNED_CLIENT_KEYWORDS.get(name)
            # decode_responses=False is what we set anyway.
            if reason is not None and not (name == "decode_responses" and not value):
                raise InvalidOptionError(option=name, reason=reason)
        if self.retries < 0:
            raise InvalidOptionError(option="retries", reason=f"must be >= 0, got {self.retries}")

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``RedisCluster.from_url``."""
        kwargs: dict[str, Any] = {
            "max_connections": self.max_connections,
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.socket_connect_timeout,
            # The asyncio Retry: redis-py >= 8.2 warns about (and converts)
            # the synchronous one. Its waits are the package's one backoff.
            "retry": Retry(RetryPolicy().backoff(), self.retries),
            "decode_responses": False,
        }
        if self.password is not None:
            kwargs["password"] = self.password
        kwargs.update(self.extra)
        return kwargs

    def __repr__(self) -> str:
        # Written by hand so that a secret passed through ``extra`` (say
        # ``ssl_password``) is masked too, not only ``password``.
        extra = {k: _REDACTED if _is_secret_param(k) else v for k, v in self.extra.items()}
        return (
            f"ConnectionOptions(max_connections={self.max_connections!r}, "
            f"socket_timeout={self.socket_timeout!r}, "
            f"socket_connect_timeout={self.socket_connect_timeout!r}, "
            f"retries={self.retries!r}, extra={extra!r}, "
            f"password={_REDACTED if self.password is not None else None!r})"
        )

    def secrets(self) -> tuple[str | None, ...]:
        """The secrets these options carry (to scrub them from messages)."""
        found: list[str | None] = [self.password]
        found += [v for k, v in self.extra.items() if _is_secret_param(k) and isinstance(v, str)]
        return tuple(found)


def validate_url(url: str) -> SplitResult:
    """Parse and check a cluster URL without connecting.

    :raises InvalidURLError: for a scheme other than ``redis``/``rediss``, a
        missing host, a database number other than 0, or a bad port.
    """
    safe = redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        # urllib's message quotes the bad part, which may be a piece of a
        # password whose special characters were not percent-encoded.
        raise InvalidURLError(
            url=safe,
            reason="it cannot be parsed (bad port, or a password with unencoded "
            "special characters: percent-encode them, or use a password file)",
        ) from None
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
    secrets = opts.secrets()
    try:
        client = RedisCluster.from_url(url, **opts.client_kwargs())
    except (RedisClusterException, ValueError) as exc:
        raise InvalidURLError(url=safe, reason=scrub(str(exc), url, *secrets)) from None
    try:
        await client.initialize()
    except RedisClusterException as exc:
        await _close_quietly(client)
        if "cluster mode is not enabled" in str(exc).lower():
            raise NotAClusterError(url=safe) from None
        raise ConnectError(url=safe, reason=scrub(str(exc), url, *secrets)) from None
    except ResponseError as exc:
        await _close_quietly(client)
        if "cluster support disabled" in str(exc).lower():
            raise NotAClusterError(url=safe) from None
        raise ConnectError(url=safe, reason=scrub(str(exc), url, *secrets)) from None
    except AuthenticationError as exc:
        await _close_quietly(client)
        reason = scrub(f"authentication failed: {exc}", url, *secrets)
        raise ConnectError(url=safe, reason=reason) from None
    except (RedisError, OSError) as exc:
        await _close_quietly(client)
        raise ConnectError(url=safe, reason=scrub(str(exc), url, *secrets)) from None
    logger.debug("Connected to Redis Cluster at %s", safe)
    return client


async def _close_quietly(client: RedisCluster) -> None:
    try:
        await client.aclose()
    except Exception:  # the client is being thrown away after a failure
        logger.debug("Ignoring error while closing a failed client", exc_info=True)
