"""What transcription gives back: a :class:`Result` per input, with its :class:`Segment` spans."""

from __future__ import annotations

import collections
import dataclasses
import zlib

import numpy as np

_CJK_JOIN = {"Chinese", "Cantonese", "Japanese"}


@dataclasses.dataclass
class Segment:
    """A stretch of the transcript with its time span in seconds."""

    start: float
    end: float
    text: str


@dataclasses.dataclass
class Result:
    """One input's transcript: ``token_ids`` are the generated ids (EOS excluded), ``error`` is set on failure."""

    source: str
    language: str | None = None
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    duration: float = 0.0
    segments: list[Segment] = dataclasses.field(default_factory=list)
    words: list | None = None
    error: str | None = None
    token_logprobs: list[float] = dataclasses.field(default_factory=list)  # one per id of token_ids
    truncated: bool = False  # a piece stopped at max_new_tokens instead of at its end: raise it and run again
    repetition_stopped: bool = False  # a piece was stopped in a decoding loop (stop_loops=True)
    language_probability: float | None = None  # of `language` (qasr_jax.decoding.language); None: forced, or not asked
    language_probabilities: dict[str, float] | None = None  # the 5 most probable languages, most probable first

    @property
    def confidence(self) -> float | None:
        """The mean log-probability of the generated tokens (None without tokens): near 0 is sure, lower is not."""
        return float(np.mean(self.token_logprobs)) if self.token_logprobs else None

    def to_dict(self) -> dict:
        """A JSON-ready dict (file, language, language_probability, language_probabilities, text, token_ids,
        token_logprobs, confidence, truncated, repetition_stopped, duration, segments, words, error)."""
        conf = self.confidence
        d = {"file": self.source, "language": self.language, "language_probability": self.language_probability,
             "language_probabilities": self.language_probabilities, "text": self.text, "token_ids": self.token_ids,
             "token_logprobs": [rounded_logprob(x) for x in self.token_logprobs],
             "confidence": None if conf is None else rounded_logprob(conf), "truncated": self.truncated,
             "repetition_stopped": self.repetition_stopped,
             "duration": round(self.duration, 3), "segments": [dataclasses.asdict(s) for s in self.segments]}
        if self.words is not None:
            d["words"] = [dataclasses.asdict(w) for w in self.words]
        if self.error is not None:
            d["error"] = self.error
        return d


def rounded_logprob(x: float) -> float:
    """A log-probability rounded to 6 decimals, never -0.0 (a sure token prints as 0.0)."""
    return round(float(x), 6) + 0.0  # IEEE: -0.0 + 0.0 is +0.0


def compression_ratio(text: str) -> float:
    """A text's UTF-8 bytes over their zlib-compressed bytes (0 for none): over 2.4 it mostly repeats itself."""
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


def join_texts(texts: list[str], language: str | None) -> str:
    """Pieces of one transcript joined: with spaces, or with nothing in Chinese, Cantonese and Japanese."""
    texts = [t.strip() for t in texts if t.strip()]
    return ("" if language in _CJK_JOIN else " ").join(texts)


def majority_language(languages: list[str | None]) -> str | None:
    """The language most pieces were detected in (the first of equals), or None when none was."""
    found = [lang for lang in languages if lang]
    return collections.Counter(found).most_common(1)[0][0] if found else None
