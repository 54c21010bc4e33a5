"""The fast path's packing and reply parsing (hiredis), as pure functions: no Redis.

The auto-pipeline packs with ``hiredis.pack_command`` and parses with the
reader and helpers of ``_redis._hiredis``; these tests pin what the rest of the
code relies on: the bytes sent equal redis-py's, every reply type comes out
as the raw value the brokers read, error replies become redis-py's exception
classes, push frames are never counted as replies, and any split of the byte
stream gives the same replies.
"""

from __future__ import annotations

import itertools
from typing import Any

import hiredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio.connection import Connection
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    ResponseError,
    TryAgainError,
)

from taskiq_redis_cluster._redis._hiredis import (
    Replies,
    only_pushes_left,
    reply_reader,
    take_replies,
)


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
        ("INCRBYFLOAT", "f", 0.1),
        ("X", 1 / 3, 1e300, -0.0, 2**70, -5, memoryview(b"mv")),
    ],
)
def test_packing_matches_redis_py(args: tuple[Any, ...]) -> None:
    assert hiredis.pack_command(args) == _redis_py_pack(*args)


@pytest.mark.parametrize("bad", [True, False, None, object(), [1, 2], bytearray(b"ab")])
def test_bad_arguments_are_refused(bad: Any) -> None:
    # The auto-pipeline turns this into a DataError for that command only.
    with pytest.raises(TypeError):
        hiredis.pack_command(("SET", "k", bad))


def test_a_str_that_is_not_utf8_is_refused() -> None:
    with pytest.raises(ValueError, match="surrogates"):
        hiredis.pack_command(("SET", "k", "\ud800"))


def _read_all(data: bytes, count: int) -> list[Any]:
    reader = reply_reader()
    reader.feed(data)
    replies: list[Any] = []
    take_replies(reader, replies, count)
    return replies


def test_every_resp2_and_resp3_type_redis_sends() -> None:
    data = (
        b"+OK\r\n"
        b":-42\r\n"
        b"$5\r\nhello\r\n"
        b"$0\r\n\r\n"
        b"$-1\r\n"
        b"*-1\r\n"
        b"*2\r\n$2\r\nid\r\n*2\r\n$4\r\ndata\r\n$1\r\nx\r\n"
        b"_\r\n"
        b"#t\r\n"
        b"#f\r\n"  # a RESP3 false must not read as "no complete reply yet"
        b",1.5\r\n"
        b"%1\r\n$1\r\nk\r\n:1\r\n"
        b"~2\r\n:1\r\n:2\r\n"
        b"=8\r\ntxt:abcd\r\n"
        b":7\r\n"
    )
    got = _read_all(data, 100)
    assert got == [
        b"OK", -42, b"hello", b"", None, None, [b"id", [b"data", b"x"]],
        None, True, False, 1.5, {b"k": 1}, [1, 2], b"abcd", 7,
    ]


@pytest.mark.parametrize(
    ("line", "kind", "text"),
    [
        ("MOVED 3999 127.0.0.1:7001", MovedError, "3999 127.0.0.1:7001"),
        ("ASK 3999 127.0.0.1:7001", AskError, "3999 127.0.0.1:7001"),
        ("TRYAGAIN Multiple keys request during rehashing", TryAgainError, None),
        ("CLUSTERDOWN The cluster is down", ClusterDownError, None),
        ("NOSCRIPT No matching script", NoScriptError, None),
        ("WRONGTYPE Operation against a key", ResponseError, "WRONGTYPE Operation against a key"),
        ("NOGROUP No such key", ResponseError, "NOGROUP No such key"),
    ],
)
def test_error_replies_are_redis_py_exceptions(line: str, kind: type, text: str | None) -> None:
    # Returned, not raised: one command's error must not stop the batch.
    (got,) = _read_all(b"-" + line.encode() + b"\r\n", 1)
    assert type(got) is kind
    if text is not None:
        assert str(got) == text


def test_an_error_does_not_stop_the_replies_after_it() -> None:
    got = _read_all(b"+OK\r\n-ERR boom\r\n:3\r\n", 3)
    assert got[0] == b"OK"
    assert isinstance(got[1], ResponseError)
    assert got[2] == 3


