"""Server-Sent Events framing without a server: what a node writes, and how a reader parses it line by line."""

from __future__ import annotations

from schemas.sse import ServerSentEvent, SSEDecoder, encode_comment, encode_event


def parse(raw: bytes) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    parsed = [decoder.feed_line(line) for line in raw.decode().splitlines(keepends=True)]
    return [event for event in parsed if event is not None]


def test_an_encoded_event_parses_back_to_itself() -> None:
    raw = encode_event('{"seq": 3}', event="job_update", event_id="3")
    assert raw == b'event: job_update\nid: 3\ndata: {"seq": 3}\n\n'
    assert parse(raw) == [ServerSentEvent(data='{"seq": 3}', event="job_update", id="3")]


def test_data_of_many_lines_is_one_event_and_plain_data_is_a_message() -> None:
    assert parse(encode_event("one\ntwo\n")) == [ServerSentEvent(data="one\ntwo\n", event="message", id=None)]


def test_comments_are_skipped_and_crlf_and_missing_spaces_are_read() -> None:
    raw = encode_comment("keep-alive") + b"event:ping\r\ndata:x\r\n\r\n" + b"data: [DONE]\n\n"
    assert parse(raw) == [ServerSentEvent(data="x", event="ping"), ServerSentEvent(data="[DONE]")]


def test_a_block_without_data_dispatches_nothing_and_forgets_its_fields() -> None:
    raw = b"event: lonely\nid: 9\n\ndata: after\n\n"
    assert parse(raw) == [ServerSentEvent(data="after", event="message", id=None)]


def test_an_id_with_a_nul_is_ignored_and_unknown_fields_too() -> None:
    assert parse(b"id: a\0b\nretry: 10\nfoo: bar\ndata: d\n\n") == [ServerSentEvent(data="d")]
