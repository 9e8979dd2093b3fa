"""Word timestamps with Qwen3-ForcedAligner: audio + its transcript -> when each word starts and ends.

The aligner input has no chat template (the official toolkit and transformers' processor build the same ids):

    <|audio_start|>{<|audio_pad|> x N}<|audio_end|>u1<timestamp><timestamp>u2<timestamp><timestamp>...uK<timestamp><timestamp>

where u1..uK are the alignment units of the text (``qasr_jax.io.units.split_units``), each tokenized on its own
(no leading space), and nothing follows the last pair of ``<timestamp>``. One forward pass gives 5000 class
logits at every position; the argmax at the two ``<timestamp>`` after a unit, times 80 ms, is its start and end.
Times that go backwards are repaired (``qasr_jax.io.units.fix_timestamps``), then clamped to the audio's end.

Batches run in one jitted call with bucketed shapes (batch to a power of two, audio to 8 s, tokens and timestamp
slots to 8 steps per power of two), so new lengths inside a bucket compile nothing. One call takes audio up to
``max_seconds`` (5 minutes); ``split=True`` aligns longer audio window by window (see ``Aligner.align``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from qasr_jax.decoding.buckets import aligner_rows, frame_bucket, length_bucket
from qasr_jax.io.audio import SAMPLE_RATE, load_audio, log_mel_batch, n_frames
from qasr_jax.io.hub import resolve_model_path
from qasr_jax.io.tokenizer import Tokenizer
from qasr_jax.io.units import aligner_language, fix_timestamps, split_units
from qasr_jax.loading import Model, load
from qasr_jax.modeling.config import DEFAULT_ALIGNER, audio_token_count

__all__ = ["Aligner", "Word", "resolve_model_path", "DEFAULT_MODEL"]

DEFAULT_MODEL = DEFAULT_ALIGNER  # the name this module has exported since 0.1.0
MAX_SECONDS = 300.0  # one forward pass covers at most 5 min (the 5000 classes x 80 ms reach 400 s)
SPLIT_GUARD_SECONDS = 2.0  # with split=True, units ending this close to a window's end are re-aligned in the next


@dataclasses.dataclass(frozen=True)
class Word:
    """One aligned unit (a word, or one CJK character), its start and end in seconds, and (from transcription)
    the mean log-probability of the generated tokens that spell it."""

    text: str
    start: float
    end: float
    logprob: float | None = None


def _similar_groups(items: Sequence, batch_size: int, size) -> list[list]:
    """Items sorted by ``size`` (ascending) -> batches of at most ``batch_size`` whose largest item is at most twice
    the smallest. Every row of a batch is padded to its largest item, so one batch of a 1 s and a 10 s clip would
    encode and decode ten seconds twice; split, each pays for its own length."""
    groups: list[list] = []
    for item in items:
        if groups and len(groups[-1]) < batch_size and size(item) <= 2 * size(groups[-1][0]):
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


@dataclasses.dataclass
class _Item:
    """One alignment request, prepared on the host."""

    wave: np.ndarray  # (samples,) 16 kHz float32
    units: list[str]
    ids: list[int]  # the aligner prompt
    slots: np.ndarray  # (2 * len(units),) positions of the <timestamp> tokens in ids


class Aligner:
    """Qwen3-ForcedAligner on JAX: ``align(audio, text, language)`` -> list of ``Word`` with times in seconds."""

    def __init__(self, model: Model, tokenizer: Tokenizer, max_seconds: float = MAX_SECONDS):
        """Wrap a loaded aligner ``Model`` and its tokenizer (use ``from_pretrained`` normally)."""
        if not model.config.is_aligner:
            raise ValueError(
                "this checkpoint is a speech recognizer, not a forced aligner (its config has no timestamp classes); "
                f"pass a Qwen3-ForcedAligner checkpoint such as {DEFAULT_MODEL}"
            )
        if not 0 < max_seconds <= MAX_SECONDS:
            raise ValueError(f"max_seconds must be in (0, {MAX_SECONDS:g}], got {max_seconds}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_seconds = float(max_seconds)
        cfg = model.config
        self._segment_ms = float(cfg.timestamp_segment_ms)
        self._timestamp_id = int(cfg.timestamp_token_id)
        if tokenizer.timestamp_id != self._timestamp_id:
            raise ValueError(
                f"tokenizer's <timestamp> id {tokenizer.timestamp_id} differs from the model's timestamp_token_id "
                f"{self._timestamp_id}: the tokenizer files do not belong to this checkpoint"
            )

    @classmethod
    def from_pretrained(cls, id_or_dir: str | os.PathLike = DEFAULT_MODEL, dtype: str = "float32",
                        attention_impl: str = "auto", max_seconds: float = MAX_SECONDS) -> Aligner:
        """Load from a local checkpoint folder (either layout) or a hub id, downloaded when online."""
        path = resolve_model_path(id_or_dir)
        return cls(load(path, dtype=dtype, attention_impl=attention_impl), Tokenizer.from_dir(path), max_seconds)

    # -- inputs -------------------------------------------------------------------------------------------------
    def prompt_ids(self, units: Sequence[str], n_audio_tokens: int) -> tuple[list[int], np.ndarray]:
        """Aligner prompt ids for ``units`` and ``n_audio_tokens`` audio pads, and the <timestamp> positions."""
        tok = self.tokenizer
        ids = [tok.audio_start_id, *([tok.audio_pad_id] * int(n_audio_tokens)), tok.audio_end_id]
        for unit in units:
            ids += tok.encode(unit)
            ids += [self._timestamp_id, self._timestamp_id]
        ids_arr = np.asarray(ids)
        return ids, np.flatnonzero(ids_arr == self._timestamp_id).astype(np.int32)

    def _prepare(self, audio: Any, text: str, language: str, label: str) -> tuple[np.ndarray, list[str]]:
        if not isinstance(text, str):
            raise TypeError(f"{label}: text must be a str, got {type(text).__name__}")
        aligner_language(language)  # unsupported languages fail before any audio is read
        if not text.strip():
            raise ValueError(f"{label}: text is empty; pass the transcript of the audio")
        units = split_units(text, language)
        if not units:
            raise ValueError(
                f"{label}: text {text[:60]!r} has no alignable unit (no letters, digits or CJK characters are left "
                "once punctuation is removed)"
            )
        wave = load_audio(audio, name=label if not isinstance(audio, (str, os.PathLike)) else None)
        return wave, units

    def _item(self, wave: np.ndarray, units: list[str]) -> _Item:
        n_audio = audio_token_count(n_frames(wave.shape[0]), self.model.config.audio)
        ids, slots = self.prompt_ids(units, n_audio)
        return _Item(wave, units, ids, slots)

    # -- the forward pass ---------------------------------------------------------------------------------------
    def _batch_arrays(self, items: Sequence[_Item]):
        """Bucketed device inputs for items: (ids, feats, frames, token_mask, slots)."""
        batch = aligner_rows(len(items))
        waves = [it.wave for it in items] + [np.zeros(1, np.float32)] * (batch - len(items))  # padding rows
        max_frames = max(n_frames(w.shape[0]) for w in waves)
        feats, frames = log_mel_batch(waves, pad_to=frame_bucket(max_frames, self.model.config.audio))
        seq = length_bucket(max(len(it.ids) for it in items))
        n_slots = length_bucket(max(len(it.slots) for it in items))
        ids = np.zeros((batch, seq), np.int32)
        mask = np.zeros((batch, seq), bool)
        slots = np.zeros((batch, n_slots), np.int32)
        pad = self.tokenizer.audio_pad_id
        for row in range(batch):
            if row < len(items):
                it = items[row]
                ids[row, : len(it.ids)], mask[row, : len(it.ids)] = it.ids, True
                slots[row, : len(it.slots)] = it.slots
            else:  # a padding row: its pads must match its (0.5 s) audio's token count
                n_audio = audio_token_count(int(frames[row]), self.model.config.audio)
                ids[row, : n_audio], mask[row, : n_audio] = pad, True
        return ids, feats, frames, mask, slots

    def _logits(self, items: Sequence[_Item]) -> list[np.ndarray]:
        """Float32 class logits (2 * units, classes) at each item's <timestamp> positions, one batched call."""
        out = np.asarray(self.model.engine.score(*self._batch_arrays(items)))
        return [out[i, : len(it.slots)] for i, it in enumerate(items)]

    def _classes(self, items: Sequence[_Item]) -> list[np.ndarray]:
        out = np.asarray(self.model.engine.score(*self._batch_arrays(items), classes=True))  # (batch, n_slots)
        return [out[i, : len(it.slots)] for i, it in enumerate(items)]

    def _words(self, item: _Item, classes: np.ndarray, offset: float = 0.0) -> list[Word]:
        """Classes at the <timestamp> slots -> repaired, clamped words, shifted by ``offset`` seconds."""
        # Milliseconds in float32, as the reference computes them, before the repair truncates to integers.
        ms = fix_timestamps(classes.astype(np.float32) * np.float32(self._segment_ms))
        end_of_audio = math.floor(item.wave.shape[0] / SAMPLE_RATE * 1000) / 1000  # the last whole millisecond
        times = [min(round(t / 1000.0, 3), end_of_audio) for t in ms]  # monotonic map: order is kept
        return [
            Word(unit, round(offset + times[2 * k], 3), round(offset + times[2 * k + 1], 3))
            for k, unit in enumerate(item.units)
        ]

    # -- the public API -----------------------------------------------------------------------------------------
    def align(self, audio: Any, text: str, language: str, *, split: bool = False) -> list[Word]:
        """Word timestamps of ``text`` spoken in ``audio`` (path, (samples, rate) or 16 kHz array).

        ``language`` is one of the aligner's 11 languages (name or ISO code). Audio over ``max_seconds`` raises
        unless ``split=True``, which aligns it window by window (approximate at window joins; see ``_align_long``).
        """
        return self.align_batch([audio], [text], [language], split=split)[0]

    def align_batch(self, audios: Sequence[Any], texts: Sequence[str], languages: str | Sequence[str], *,
                    split: bool = False, batch_size: int = 8) -> list[list[Word]]:
        """``align`` for many clips, up to ``batch_size`` per jitted call: clips sorted by length, and a batch
        never mixes clips more than 2x apart in padded length (padding would cost more than the extra call)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of transcripts, one per audio; for one clip use align()")
        if isinstance(languages, str):
            languages = [languages] * len(audios)
        if not (len(audios) == len(texts) == len(languages)):
            raise ValueError(f"got {len(audios)} audios, {len(texts)} texts and {len(languages)} languages; "
                             "pass one text and one language per audio (or one language for all)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        results: list[list[Word] | None] = [None] * len(audios)
        short: list[tuple[int, _Item]] = []
        for i, (audio, text, lang) in enumerate(zip(audios, texts, languages)):
            label = f"input #{i}" if len(audios) > 1 else "input"
            wave, units = self._prepare(audio, text, lang, label)
            seconds = wave.shape[0] / SAMPLE_RATE
            if seconds <= self.max_seconds:
                short.append((i, self._item(wave, units)))
            elif split:
                results[i] = self._align_long(wave, units)
            else:
                raise ValueError(
                    f"{label}: audio is {seconds:.1f} s long; the aligner takes at most {self.max_seconds:g} s in one "
                    "pass. Pass split=True (CLI: --split) to align it in windows, or cut it into shorter pieces "
                    "with their own transcripts"
                )
        short.sort(key=lambda pair: (pair[1].wave.shape[0], len(pair[1].ids)))  # similar shapes share a batch
        audio_cfg = self.model.config.audio
        for group in _similar_groups(short, batch_size,
                                     lambda pair: frame_bucket(n_frames(pair[1].wave.shape[0]), audio_cfg)):
            for (i, item), classes in zip(group, self._classes([it for _, it in group])):
                results[i] = self._words(item, classes)
        return results  # type: ignore[return-value]

    def _align_long(self, wave: np.ndarray, units: list[str]) -> list[Word]:
        """Audio over ``max_seconds``: align window by window, each window starting where the last sure unit ended.

        A window runs from ``start`` to the quietest point before ``start + max_seconds`` and gets the remaining
        units in proportion to its share of the remaining audio (plus 25% and 2 units of slack). Units ending
        within SPLIT_GUARD_SECONDS of the window's end are given again to the next window. This is a heuristic
        (the official toolkit only aligns pieces with their own transcripts): times near window joins can be off.
        """
        from qasr_jax.decoding.longform import split_long_audio

        words: list[Word] = []
        start, i = 0, 0  # first sample of the window; first unit not yet placed
        limit = int(self.max_seconds * SAMPLE_RATE)
        while i < len(units):
            rest = wave[start:]
            if rest.shape[0] <= limit:
                item = self._item(rest if rest.shape[0] else np.zeros(1, np.float32), units[i:])
                words += self._words(item, self._classes([item])[0], start / SAMPLE_RATE)
                break
            piece = split_long_audio(rest, self.max_seconds, search_seconds=min(10.0, self.max_seconds / 4))[0]
            dur = piece.duration
            share = dur / (rest.shape[0] / SAMPLE_RATE)
            n = min(len(units) - i, math.ceil((len(units) - i) * share * 1.25) + 2)
            item = self._item(piece.samples, units[i : i + n])
            placed = self._words(item, self._classes([item])[0])
            sure = [w for w in placed if w.end <= dur - min(SPLIT_GUARD_SECONDS, dur / 4)]
            sure = sure[: len(placed) - 1] if len(sure) == len(placed) and i + n < len(units) else sure
            if not sure:  # nothing certain here (silence, music): move on, keeping the guard zone
                start += max(1, round((dur - min(SPLIT_GUARD_SECONDS, dur / 4)) * SAMPLE_RATE))
                continue
            offset = start / SAMPLE_RATE
            words += [Word(w.text, round(w.start + offset, 3), round(w.end + offset, 3)) for w in sure]
            i += len(sure)
            start += max(1, round(sure[-1].end * SAMPLE_RATE))
        return words
