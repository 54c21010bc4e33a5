"""Every invalid option raises a typed error from the one family (no cluster)."""

from __future__ import annotations

from typing import Any

import pytest

from taskiq_redis_cluster import (
    ConfigurationError,
    InvalidOptionError,
    InvalidShardCountError,
    ListOptions,
    QueueSpec,
    StreamOptions,
)
from taskiq_redis_cluster._metrics import QueueStateReader
from taskiq_redis_cluster.testing import DevCluster


@pytest.mark.parametrize(
    ("build", "option"),
    [
        (lambda: StreamOptions(idle_timeout=0), "idle_timeout"),
        (lambda: StreamOptions(wait_replicas=-1), "wait_replicas"),
        (lambda: ListOptions(brpop_timeout=0), "brpop_timeout"),
        (lambda: StreamOptions(plan_poll_interval=-2), "plan_poll_interval"),
        (lambda: QueueSpec(name="q", shards=3, weights={"n1": 0}), "weights"),
        (lambda: QueueStateReader(None, timeout=0), "timeout"),  # type: ignore[arg-type]
        (lambda: DevCluster(masters=0, directory="/tmp/unused"), "masters/replicas"),
    ],
)
def test_invalid_option_is_typed_and_names_the_option(build: Any, option: str) -> None:
    with pytest.raises(InvalidOptionError) as caught:
        build()
    assert caught.value.option == option
    # One family: a ConfigurationError, and still the ValueError it used to be.
    assert isinstance(caught.value, ConfigurationError)
    assert isinstance(caught.value, ValueError)


def test_shard_count_out_of_range_is_its_own_error() -> None:
    with pytest.raises(InvalidShardCountError):
        StreamOptions(shards=0)


def test_client_keywords_the_options_model_are_not_passed_through_raw() -> None:
    # Passed as raw redis-py extras, socket_timeout would override the floor
    # the brokers put above their blocking reads, and a password would sit in
    # a repr; ConnectionOptions models all three.
    from taskiq_redis_cluster import ClusterStreamBroker

    broker = ClusterStreamBroker(
        "redis://127.0.0.1:7000", socket_timeout=3.0, socket_connect_timeout=1.5,
        password="s3cret", ssl_ca_certs="ca.pem",
    )
    connection = broker.options.connection
    assert (connection.socket_timeout, connection.socket_connect_timeout) == (3.0, 1.5)
    assert connection.password == "s3cret"
    assert dict(connection.extra) == {"ssl_ca_certs": "ca.pem"}
    assert "s3cret" not in repr(broker.options)


def test_dedup_ttl_is_a_broker_option() -> None:
    from taskiq_redis_cluster import ClusterStreamBroker

    assert ClusterStreamBroker("redis://127.0.0.1:7000", dedup_ttl=60).options.dedup_ttl == 60
    with pytest.raises(InvalidOptionError):
        StreamOptions(dedup_ttl=0)
