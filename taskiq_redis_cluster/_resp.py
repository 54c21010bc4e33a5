"""A small RESP2/RESP3 encoder and incremental reply reader for the fast path.

redis-py packs every command through its generic encoder and parses every
reply through an awaited parser call inside its own timeout context. For the
auto-pipeline's batches (XADD, XACK, LPUSH, WAIT: short commands, short
replies) that machinery costs several times the command itself, so the fast
path packs a batch in one go and parses the whole batch of replies from one
buffer, synchronously, as bytes arrive.

Replies are raw protocol values: bytes for strings (no decoding), int, float,
bool, None, lists, dicts and sets. Error replies are returned (not raised) as
:class:`ErrorReply`; the caller turns them into redis-py's exception classes.
RESP3 push frames (``>``) are out-of-band and skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

_CRLF = b"\r\n"


class ProtocolError(Exception):
    """The byte stream is not RESP; the connection must be dropped."""


class ErrorReply:
    """An error reply (``-ERR ...`` or a RESP3 blob error), not yet raised."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message

    def __repr__(self) -> str:
        return f"ErrorReply({self.message!r})"


def _encode(arg: Any) -> bytes:
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, bool):
        # As redis-py: a bool is almost always a bug (True would be sent as 1).
        raise TypeError("bool is not a valid Redis argument; use an int or a string")
    if isinstance(arg, int):
        return b"%d" % arg
    if isinstance(arg, float):
        return repr(arg).encode()
    if isinstance(arg, (bytearray, memoryview)):
        return bytes(arg)
    raise TypeError(f"invalid Redis argument of type {type(arg).__name__}")


def pack_commands(commands: Iterable[Sequence[Any]]) -> bytes:
    """Encode ``commands`` (each a full argument list) as one RESP request."""
    parts: list[bytes] = []
    append = parts.append
    for args in commands:
        append(b"*%d\r\n" % len(args))
        for arg in args:
            # Exact type checks first: this loop runs for every argument of
            # every kick, and bytes and str are nearly all of them.
            kind = type(arg)
            if kind is bytes:
                data = arg
            elif kind is str:
                data = arg.encode()
            else:
                data = _encode(arg)
            append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Incomplete(Exception):
    """Not enough bytes for a whole reply yet."""


_INCOMPLETE = _Incomplete()


class ReplyReader:
    """Incremental reply parser: :meth:`feed` bytes, then take :meth:`replies`.

    A reply split over several reads is re-parsed from its start once more
    bytes arrive; the replies here are short, so that costs little.
    """

    __slots__ = ("_buffer", "_pos")

    def __init__(self) -> None:
        self._buffer = b""
        self._pos = 0

    def feed(self, data: bytes) -> None:
        """Append bytes read from the connection."""
        if self._pos:
            self._buffer = self._buffer[self._pos :] + data
            self._pos = 0
        else:
            self._buffer += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet parsed into a reply."""
        return len(self._buffer) - self._pos

    def replies(self, limit: int) -> list[Any]:
        """Parse and return up to ``limit`` complete replies (maybe none).

        :raises ProtocolError: on bytes that are not RESP.
        """
        out: list[Any] = []
        buffer, pos = self._buffer, self._pos
        while len(out) < limit and pos < len(buffer):
            try:
                push = buffer[pos] == 62  # '>'
                value, pos = _parse(buffer, pos)
            except _Incomplete:
                break
            except (ValueError, IndexError) as exc:
                raise ProtocolError(f"malformed reply: {exc}") from None
            if not push:
                out.append(value)
            self._pos = pos
        return out


def _parse(buf: bytes, pos: int) -> tuple[Any, int]:
    """Parse one reply starting at ``pos``; return it and the next position."""
    end = buf.find(_CRLF, pos)
    if end < 0:
        raise _INCOMPLETE
    kind = buf[pos]
    line = buf[pos + 1 : end]
    nxt = end + 2
    if kind == 36 or kind == 33 or kind == 61:  # '$' bulk, '!' blob error, '=' verbatim
        length = int(line)
        if length < 0:
            return None, nxt
        stop = nxt + length
        if len(buf) < stop + 2:
            raise _INCOMPLETE
        data = buf[nxt:stop]
        if kind == 33:
            return ErrorReply(data.decode("utf-8", "replace")), stop + 2
        if kind == 61:
            data = data[4:]  # drop the "txt:" format prefix
        return data, stop + 2
    if kind == 58 or kind == 40:  # ':' integer, '(' big number
        return int(line), nxt
    if kind == 43:  # '+' simple string
        return line, nxt
    if kind == 45:  # '-' error
        return ErrorReply(line.decode("utf-8", "replace")), nxt
    if kind == 42 or kind == 126 or kind == 62:  # '*' array, '~' set, '>' push
        count = int(line)
        if count < 0:
            return None, nxt
        items = []
        for _ in range(count):
            item, nxt = _parse(buf, nxt)
            items.append(item)
        return items, nxt
    if kind == 37 or kind == 124:  # '%' map, '|' attribute
        count = int(line)
        mapping = {}
        for _ in range(count):
            key, nxt = _parse(buf, nxt)
            value, nxt = _parse(buf, nxt)
            mapping[key if not isinstance(key, list) else tuple(key)] = value
        if kind == 124:  # attributes annotate the reply that follows
            return _parse(buf, nxt)
        return mapping, nxt
    if kind == 95:  # '_' null
        return None, nxt
    if kind == 35:  # '#' boolean
        return line == b"t", nxt
    if kind == 44:  # ',' double
        return float(line), nxt
    raise ProtocolError(f"unexpected RESP type byte {bytes([kind])!r}")
