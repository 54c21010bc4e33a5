"""The fast path's wire format through hiredis: packing commands, parsing replies (no I/O).

Commands are packed by ``hiredis.pack_command`` (the same bytes as
redis-py's encoder) and replies parsed by a ``hiredis.Reader`` in C, in time
linear in the reply size. Replies are raw protocol values (bytes, int,
float, bool, None, lists, dicts), without redis-py's response callbacks;
error replies come out as the exception redis-py would raise (MovedError,
NoScriptError, ResponseError...), so both paths classify errors alike.
:class:`Replies` is what :func:`~._internals.exchange` feeds the bytes of
one batch to.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.exceptions import DataError

from ._internals import parse_error

logger = logging.getLogger(__name__)

# What hiredis.Reader.gets() returns while a reply is incomplete. Its default,
# False, is also a RESP3 boolean reply, so it cannot be told apart.
_MORE = object()
_Push = hiredis.PushNotification


def pack(commands: Sequence[Sequence[Any]]) -> bytes:
    """The bytes of ``commands``, one after the other.

    :raises DataError: for an argument hiredis cannot send (a bool, None, a
        str that is not valid UTF-8...), as redis-py would; nothing is packed.
    """
    try:
        return b"".join(hiredis.pack_command(tuple(command)) for command in commands)
    except (TypeError, ValueError) as exc:
        raise DataError(str(exc)) from None


def reply_reader() -> hiredis.Reader:
    """A reply reader for one exchange: raw bytes, redis-py's error classes."""
    return hiredis.Reader(replyError=parse_error, notEnoughData=_MORE)


def take_replies(reader: hiredis.Reader, replies: list[Any], count: int) -> None:
    """Move the complete replies in ``reader`` to ``replies``, up to ``count`` in all.

    RESP3 push frames (``>``: keyspace invalidations, pub/sub messages) are
    out-of-band: no command asked for them, so they are skipped here and
    never counted as a reply. Nothing in this library subscribes or tracks
    keys on these pooled connections, so there is no handler to give them to.

    :raises hiredis.ProtocolError: on bytes that are not RESP.
    """
    gets = reader.gets
    while len(replies) < count:
        value = gets()
        if value is _MORE:
            return
        if value.__class__ is not _Push:
            replies.append(value)


def only_pushes_left(reader: hiredis.Reader) -> bool:
    """Skip push frames after the last reply; False if anything else is left.

    Anything else (part of a frame, or a reply nobody asked for) means the
    next user of the connection would start mid-stream.
    """
    try:
        while reader.has_data():
            value = reader.gets()
            if value is _MORE or value.__class__ is not _Push:
                return False
    except hiredis.HiredisError:
        return False
    return True


class Replies:
    """The replies of one batch of ``count`` commands, filled as bytes arrive.

    ``values`` keeps what was parsed so far, so after a failure mid-batch the
    caller still knows which commands were answered (and so applied).
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.values: list[Any] = []
        self._reader = reply_reader()

    def feed(self, data: bytes) -> bool:
        """Parse ``data``; True once every expected reply is in.

        :raises hiredis.ProtocolError: on bytes that are not RESP.
        """
        self._reader.feed(data)
        take_replies(self._reader, self.values, self.count)
        return len(self.values) >= self.count

    def clean(self) -> bool:
        """After the last reply: True unless bytes nobody asked for are left."""
        return not self._reader.has_data() or only_pushes_left(self._reader)
