"""From speech probabilities to decisions: speech segments (Silero's ``get_speech_timestamps`` rules), transcription
pieces of at most N seconds, and realtime turns (OpenAI's ``server_vad``).

Probabilities come from ``qasr_jax.vad.network``; everything here is host-side bookkeeping over one number per 32 ms.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from qasr_jax.decoding.longform import Piece
from qasr_jax.io.audio import SAMPLE_RATE
from qasr_jax.vad.network import FRAME_SAMPLES, initial_state, speech_probabilities, stream_probabilities

NEG_THRESHOLD_GAP = 0.15  # leaving speech takes a probability below threshold - 0.15 (Silero's hysteresis)
MAX_SPEECH_MIN_GAP = 0.098  # an over-long segment is only split at a silence longer than this (Silero's 98 ms)


def _samples(seconds: float) -> int:
    return int(round(seconds * SAMPLE_RATE))


def negative_threshold(threshold: float) -> float:
    """The probability below which speech counts as ended: threshold - 0.15, at least 0.01 (as Silero)."""
    return max(threshold - NEG_THRESHOLD_GAP, 0.01)


def segments_from_probabilities(probs, n_samples: int, threshold: float = 0.5, min_speech_seconds: float = 0.25,
                                min_silence_seconds: float = 0.1, pad_seconds: float = 0.03,
                                max_speech_seconds: float = math.inf) -> list[tuple[int, int]]:
    """Per-frame probabilities of ``n_samples`` samples -> speech spans as (start, end) samples, by Silero's rules."""
    min_speech, min_silence, pad = _samples(min_speech_seconds), _samples(min_silence_seconds), _samples(pad_seconds)
    max_speech = SAMPLE_RATE * max_speech_seconds - FRAME_SAMPLES - 2 * pad  # room for the padding added at the end
    low = negative_threshold(threshold)
    spans: list[list[int]] = []
    start: int | None = None  # the open segment's start, None outside speech
    quiet_from: int | None = None  # where the current run of low frames inside speech began
    gaps: list[tuple[int, int]] = []  # (start, length) of the finished silences inside the open segment
    for i, p in enumerate(np.asarray(probs, np.float64)):
        here = i * FRAME_SAMPLES
        if p >= threshold and quiet_from is not None:  # speech is back: the silence may be a place to split
            if here - quiet_from > _samples(MAX_SPEECH_MIN_GAP):
                gaps.append((quiet_from, here - quiet_from))
            quiet_from = None
        if start is None:
            if p >= threshold:
                start = here
            continue
        if here - start > max_speech:  # too long: split at its longest silence, or right here if it has none
            if gaps:
                cut, length = max(gaps, key=lambda g: g[1])
                spans.append([start, cut])
                start, quiet_from, gaps = cut + length, None, []
            else:
                spans.append([start, here])
                start, quiet_from, gaps = None, None, []
                continue
        if p < low:
            quiet_from = here if quiet_from is None else quiet_from
            if here - quiet_from >= min_silence:
                if quiet_from - start > min_speech:
                    spans.append([start, quiet_from])
                start, quiet_from, gaps = None, None, []
    if start is not None and n_samples - start > min_speech:
        spans.append([start, n_samples])
    return _padded_spans(spans, n_samples, pad)


def _padded_spans(spans: list[list[int]], n_samples: int, pad: int) -> list[tuple[int, int]]:
    """Widen each span by ``pad`` on both sides; neighbours closer than two pads split the gap between them."""
    if spans:
        spans[0][0] = max(0, spans[0][0] - pad)
    for span, after in zip(spans, spans[1:]):
        gap = after[0] - span[1]
        grow = gap // 2 if gap < 2 * pad else pad
        span[1] = min(n_samples, span[1] + grow)
        after[0] = max(0, after[0] - grow)
    if spans:
        spans[-1][1] = min(n_samples, spans[-1][1] + pad)
    return [(a, b) for a, b in spans]


