"""One request type and one way to prepare it: what a user asks for (language, context, hotwords) checked and
turned into the :class:`Request` the decoding layer runs: a canonical language name or None, the system prompt's
context text, and the hotword trie the search boosts.

Offline transcription (``Transcriber.transcribe_iter``), the server's ``/v1/audio/transcriptions``, its realtime
sessions and live streams (``StreamDriver.stream``) all call :func:`prepare`, so a request means the same everywhere
and is refused for the same reasons, before any audio is read or the model runs. The Request then goes down
unchanged: each audio piece of it is a ``pipeline.Work`` (``work.request``), the server's scheduler takes it as it is
(``Scheduler.submit``), and a stream keeps it (``StreamDriver.open``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from qasr_jax.decoding import hotwords as hw
from qasr_jax.io.prompts import context_problem, normalize_language
from qasr_jax.io.tokenizer import Tokenizer


class RequestError(ValueError):
    """A request that cannot run; ``field`` names what is wrong: "language", "context" or "hotwords"."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


@dataclasses.dataclass(frozen=True)
class Request:
    """A checked request: ``language`` (canonical name, or None to let the model say it), ``context`` (the text
    the system prompt carries, the hotwords after it when asked) and ``hotwords`` (the search's trie and boost,
    ``hotwords.for_search``; None without hotwords). ``Request()`` asks for nothing: detect the language, no context."""

    language: str | None = None
    context: str = ""
    hotwords: tuple | None = None

    @property
    def hotword_edges(self) -> int:
        """The edges of the hotword trie (0 without hotwords): the room a batcher or driver needs for it."""
        return hw.edges_of(self.hotwords)


def prepare(tokenizer: Tokenizer, languages: Iterable[str] | None, language: str | None = None, context: str = "",
            hotwords: Sequence[str] | None = None, hotword_boost: float = hw.DEFAULT_BOOST,
            hotwords_in_context: bool = False, name: str = "context") -> Request:
    """Check one request and build what decoding needs; ``RequestError`` (a ValueError) names what is wrong.

    ``languages``: the model's supported language names (a config's ``support_languages``); ``language`` a name
    or ISO code ("English", "en", "yue"), None or blank to detect it. ``context`` must fit in
    ``MAX_CONTEXT_TOKENS`` with its hotwords when ``hotwords_in_context``; ``name`` is how an error calls it.
    """
    if language is not None and str(language).strip():
        try:
            language = normalize_language(language, languages)
        except ValueError as e:
            raise RequestError(str(e), "language") from None
    else:
        language = None
    words = [str(w) for w in (hotwords or []) if str(w).strip()]
    context = hw.with_context(context or "", words) if hotwords_in_context else context or ""
    problem = context_problem(tokenizer, context, name + (" with its hotwords" if hotwords_in_context and words
                                                          else ""))
    if problem:
        raise RequestError(problem, "context")
    try:
        trie = hw.for_search(words, tokenizer.encode, hotword_boost)
    except ValueError as e:
        raise RequestError(str(e), "hotwords") from None
    return Request(language, context, trie)
