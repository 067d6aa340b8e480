"""A row's text stream: pieces that add up to the whole answer, a short window per token, and no
decoding at all for a job nobody streams; a row's stop strings found in that text as decoding
the whole answer after every token would find them."""

from __future__ import annotations

import random

import pytest

from hunyuan_service.models.base import JobContext
from hunyuan_service.models.decoding.rows import Row, TextStream
from hunyuan_service.models.types import Image2TextInput


class ByteTokenizer:
    """One token per UTF-8 byte, decoded as a byte-level tokenizer does; counts its work."""

    clean_up_tokenization_spaces = False

    def __init__(self) -> None:
        self.windows: list[int] = []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.windows.append(len(ids))
        return bytes(ids).decode("utf-8", errors="replace")


TEXT = "héllo wörld ✓ " * 40  # two- and three-byte characters split across tokens


def test_the_pieces_add_up_to_the_answer_and_each_token_decodes_a_short_window() -> None:
    tokenizer = ByteTokenizer()
    pieces: list[str] = []
    stream = TextStream(tokenizer, JobContext(on_token=pieces.append), prompt_seen=True)
    for byte in TEXT.encode():
        stream.put_token(byte)
    stream.end()
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in piece for piece in pieces)  # a character is never cut
    assert len(pieces) == len(TEXT)  # one piece per character
    assert max(tokenizer.windows) <= 6  # never the whole answer (560 tokens)


def test_a_job_nobody_streams_decodes_nothing() -> None:
    tokenizer = ByteTokenizer()
    pieces: list[str] = []
    ctx = JobContext(on_token=pieces.append, wants_tokens=False)
    stream = TextStream(tokenizer, ctx, prompt_seen=True)
    for byte in TEXT.encode():
        stream.put_token(byte)
    stream.end()
    assert pieces == []
    assert tokenizer.windows == []


class ChunkTokenizer(ByteTokenizer):
    """Tokens of one to three bytes each, so a token can end inside a character or complete one
    and begin another, as byte-level BPE tokens do."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[bytes] = []

    def tokens(self, data: bytes, rng: random.Random) -> list[int]:
        ids, at = [], 0
        while at < len(data):
            size = rng.randrange(1, 4)
            self.chunks.append(data[at : at + size])
            ids.append(len(self.chunks) - 1)
            at += size
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.windows.append(len(ids))
        return b"".join(self.chunks[i] for i in ids).decode("utf-8", errors="replace")


def row_with_stops(tokenizer: ByteTokenizer, stop: tuple[str, ...], streamed: bool) -> Row:
    request = Image2TextInput(messages=(), max_new_tokens=10_000, stop=stop)
    ctx = JobContext(wants_tokens=streamed)
    stream = TextStream(tokenizer, ctx, prompt_seen=True, keep_text=True)
    return Row(
        key=None,
        request=request,
        ctx=ctx,
        prompt_ids=[1],
        start=0,
        reserved=0,
        rope_delta=0,
        sampler=None,
        streamer=stream,
        eos=frozenset(),
    )


@pytest.mark.parametrize("trial", range(80))
@pytest.mark.parametrize("streamed", [True, False])
def test_a_row_ends_at_its_stop_string_on_the_token_decoding_everything_would(
    trial: int, streamed: bool
) -> None:
    rng = random.Random(trial)
    alphabet = ["a", "b", "x", "é", "✓", "🙂", " "]
    text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60)))
    # stop strings cut from the text itself (so most are found), or new ones (some are not)
    stop = tuple(
        text[i : i + rng.randrange(1, 6)]
        if rng.random() < 0.7
        else "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 4)))
        for i in (rng.randrange(len(text)) for _ in range(rng.randrange(1, 4)))
    )
    tokenizer = ChunkTokenizer()
    ids = tokenizer.tokens(text.encode(), rng)
    expected = None  # the old way: the whole answer decoded after every token
    for end in range(1, len(ids) + 1):
        if any(s in tokenizer.decode(ids[:end]) for s in stop):
            expected = end
            break
    tokenizer.windows.clear()
    row = row_with_stops(tokenizer, stop, streamed)
    taken = 0
    for token in ids:
        row.take(token)
        taken += 1
        if row.ended:
            break
    assert (taken if row.ended else None) == expected, (text, stop)
    # a few tokens around a cut character at most, never the whole answer (up to 60 tokens)
    assert max(tokenizer.windows, default=0) <= 12


def test_a_stop_string_before_a_cut_character_stops_the_row_on_that_token() -> None:
    # One token holds "x" and the first byte of "é": the whole answer decodes to "ax\ufffd",
    # which holds the stop "x". The stream holds the cut character back, and the row must
    # still stop on this token, not on the next.
    tokenizer = ChunkTokenizer()
    tokenizer.chunks = [b"a", "xé".encode()[:2], "xé".encode()[2:]]
    row = row_with_stops(tokenizer, ("x",), streamed=True)
    row.take(0)
    assert row.ended is None
    row.take(1)
    assert row.ended == "stop"
    assert (row.streamer.text, row.streamer.pending) == ("a", "x\ufffd")
