"""Turning stored records (results, progress, schedules) and task messages
into bytes and back.

JSON is the default everywhere: a record read from Redis is data, and
unpickling data that anyone with write access to the cluster can change
would let them run code in every worker. A user may still pass any taskiq
``TaskiqSerializer`` (pickle included) as an explicit choice.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from taskiq import BrokerMessage, TaskiqMessage
from taskiq.abc.serializer import TaskiqSerializer
from taskiq.formatters.proxy_formatter import ProxyFormatter
from taskiq.serializers import JSONSerializer

_Model = TypeVar("_Model", bound=BaseModel)

#: Longest decode-error text put into a log line or an exception.
_MAX_REASON = 300
#: Most parsed messages a formatter keeps for the receiver (see ``remember``),
#: and the largest message it keeps: a message taskiq never parses (released
#: at shutdown, say) stays until pushed out, so what can linger is bounded.
_MAX_REMEMBERED = 512
_MAX_REMEMBERED_BYTES = 16_384


def default_serializer() -> TaskiqSerializer:
    """The serializer used when the user passes none: plain JSON."""
    return JSONSerializer()


class MessageFormatter(ProxyFormatter):
    """taskiq's default formatter, with a faster encoder for the default serializer.

    With taskiq's stock ``JSONSerializer`` (no ``default`` hook), messages
    are encoded by pydantic's own JSON encoder instead of ``json.dumps`` of
    a JSON-mode dump: the same JSON value (pydantic's JSON mode already maps
    what JSON cannot hold, such as NaN, to null), a third of the CPU, which
    is a tenth of a kick. Only the bytes' spelling differs: no spaces after
    separators, and non-ASCII text as UTF-8 instead of ``\\u`` escapes.
    Any other serializer is used exactly as taskiq would. Decoding with
    the stock serializer is pydantic's one-call JSON validation, falling
    back to taskiq's own path for what that refuses (see :meth:`loads`).

    A broker that parses a message before handing it out (the stream
    broker checks that it is a taskiq message) may :meth:`remember` the
    result: taskiq's receiver then gets that object for the same bytes
    object instead of parsing them a second time.
    """

    def __init__(self, broker: Any) -> None:
        super().__init__(broker)
        # id() of the message bytes -> (those bytes, their parse). The bytes
        # are kept, so their id() cannot be reused while the entry exists.
        self._remembered: dict[int, tuple[bytes, TaskiqMessage]] = {}

    def remember(self, data: bytes, message: TaskiqMessage) -> None:
        """Let the next :meth:`loads` of this very ``data`` object return ``message``.

        ``message`` must be what :meth:`loads` made of ``data``. It is
        returned once: taskiq's receiver changes the message it runs.
        """
        if len(data) > _MAX_REMEMBERED_BYTES:
            return
        remembered = self._remembered
        if len(remembered) >= _MAX_REMEMBERED:
            del remembered[next(iter(remembered))]
        remembered[id(data)] = (data, message)

    def forget(self, data: bytes) -> None:
        """Drop what :meth:`remember` kept for ``data`` (it will not be parsed)."""
        kept = self._remembered.get(id(data))
        if kept is not None and kept[0] is data:
            del self._remembered[id(data)]

    def loads(self, message: bytes) -> TaskiqMessage:
        """Decode ``message``; a remembered parse of the same object is used once.

        With the stock ``JSONSerializer``, pydantic parses and validates the
        JSON in one call (1.8 us against 6.6 us for ``json.loads`` and then
        validation). What it refuses goes through taskiq's own path, which
        then decides and words the error: it also takes JSON that pydantic
        does not, such as a lone surrogate escape in a string.
        """
        if self._remembered:
            kept = self._remembered.pop(id(message), None)
            if kept is not None and kept[0] is message:
                return kept[1]
        if type(self.broker.serializer) is JSONSerializer:
            try:
                return TaskiqMessage.model_validate_json(message)
            except ValidationError:
                pass
        return super().loads(message)

    def dumps(self, message: TaskiqMessage) -> BrokerMessage:
        """Encode ``message`` for the broker."""
        serializer = self.broker.serializer
        if type(serializer) is not JSONSerializer or serializer.default is not None:
            return super().dumps(message)
        return BrokerMessage(
            task_id=message.task_id,
            task_name=message.task_name,
            message=message.model_dump_json().encode(),
            labels=message.labels,
        )


def dump_model(model: BaseModel, serializer: TaskiqSerializer) -> bytes:
    """Encode a pydantic model through ``serializer`` (JSON-safe dump first)."""
    return serializer.dumpb(model.model_dump(mode="json"))


def load_model(model_type: type[_Model], raw: bytes | str, serializer: TaskiqSerializer) -> _Model:
    """Decode ``raw`` into ``model_type``.

    Any failure (bad bytes, bad JSON, wrong shape) raises ``ValueError``
    with a short, single-line reason, so callers handle one exception type
    whatever the serializer raises internally.
    """
    try:
        data: Any = serializer.loadb(raw.encode() if isinstance(raw, str) else raw)
        return model_type.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ValueError(_shorten(f"does not match {model_type.__name__}: {problems}")) from exc
    except Exception as exc:  # serializers raise anything from ValueError to their own types
        raise ValueError(_shorten(f"cannot be decoded: {type(exc).__name__}: {exc}")) from exc


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    if len(text) > _MAX_REASON:
        text = text[: _MAX_REASON - 3] + "..."
    return text