def speech_segments(audio, sample_rate: int = SAMPLE_RATE, threshold: float = 0.5, min_speech_seconds: float = 0.25,
                    min_silence_seconds: float = 0.1, pad_seconds: float = 0.03, max_speech_seconds: float = math.inf):
    """Speech spans of a waveform as (start, end) seconds (a list of waveforms -> one list each), as Silero's
    ``get_speech_timestamps``: threshold with hysteresis, shortest speech and silence, padding, longest span."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be between 0 and 1 (a speech probability), got {threshold}")
    if max_speech_seconds <= 2 * FRAME_SAMPLES / SAMPLE_RATE + 2 * pad_seconds:
        raise ValueError(f"max_speech_seconds={max_speech_seconds} is too short to hold speech; use 1 or more")
    single = not isinstance(audio, (list, tuple))
    probs = speech_probabilities([audio] if single else list(audio), sample_rate)
    lengths = [_16k_length(w, sample_rate) for w in ([audio] if single else audio)]
    out = [[(a / SAMPLE_RATE, b / SAMPLE_RATE) for a, b in segments_from_probabilities(
        p, n, threshold, min_speech_seconds, min_silence_seconds, pad_seconds, max_speech_seconds)]
        for p, n in zip(probs, lengths)]
    return out[0] if single else out


def _16k_length(wave, sample_rate: int) -> int:
    """Samples at 16 kHz of a waveform at ``sample_rate`` (as the resampler makes them)."""
    n = np.shape(wave)[-1]
    return n if sample_rate == SAMPLE_RATE else int(math.ceil(n * SAMPLE_RATE / sample_rate))


def speech_pieces(waves: list[np.ndarray], max_seconds: float = 30.0, threshold: float = 0.5) -> list[list[Piece]]:
    """16 kHz waveforms -> for each, its speech in pieces of at most ``max_seconds`` (offsets in the original):
    Silero's segments (over-long speech split at its longest pause), neighbours merged while they fit."""
    if max_seconds < 1.0:
        raise ValueError(f"the VAD piece length (vad_max_seconds) must be at least 1 second, got {max_seconds}")
    limit = _samples(max_seconds)
    out = []
    for probs, wave in zip(speech_probabilities(list(waves)), waves):
        spans: list[list[int]] = []
        for a, b in segments_from_probabilities(probs, wave.shape[0], threshold, max_speech_seconds=max_seconds):
            if spans and b - spans[-1][0] <= limit:
                spans[-1][1] = b  # the pause between them stays in the piece, so its timeline is the original's
            else:
                spans.append([a, b])
        out.append([Piece(wave[a:b], a / SAMPLE_RATE) for a, b in spans])
    return out


@dataclasses.dataclass(frozen=True)
class TurnEvent:
    """A realtime turn boundary: ``kind`` is "speech_started" or "speech_stopped"; ``sample`` counts from the start
    of the stream (for a start: where the turn's audio begins, prefix padding included)."""

    kind: str
    sample: int


class TurnDetector:
    """OpenAI's ``server_vad`` over one live 16 kHz stream: ``feed(samples)`` -> the turn boundaries they complete.

    Speech starts at the first frame with probability >= ``threshold`` (the turn keeps ``prefix_padding_ms`` of
    audio before it); it stops once probabilities stay below ``threshold - 0.15`` for ``silence_duration_ms``.
    """

    def __init__(self, threshold: float = 0.5, prefix_padding_ms: int = 300, silence_duration_ms: int = 500):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"turn_detection.threshold must be between 0 and 1, got {threshold}")
        if prefix_padding_ms < 0 or silence_duration_ms < 0:
            raise ValueError("turn_detection.prefix_padding_ms and silence_duration_ms must be >= 0, got "
                             f"{prefix_padding_ms} and {silence_duration_ms}")
        self.threshold, self.low = threshold, negative_threshold(threshold)
        self.prefix = _samples(prefix_padding_ms / 1000)
        self.silence = _samples(silence_duration_ms / 1000)
        self.state = initial_state(1)
        self.pending = np.zeros(0, np.float32)  # samples short of a whole frame
        self.frames = 0  # frames seen
        self.in_speech = False
        self.quiet_from: int | None = None  # sample where the current silence inside speech began

    def feed(self, samples: np.ndarray) -> list[TurnEvent]:
        """Push 16 kHz samples; returns the speech_started / speech_stopped events they complete, in order."""
        audio = np.concatenate([self.pending, np.asarray(samples, np.float32).reshape(-1)])
        whole = audio.shape[0] // FRAME_SAMPLES * FRAME_SAMPLES
        self.pending = audio[whole:]
        if whole == 0:
            return []
        (probs,), self.state = stream_probabilities(self.state, [audio[:whole]])
        events = []
        for p in probs:
            here = self.frames * FRAME_SAMPLES
            self.frames += 1
            if not self.in_speech:
                if p >= self.threshold:
                    self.in_speech, self.quiet_from = True, None
                    events.append(TurnEvent("speech_started", max(0, here - self.prefix)))
            elif p < self.low:
                self.quiet_from = here if self.quiet_from is None else self.quiet_from
                if here + FRAME_SAMPLES - self.quiet_from >= self.silence:
                    self.in_speech = False
                    events.append(TurnEvent("speech_stopped", self.quiet_from))
            elif p >= self.threshold:
                self.quiet_from = None
        return events
