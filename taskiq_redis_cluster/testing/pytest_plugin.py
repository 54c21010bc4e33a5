"""pytest fixtures backed by a real local Redis Cluster.

Opt-in: a project loads it from its top-level ``conftest.py`` with
``pytest_plugins = ["taskiq_redis_cluster.testing.pytest_plugin"]``, or with
``-p taskiq_redis_cluster.testing.pytest_plugin``. It is not registered as a
``pytest11`` entry point, because installing a library must not put generic
fixture names (``redis_cluster``, ``unique_name``) into every pytest run. The
fixtures need ``pytest-asyncio``; without it the plugin only registers the
``cluster`` marker.

Fixtures:

``redis_cluster`` (session)
    A started :class:`~taskiq_redis_cluster.testing.DevCluster`: 3 masters,
    3 replicas, 1500 ms node timeout, nodes under a pytest tmp directory. The
    base port comes from ``TQRC_TEST_BASE_PORT`` or a random free range. The
    nodes are always stopped at the end of the session, also after failures
    or Ctrl-C; an ``atexit`` hook kills leftovers from the pid files.
``cluster_url`` (session)
    The cluster's URL.
``cluster_client`` (function)
    A client from :func:`~taskiq_redis_cluster.connect`, closed
    after the test.
``unique_name`` (function)
    A queue-safe name unique to the test (no braces, no whitespace).
``healthy_cluster`` (function)
    ``redis_cluster`` after :meth:`DevCluster.heal`; request it in tests that
    kill, pause or fail over nodes, or that need a fully healthy cluster.

If ``redis-server`` is missing the fixtures fail with
:class:`~taskiq_redis_cluster._errors.RedisServerMissingError` (they do not
skip).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import RedisCluster

from .._redis import connect
from ._cluster import DevCluster, throwaway_cluster

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the fixtures need pytest-asyncio
    pytest_asyncio = None  # type: ignore[assignment]

#: Environment variable that pins the session cluster's base port.
BASE_PORT_ENV = "TQRC_TEST_BASE_PORT"
_MASTERS = 3
_REPLICAS = 1
_NODE_TIMEOUT_MS = 1500
_START_ATTEMPTS = 3


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``cluster`` marker for projects using the plugin."""
    config.addinivalue_line(
        "markers", "cluster: needs the real local Redis Cluster started by the session fixture"
    )


def _short(text: str, limit: int = 24) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")
    return cleaned[:limit].rstrip("-") or "test"


if pytest_asyncio is not None:

    @pytest_asyncio.fixture(scope="session", loop_scope="session")
    async def redis_cluster(
        tmp_path_factory: pytest.TempPathFactory,
    ) -> AsyncIterator[DevCluster]:
        """A 3-master, 3-replica Redis Cluster for the whole session."""
        pinned = os.environ.get(BASE_PORT_ENV)
        async with throwaway_cluster(
            tmp_path_factory.mktemp("redis-cluster"),
            masters=_MASTERS,
            replicas=_REPLICAS,
            node_timeout_ms=_NODE_TIMEOUT_MS,
            base_port=int(pinned) if pinned else None,
            attempts=_START_ATTEMPTS,
        ) as cluster:
            yield cluster

    @pytest_asyncio.fixture(scope="session", loop_scope="session")
    async def cluster_url(redis_cluster: DevCluster) -> str:
        """URL of the session cluster."""
        return redis_cluster.url

    @pytest_asyncio.fixture(loop_scope="session")
    async def cluster_client(cluster_url: str) -> AsyncIterator[RedisCluster]:
        """An initialized cluster client, closed after the test."""
        client = await connect(cluster_url)
        try:
            yield client
        finally:
            await client.aclose()

    @pytest.fixture
    def unique_name(request: pytest.FixtureRequest) -> str:
        """``t-<test name>-<8 hex>``: unique, no braces, no whitespace."""
        return f"t-{_short(request.node.name)}-{uuid.uuid4().hex[:8]}"

    @pytest_asyncio.fixture(loop_scope="session")
    async def healthy_cluster(redis_cluster: DevCluster) -> DevCluster:
        """The session cluster, healed (dead nodes restarted) and healthy."""
        await redis_cluster.heal()
        return redis_cluster
