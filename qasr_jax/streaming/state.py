"""One stream's state inside its driver: its options (the prepared ``decoding.request.Request``, chunk size and
rollback counts), the open segment (its audio windows, loudness for the pause rule, last raw output), the segments
already committed, and the check of what ``feed`` is given. ``qasr_jax.streaming.driver`` advances many of them at
once.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qasr_jax.decoding.request import Request
from qasr_jax.io.audio import SAMPLE_RATE, AudioError
from qasr_jax.io.results import Segment, join_texts
from qasr_jax.streaming.audio import StreamAudio
from qasr_jax.streaming.prompts import prompt_parts
from qasr_jax.vad.rules import TurnDetector

QUIET_SECONDS = 0.3  # a pause: the segment's last 0.3 s ...
QUIET_DB = 20.0  # ... at least 20 dB below its loudest 0.1 s block
LOUDNESS_BLOCK = SAMPLE_RATE // 10


@dataclasses.dataclass
class Partial:
    """A stream's transcript so far: ``text`` is all of it, ``fixed_text`` the part no later chunk can change
    (the committed segments; within a segment the algorithm may still rewrite any of its text)."""

    language: str | None
    text: str
    fixed_text: str


@dataclasses.dataclass(frozen=True)
class Options:
    """A stream's request (language, context, hotwords) and the algorithm's parameters (see the driver's doc)."""

    request: Request
    chunk_samples: int
    unfixed_chunks: int
    unfixed_tokens: int
    max_new: int
    vad: bool = False  # pauses found by Silero VAD (qasr_jax.vad) end segments, instead of the energy rule


class SegmentState:
    """One run of the official algorithm: its audio, context, chunk count and last raw output."""

    def __init__(self, audio_cfg, context: str, start: int, tok, language: str | None):
        self.audio = StreamAudio(audio_cfg)
        self.context, self.start = context, start  # start: samples into the stream
        self.header, _ = prompt_parts(tok, context, language, "")
        self.chunks = 0
        self.raw = ""
        self.language: str | None = language
        self.text = ""
        self.truncated = False  # the last decode stopped at max_new_tokens
        self.inserted = False  # the slot holds this segment's last prompt
        self.loudest = 0.0  # mean square of the loudest 0.1 s block so far
        self.heard = False  # any non-zero sample yet (digital silence is not decoded: its text is "")

    def hear(self, chunk: np.ndarray) -> None:
        self.heard = self.heard or bool(np.any(chunk))
        n = chunk.shape[0] // LOUDNESS_BLOCK * LOUDNESS_BLOCK
        blocks = chunk[:n].reshape(-1, LOUDNESS_BLOCK) if n else chunk[None]
        self.loudest = max(self.loudest, float(np.max(np.mean(np.square(blocks, dtype=np.float64), axis=1))))

    def quiet(self) -> bool:
        tail = self.audio.recent(int(QUIET_SECONDS * SAMPLE_RATE))
        return float(np.mean(np.square(tail, dtype=np.float64))) <= self.loudest * 10 ** (-QUIET_DB / 10)


@dataclasses.dataclass
class Committed:
    """A segment that ended: its span and text, language, raw output, and whether its last decode was cut short."""

    span: Segment
    language: str | None
    raw: str
    truncated: bool


class StreamState:
    """A stream inside its driver: options, slot, buffered samples, committed segments and the open one."""

    def __init__(self, name: str, opts: Options, slot: int):
        self.name, self.opts, self.slot = name, opts, slot
        self.buffer = np.zeros(0, np.float32)
        self.fed = 0  # samples fed in all
        self.committed: list[Committed] = []
        self.generated: list[int] = []  # ids of the last decode (EOS excluded)
        self.segment: SegmentState | None = None
        self.done = False
        # With opts.vad: speech ends after QUIET_SECONDS of frames below Silero's negative threshold.
        self.turns = TurnDetector(prefix_padding_ms=0, silence_duration_ms=round(QUIET_SECONDS * 1000)) \
            if opts.vad else None

    def listen(self, chunk: np.ndarray) -> None:
        """Pass a chunk of the stream's audio to its voice activity detector (with ``opts.vad``)."""
        if self.turns is not None:
            self.turns.feed(chunk)

    def paused(self) -> bool:
        """Whether the audio so far ends in a pause: with ``opts.vad``, Silero VAD hears no speech (none yet, or
        none for QUIET_SECONDS); otherwise the open segment's last QUIET_SECONDS lie QUIET_DB below its loudest."""
        return not self.turns.in_speech if self.turns is not None else self.segment.quiet()

    def texts(self) -> list[str]:
        return [c.span.text for c in self.committed]

    def language(self) -> str | None:
        langs = [c.language for c in self.committed] + [self.segment.language]
        return next((lang for lang in reversed(langs) if lang), None)

    def partial(self) -> Partial:
        lang = self.language()
        return Partial(lang, join_texts(self.texts() + [self.segment.text], lang), join_texts(self.texts(), lang))


def checked_samples(x, label: str) -> np.ndarray:
    """Fed samples as float32, after checking them (1-D, float or int16, finite)."""
    arr = np.asarray(x)
    if arr.dtype == np.int16:
        arr = arr.astype(np.float32) / 32768.0
    elif arr.dtype.kind == "f":
        arr = arr.astype(np.float32, copy=False)
    else:
        raise AudioError(f"{label}: feed takes 16 kHz mono float32 or int16 samples, got dtype {arr.dtype}; convert "
                         "first (e.g. samples.astype(np.float32) scaled to [-1, 1])")
    if arr.ndim != 1:
        raise AudioError(f"{label}: feed takes 1-D mono samples, got shape {arr.shape}; pass one channel (for "
                         "(channels, samples): samples.mean(axis=0))")
    if not np.all(np.isfinite(arr)):
        raise AudioError(f"{label}: samples contain NaN or Inf; clean the audio before feeding it")
    return arr