def test_push_frames_are_skipped_and_not_counted() -> None:
    invalidate = b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n"
    message = b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n"
    data = invalidate + b":1\r\n" + message + invalidate + b"$1\r\nv\r\n"
    assert _read_all(data, 2) == [1, b"v"]


def test_push_frames_after_the_last_reply_leave_the_connection_clean() -> None:
    reader = reply_reader()
    reader.feed(b"+OK\r\n>2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n")
    replies: list[Any] = []
    take_replies(reader, replies, 1)
    assert replies == [b"OK"]
    assert reader.has_data()
    assert only_pushes_left(reader)


@pytest.mark.parametrize(
    "rest",
    [
        b">2\r\n$10\r\ninvali",  # part of a push frame: the rest would come later
        b":5\r\n",  # a reply nobody asked for
        b"?what\r\n",  # not RESP
    ],
)
def test_anything_but_push_frames_after_the_last_reply_is_flagged(rest: bytes) -> None:
    reader = reply_reader()
    reader.feed(b"+OK\r\n" + rest)
    replies: list[Any] = []
    take_replies(reader, replies, 1)
    assert replies == [b"OK"]
    assert not only_pushes_left(reader)


def test_count_leaves_the_rest_in_the_reader() -> None:
    reader = reply_reader()
    reader.feed(b":1\r\n:2\r\n:3\r\n")
    replies: list[Any] = []
    take_replies(reader, replies, 2)
    assert replies == [1, 2]
    take_replies(reader, replies, 5)
    assert replies == [1, 2, 3]
    assert not reader.has_data()


@pytest.mark.parametrize("garbage", [b"?what\r\n", b"$abc\r\nxyz\r\n", b"*x\r\n"])
def test_non_resp_bytes_raise_protocol_error(garbage: bytes) -> None:
    reader = reply_reader()
    reader.feed(garbage)
    with pytest.raises(hiredis.ProtocolError):
        take_replies(reader, [], 1)


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
# A top-level push frame, interleaved with the replies: never a reply.
_PUSH = b">2\r\n$7\r\nmessage\r\n$1\r\nx\r\n"
_frame = st.one_of(_value, _value, _value, st.just((_PUSH, _PUSH)))


@settings(max_examples=300, deadline=None)
@given(values=st.lists(_frame, min_size=1, max_size=8), cuts=st.lists(st.integers(0, 400)))
def test_any_split_of_the_byte_stream_gives_the_same_replies(
    values: list[tuple[Any, bytes]], cuts: list[int]
) -> None:
    expected = [value for value, raw in values if raw is not _PUSH]
    data = b"".join(v[1] for v in values)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    reader = reply_reader()
    got: list[Any] = []
    for start, stop in itertools.pairwise(points):
        reader.feed(data[start:stop])
        take_replies(reader, got, len(expected))
    assert got == expected
    # Push frames after the last expected reply stay for only_pushes_left.
    assert only_pushes_left(reader)
    assert not reader.has_data()


class _CountingReader:
    """A hiredis reader that counts the bytes it is fed."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.fed = 0

    def feed(self, data: bytes) -> None:
        self.fed += len(data)
        self.inner.feed(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_reading_a_big_reply_is_linear_in_its_size() -> None:
    # Linear by construction, checked without a clock: every byte read from
    # the socket is handed to the parser once (the old reader re-copied and
    # re-parsed its whole buffer on every read: quadratic, 10 s for 32 MB),
    # and the parser is hiredis's C reader, which keeps its own buffer.
    assert isinstance(reply_reader(), hiredis.Reader)
    size, read = 32 << 20, 65536
    data = b"$%d\r\n%s\r\n" % (size, b"y" * size)
    replies = Replies(1)
    spy = _CountingReader(replies._reader)
    replies._reader = spy  # type: ignore[assignment]
    done = False
    for start in range(0, len(data), read):
        done = replies.feed(data[start : start + read])
    assert done
    assert spy.fed == len(data)
    assert len(replies.values[0]) == size
    assert replies.clean()
