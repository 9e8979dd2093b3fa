"""The official streaming algorithm's text rules (qwen-asr 0.0.6): the prompt around the audio as the prompt string
``prompt_raw + prefix`` tokenizes, the prefix rolled back from the previous output, the generated text as vLLM's
detokenizer emits it; and the context a new segment carries (this project's, see ``qasr_jax.streaming.driver``)."""

from __future__ import annotations

import math
from collections.abc import Iterable

from qasr_jax.io.prompts import build_prompt_ids

CARRY_TOKENS = 32  # committed text a new segment's context carries
# Audio decoded with no text prefix at a stream's start: the official default's 2 chunks of 2 s. With 1 s chunks,
# 2 chunks committed words cut at chunk edges (tiny-en's streamed WER rose from 13.3% offline to 18.7%).
UNFIXED_SECONDS = 4.0


def unfixed_chunks_for(chunk_seconds: float) -> int:
    """The default ``unfixed_chunks``: at least 2 chunks and at least UNFIXED_SECONDS of audio (2 at 2 s chunks)."""
    return max(2, math.ceil(UNFIXED_SECONDS / chunk_seconds - 1e-9))


def rollback_prefix(tok, raw: str, unfixed_tokens: int, final: bool = False) -> str:
    """The prefix the next decode starts from: ``raw`` encoded, its last ``unfixed_tokens`` tokens dropped (and one
    more while the text holds a split character), decoded; ``final`` (the tail at finish): ``max(1, n - unfixed)``
    tokens kept, no split-character loop."""
    ids = tok.encode(raw, parse_special=True)
    if final:
        return tok.decode(ids[: max(1, len(ids) - unfixed_tokens)], skip_special_tokens=False)
    for end in range(len(ids) - unfixed_tokens, 0, -1):
        prefix = tok.decode(ids[:end], skip_special_tokens=False)
        if "\ufffd" not in prefix:
            return prefix
    return ""


def generated_text(tok, ids: Iterable[int]) -> str:
    """Text of generated ids as vLLM's incremental detokenizer emits it: special tokens skipped, trailing bytes of
    an unfinished character (U+FFFD) never emitted."""
    return tok.decode(ids).rstrip("\ufffd")


def segment_context(tok, context: str, committed: str) -> str:
    """The system context of a new segment: the stream's ``context`` and the last ``CARRY_TOKENS`` tokens of the
    text committed so far, on a line of their own."""
    ids, tail = tok.encode(committed)[-CARRY_TOKENS:], ""
    while ids:  # re-encoded, the decoded tail may take more tokens than it came from
        tail = tok.decode(ids).lstrip("\ufffd").strip()
        if len(tok.encode(tail)) <= CARRY_TOKENS:
            break
        ids, tail = ids[1:], ""
    return "\n".join(t for t in (context, tail) if t)


def prompt_parts(tok, context: str, language: str | None, prefix: str) -> tuple[list[int], list[int]]:
    """The prompt around the audio pads, as the official prompt string ``prompt_raw + prefix`` tokenizes: (ids up
    to ``<|audio_start|>``, ids after the pads). Unforced, ``assistant\\n`` and the prefix are one text run."""
    ids = build_prompt_ids(tok, 0, context, language)
    at = ids.index(tok.audio_start_id) + 1
    head, after = ids[:at], ids[at:]
    if not prefix:
        return head, after
    if language is None:
        opener = tok.encode("assistant\n")
        return head, after[: len(after) - len(opener)] + tok.encode("assistant\n" + prefix, parse_special=True)
    return head, after + tok.encode(prefix, parse_special=True)
