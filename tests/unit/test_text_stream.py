"""A row's text stream: pieces that add up to the whole answer, a short window per token, and no
decoding at all for a job nobody streams."""

from __future__ import annotations

from hunyuan_service.models.base import JobContext
from hunyuan_service.models.decoding.rows import TextStream


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
