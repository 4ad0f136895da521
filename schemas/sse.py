"""Server-Sent Events framing (https://html.spec.whatwg.org/multipage/server-sent-events.html)."""

from __future__ import annotations

from dataclasses import dataclass, field


def encode_event(data: str, event: str | None = None, event_id: str | None = None) -> bytes:
    lines: list[str] = []
    if event is not None:
        lines.append(f"event: {event}")
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.extend(f"data: {line}" for line in data.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()


def encode_comment(text: str) -> bytes:
    return f": {text}\n\n".encode()


@dataclass
class ServerSentEvent:
    data: str
    event: str = "message"
    id: str | None = None


@dataclass
class SSEDecoder:
    """Incremental parser: feed it lines as they arrive, get whole events back."""

    _data: list[str] = field(default_factory=list)
    _event: str = ""
    _id: str | None = None

    def feed_line(self, raw: str) -> ServerSentEvent | None:
        line = raw.rstrip("\r\n")
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        if not self._data:
            self._event, self._id = "", None
            return None
        event = ServerSentEvent(data="\n".join(self._data), event=self._event or "message", id=self._id)
        self._data, self._event, self._id = [], "", None
        return event
