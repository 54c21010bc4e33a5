"""What a kick puts on the wire: task ids and message encoding (pure, no Redis)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from taskiq import InMemoryBroker, TaskiqMessage
from taskiq.serializers import JSONSerializer

from taskiq_redis_cluster import ClusterStreamBroker
from taskiq_redis_cluster._brokers._base import random_task_id
from taskiq_redis_cluster._serialization import MessageFormatter

_URL = "redis://127.0.0.1:1"  # never connected: no I/O before startup()


def test_task_ids_are_random_uuid4_hex() -> None:
    ids = {random_task_id() for _ in range(2000)}
    assert len(ids) == 2000
    for task_id in list(ids)[:200]:
        assert len(task_id) == 32
        parsed = uuid.UUID(hex=task_id)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert parsed.hex == task_id


def test_brokers_use_them_and_users_can_replace_them() -> None:
    broker = ClusterStreamBroker(_URL)
    assert broker.id_generator is random_task_id
    assert isinstance(broker.formatter, MessageFormatter)
    broker.with_id_generator(lambda: "fixed")
    assert broker.id_generator() == "fixed"


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)
    | st.floats(allow_nan=True, allow_infinity=True),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(args=st.lists(_json_values, max_size=4),
       kwargs=st.dictionaries(st.text(max_size=8), _json_values, max_size=4),
       labels=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
def test_default_json_encoding_is_the_same_value_as_taskiqs(
    args: list[Any], kwargs: dict[str, Any], labels: dict[str, Any]
) -> None:
    stock = InMemoryBroker()
    ours = MessageFormatter(stock)
    message = TaskiqMessage(task_id=random_task_id(), task_name="m:t", labels=labels,
                            args=args, kwargs=kwargs)
    fast, reference = ours.dumps(message), stock.formatter.dumps(message)
    assert json.loads(fast.message) == json.loads(reference.message)
    assert (fast.task_id, fast.task_name, fast.labels) == (
        reference.task_id, reference.task_name, reference.labels,
    )
    # taskiq's own decoder reads it back to the same message.
    assert stock.formatter.loads(fast.message) == stock.formatter.loads(reference.message)


@pytest.mark.parametrize(
    "serializer", [JSONSerializer(default=str), JSONSerializer(ensure_ascii=False)]
)
def test_other_serializers_are_used_exactly_as_taskiq_would(serializer: JSONSerializer) -> None:
    broker = ClusterStreamBroker(_URL).with_serializer(serializer)
    stock = InMemoryBroker().with_serializer(serializer)
    message = TaskiqMessage(task_id="t", task_name="m:t", labels={}, args=["\u00e9", 1],
                            kwargs={})
    if serializer.default is not None:
        assert broker.formatter.dumps(message) == stock.formatter.dumps(message)
    else:  # ensure_ascii=False only changes the spelling, which pydantic shares
        assert json.loads(broker.formatter.dumps(message).message) == json.loads(
            stock.formatter.dumps(message).message
        )


def test_a_custom_serializer_subclass_is_not_bypassed() -> None:
    class Tagged(JSONSerializer):
        def dumpb(self, value: Any) -> bytes:
            return b"tagged:" + super().dumpb(value)

    broker = ClusterStreamBroker(_URL).with_serializer(Tagged())
    message = TaskiqMessage(task_id="t", task_name="m:t", labels={}, args=[], kwargs={})
    assert broker.formatter.dumps(message).message.startswith(b"tagged:")


def test_a_remembered_parse_is_returned_once_for_the_same_bytes_object() -> None:
    # The stream broker parses a message to validate it; taskiq's receiver
    # then parses the same bytes object, and gets that parse instead.
    formatter = MessageFormatter(InMemoryBroker())
    message = TaskiqMessage(task_id="t", task_name="m:t", labels={}, args=[1], kwargs={})
    data = formatter.dumps(message).message
    parsed = formatter.loads(data)
    formatter.remember(data, parsed)
    equal_copy = bytes(bytearray(data))
    assert formatter.loads(equal_copy) is not parsed  # only the very same object
    assert formatter.loads(data) is parsed
    again = formatter.loads(data)  # once: the receiver changes what it runs
    assert again is not parsed
    assert again == parsed
    formatter.remember(data, parsed)
    formatter.forget(data)
    assert formatter.loads(data) is not parsed


def test_remembered_parses_are_bounded() -> None:
    formatter = MessageFormatter(InMemoryBroker())
    message = TaskiqMessage(task_id="t", task_name="m:t", labels={}, args=[], kwargs={})
    kept = []
    for i in range(600):
        data = formatter.dumps(message).message + b" " * (i % 3)
        kept.append(data)
        formatter.remember(data, message)
    assert len(formatter._remembered) == 512
    assert formatter.loads(kept[0]) is not message  # pushed out: parsed anew
    assert formatter.loads(kept[-1]) is message
    big = formatter.dumps(
        TaskiqMessage(task_id="t", task_name="m:t", labels={}, args=["x" * 20_000], kwargs={})
    ).message
    formatter.remember(big, message)
    assert formatter.loads(big) is not message  # too large to keep


@settings(max_examples=200, deadline=None)
@given(args=st.lists(_json_values, max_size=4),
       kwargs=st.dictionaries(st.text(max_size=8), _json_values, max_size=4),
       labels=st.dictionaries(st.text(max_size=8), _json_values, max_size=3),
       ascii_only=st.booleans())
def test_decoding_gives_what_taskiq_gives(
    args: list[Any], kwargs: dict[str, Any], labels: dict[str, Any], ascii_only: bool
) -> None:
    # Bytes as taskiq's own serializer writes them (with or without \\u
    # escapes, NaN, big and small numbers), decoded by pydantic's one-call
    # path: the same message as taskiq's json.loads-then-validate path.
    stock = InMemoryBroker()
    stock.serializer = JSONSerializer(ensure_ascii=ascii_only)
    message = TaskiqMessage(task_id=random_task_id(), task_name="m:t", labels=labels,
                            args=args, kwargs=kwargs)
    data = stock.formatter.dumps(message).message
    assert repr(MessageFormatter(stock).loads(data)) == repr(stock.formatter.loads(data))


@pytest.mark.parametrize(
    "data",
    [
        # A lone surrogate escape: json.loads takes it, pydantic's parser
        # does not; taskiq's path decides.
        b'{"task_id":"a","task_name":"t","labels":{},"args":["\\ud800"],"kwargs":{}}',
        b'{"task_id":"a","task_name":"t","labels":{},"args":[NaN, 1e999],"kwargs":{}}',
    ],
)
def test_json_pydantic_refuses_goes_through_taskiqs_path(data: bytes) -> None:
    stock = InMemoryBroker()
    assert repr(MessageFormatter(stock).loads(data)) == repr(stock.formatter.loads(data))


@pytest.mark.parametrize(
    "data", [b"\xff", b"not json", b'{"task_id": 1}', b'{"task_id":"a","task_name":"t"} x']
)
def test_bad_messages_fail_as_taskiqs_path_fails(data: bytes) -> None:
    stock = InMemoryBroker()
    errors = []
    for formatter in (stock.formatter, MessageFormatter(stock)):
        try:
            formatter.loads(data)
        except Exception as exc:  # whatever taskiq's path raises, ours raises too
            errors.append(type(exc))
    assert len(errors) == 2
    assert errors[0] is errors[1]
