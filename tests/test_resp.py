"""The fast path's RESP encoder and incremental reply reader (pure, no Redis)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio.connection import Connection

from taskiq_redis_cluster._resp import ErrorReply, ProtocolError, ReplyReader, pack_commands


def _redis_py_pack(*args: Any) -> bytes:
    return b"".join(Connection().pack_command(*args))


@pytest.mark.parametrize(
    "args",
    [
        ("XADD", "tqrc:{q/0~1}:stream", "*", b"data", b'{"task_id": "x"}'),
        ("XACK", "s", "g", b"1-0", b"2-0"),
        ("WAIT", 1, 1000),
        ("SET", "k\u00e9y", "v\u00e4lue", "PX", 1500),
        ("LPUSH", "l", b"", b"\r\n\x00binary"),
        ("INCRBYFLOAT", "f", 2.5),
    ],
)
def test_packing_matches_redis_py(args: tuple[Any, ...]) -> None:
    assert pack_commands([args]) == _redis_py_pack(*args)


def test_packing_a_batch_is_the_concatenation() -> None:
    batch = [("SET", "a", 1), ("GET", "a"), ("XACK", "s", "g", b"1-1")]
    assert pack_commands(batch) == b"".join(_redis_py_pack(*c) for c in batch)


@pytest.mark.parametrize("bad", [True, None, object(), [1, 2]])
def test_bad_arguments_raise_type_error(bad: Any) -> None:
    with pytest.raises(TypeError):
        pack_commands([("SET", "k", bad)])


def _read_all(data: bytes, count: int) -> list[Any]:
    reader = ReplyReader()
    reader.feed(data)
    return reader.replies(count)


def test_every_resp2_and_resp3_type() -> None:
    data = (
        b"+OK\r\n"
        b":-42\r\n"
        b"$5\r\nhello\r\n"
        b"$0\r\n\r\n"
        b"$-1\r\n"
        b"*-1\r\n"
        b"*2\r\n$2\r\nid\r\n*2\r\n$4\r\ndata\r\n$1\r\nx\r\n"
        b"-MOVED 3999 127.0.0.1:7001\r\n"
        b"_\r\n"
        b"#t\r\n"
        b"#f\r\n"
        b",1.5\r\n"
        b"(12345678901234567890\r\n"
        b"%1\r\n$1\r\nk\r\n:1\r\n"
        b"~2\r\n:1\r\n:2\r\n"
        b"!9\r\nERR boom!\r\n"
        b"=8\r\ntxt:abcd\r\n"
        b"|1\r\n+ttl\r\n:3\r\n:7\r\n"
    )
    got = _read_all(data, 100)
    assert got[:7] == [b"OK", -42, b"hello", b"", None, None, [b"id", [b"data", b"x"]]]
    assert isinstance(got[7], ErrorReply)
    assert got[7].message == "MOVED 3999 127.0.0.1:7001"
    assert got[8:15] == [None, True, False, 1.5, 12345678901234567890, {b"k": 1}, [1, 2]]
    assert isinstance(got[15], ErrorReply)
    assert got[15].message == "ERR boom!"
    assert got[16:] == [b"abcd", 7]  # the attribute annotates the next reply


def test_push_frames_are_skipped() -> None:
    data = b">2\r\n$10\r\ninvalidate\r\n*0\r\n:1\r\n"
    assert _read_all(data, 5) == [1]


def test_limit_leaves_the_rest_buffered() -> None:
    reader = ReplyReader()
    reader.feed(b":1\r\n:2\r\n:3\r\n")
    assert reader.replies(2) == [1, 2]
    assert reader.buffered == 4
    assert reader.replies(5) == [3]
    assert reader.buffered == 0


@pytest.mark.parametrize("garbage", [b"?what\r\n", b"$abc\r\nxyz\r\n", b"*x\r\n"])
def test_non_resp_bytes_raise_protocol_error(garbage: bytes) -> None:
    reader = ReplyReader()
    reader.feed(garbage)
    with pytest.raises(ProtocolError):
        reader.replies(1)


# A RESP2 value and its encoding, built together.
_leaf = st.one_of(
    st.binary(max_size=40).map(lambda b: (b, b"$%d\r\n%s\r\n" % (len(b), b))),
    st.integers(-(2**63), 2**63 - 1).map(lambda i: (i, b":%d\r\n" % i)),
    st.just((None, b"$-1\r\n")),
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ ", min_size=1, max_size=20).map(
        lambda t: (t.encode(), b"+" + t.encode() + b"\r\n")
    ),
)


def _array(children: list[tuple[Any, bytes]]) -> tuple[Any, bytes]:
    return [c[0] for c in children], b"*%d\r\n" % len(children) + b"".join(c[1] for c in children)


_value = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=5).map(_array), max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(values=st.lists(_value, min_size=1, max_size=8), cuts=st.lists(st.integers(0, 400)))
def test_any_split_of_the_byte_stream_gives_the_same_replies(
    values: list[tuple[Any, bytes]], cuts: list[int]
) -> None:
    data = b"".join(v[1] for v in values)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    reader = ReplyReader()
    got: list[Any] = []
    for start, stop in itertools.pairwise(points):
        reader.feed(data[start:stop])
        got += reader.replies(len(values) - len(got))
    assert got == [v[0] for v in values]
    assert reader.buffered == 0
