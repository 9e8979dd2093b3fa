"""Transcription: audio in, language and text out, for one file or ten thousand.

Inputs are read and checked first (a bad one is reported without losing the others; silence is valid and gives
an empty transcript), long ones are cut into pieces, and the pieces go through a
``qasr_jax.decoding.pipeline.Pipeline``: encoded in batches, decoded in the engine's slots, each slot refilled as soon
as its piece ends. Feature frames, prompt width, output buffer and slots are padded to buckets, so a new input length
compiles nothing. Each result carries its tokens' log-probabilities and says when a piece stopped at ``max_new_tokens``.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from qasr_jax.decoding import hotwords as hw
from qasr_jax.decoding import language as lang_probs
from qasr_jax.decoding.longform import Piece, split_long_audio
from qasr_jax.decoding.request import prepare
from qasr_jax.decoding.pipeline import DecodeOptions, Pipeline, Work, token_budget, token_limit
from qasr_jax.io.audio import SAMPLE_RATE, AudioError, load_audio
from qasr_jax.io.hub import resolve_model_path
from qasr_jax.io.progress import audio_progress
from qasr_jax.io.prompts import parse_output, supported_languages
from qasr_jax.io.results import Result, Segment, compression_ratio, join_texts, majority_language, rounded_logprob
from qasr_jax.io.tokenizer import IncrementalDecoder, Tokenizer
from qasr_jax.io.units import unit_spans
from qasr_jax.loading import Model, load
from qasr_jax.modeling.config import DEFAULT_MODEL, MAX_AUDIO_SECONDS
from qasr_jax.vad.network import speech_probabilities
from qasr_jax.vad.rules import speech_pieces

ALIGN_PIECE_SECONDS = 180.0  # piece length when word timestamps are asked for (the official toolkit's choice)


@dataclasses.dataclass
class _Part:
    """One decoded piece of an input."""

    piece: Piece
    language: str | None
    text: str
    token_ids: list[int]
    token_logprobs: list[float]
    truncated: bool
    looped: bool = False


def _source_name(item: Any, i: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    return f"array input #{i}"


def _as_list(x, n: int, name: str) -> list:
    if isinstance(x, (list, tuple)):
        if len(x) != n:
            raise ValueError(f"{name} has {len(x)} entries for {n} inputs; pass one per input or a single value")
        return list(x)
    return [x] * n


def word_logprobs(tok: Tokenizer, part: _Part, words: list[str]) -> list[float | None]:
    """The mean log-probability of the generated tokens that spell each aligned word of a piece (None where a word
    cannot be found in the transcript)."""
    ids, logprobs = part.token_ids, part.token_logprobs
    start = ids.index(tok.asr_text_id) + 1 if tok.asr_text_id in ids else 0  # the transcript after the header
    decoder = IncrementalDecoder(tok)
    text, ends = "", []
    for i in ids[start:]:
        text += decoder.push([i])
        ends.append(len(text))  # a character split over tokens belongs to the token that completes it
    begins = [0] + ends[:-1]
    out: list[float | None] = []
    for span in unit_spans(text, words):
        hit = [] if span is None else [logprobs[start + t] for t, (b, e) in enumerate(zip(begins, ends))
                                       if b < span[1] and e > span[0]]
        out.append(rounded_logprob(float(np.mean(hit))) if hit else None)
    return out


def _hotword_lists(hotwords, n: int) -> list[list[str]]:
    """One list of hotwords per input from None, a list of words (for all) or a list of lists (one per input); blank
    words are dropped by ``prepare``."""
    if hotwords is None:
        return [[] for _ in range(n)]
    if isinstance(hotwords, str):
        raise TypeError("hotwords must be a list of words (or one list per input), not a string; "
                        "e.g. hotwords=['Qwen', 'Pallas']")
    items = list(hotwords)
    if items and all(isinstance(x, (list, tuple)) for x in items):
        if len(items) != n:
            raise ValueError(f"hotwords has {len(items)} lists for {n} inputs; pass one list per input or one list")
        return [list(x) for x in items]
    return [items] * n


@dataclasses.dataclass(frozen=True)
class Fallback:
    """Whisper's rule for a piece whose output looks hallucinated (its text's compression ratio over
    ``compression_ratio_threshold``, its mean token log-probability under ``logprob_threshold``, or stopped in a
    loop): decode it again with ``repetition_penalty``, then with ``beam_size`` beams, and keep the first decode
    that passes (a loop is often confident: the most probable is not the best), else the last.

    Whisper's no-speech test comes first: a decode under ``logprob_threshold`` of a piece whose no-speech
    probability (1 - the highest Silero VAD speech probability of its 32 ms frames) is over
    ``no_speech_threshold`` is silence: its text is dropped and it is not decoded again (None: no such test)."""

    compression_ratio_threshold: float = 2.4
    logprob_threshold: float = -1.0
    no_speech_threshold: float | None = 0.6
    repetition_penalty: float = 1.2
    beam_size: int = 4

    def stages(self, options: DecodeOptions) -> list[DecodeOptions]:
        """The decode options tried in turn: the caller's, then with the penalty, then with the beams."""
        penalty = dataclasses.replace(options, repetition_penalty=self.repetition_penalty)
        return [options, penalty, dataclasses.replace(penalty, beam_size=self.beam_size)]

    def unsure(self, part: _Part) -> bool:
        """Whether a decoded piece's mean token log-probability is under ``logprob_threshold``."""
        return bool(part.token_logprobs) and float(np.mean(part.token_logprobs)) < self.logprob_threshold

    def rejects(self, part: _Part) -> bool:
        """Whether a decoded piece looks hallucinated (see the class doc)."""
        return part.looped or compression_ratio(part.text) > self.compression_ratio_threshold or self.unsure(part)

    def silent(self, part: _Part, no_speech: Callable[[], float]) -> bool:
        """Whisper's no-speech test (see the class doc); ``no_speech()``, the piece's no-speech probability, is
        asked only after an unsure decode."""
        return self.no_speech_threshold is not None and self.unsure(part) and no_speech() > self.no_speech_threshold


class Transcriber:
    """Batched, jit-compiled Qwen3-ASR transcription (greedy or beam search), with optional word timestamps."""

    def __init__(self, model: Model, tokenizer: Tokenizer, aligner=None):
        if model.config.is_aligner:
            raise ValueError("this checkpoint is a forced aligner; pass it as aligner=, and an ASR model as the model")
        self.model = model
        self.tokenizer = tokenizer
        self.aligner = aligner
        self.languages = supported_languages(model.config.support_languages)

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, dtype: str = "float32", aligner=None,
                        attention_impl: str = "auto", mesh=None, sharding=None, quantize: str | None = None,
                        layers: str = "auto") -> "Transcriber":
        """Load from a local folder or a hub id ("Qwen/Qwen3-ASR-0.6B"); ``aligner`` is an Aligner or its path.

        ``mesh`` ("data=4,model=2" or a ``jax.sharding.Mesh``) spreads the model and each batch over devices;
        ``sharding`` picks the preset ("data", "tensor", "fsdp"; see ``qasr_jax.modeling.sharding``). Token ids are the
        same as on one device; ``batch_size`` is then the global batch (a multiple of the data axis keeps every
        device busy). ``layers`` ("auto", "scan", "unrolled"): how the decoder's layers run (``qasr_jax.load``).
        """
        path = resolve_model_path(model)
        if aligner is not None and not hasattr(aligner, "align_batch"):
            from qasr_jax.aligner import Aligner

            aligner = Aligner.from_pretrained(aligner, dtype=dtype)
        model = load(path, dtype=dtype, attention_impl=attention_impl, mesh=mesh, sharding=sharding, quantize=quantize,
                     layers=layers)
        return cls(model, Tokenizer.from_dir(path), aligner)

    # ------------------------------------------------------------------------------------------------------
    def stream(self, language=None, context="", chunk_seconds: float = 2.0, unfixed_chunks: int | None = None,
               unfixed_tokens: int = 5, max_new_tokens: int = 32, hotwords=None,
               hotword_boost: float = hw.DEFAULT_BOOST, hotwords_in_context: bool = False, vad: bool = False):
        """A live stream (``qasr_jax.streaming.driver.Stream``): ``feed()`` 16 kHz audio as it comes, read each Partial,
        ``finish()`` for the Result. ``hotwords``, ``hotword_boost`` and ``hotwords_in_context`` as in
        ``transcribe`` (one list of words); ``vad=True`` ends segments at pauses Silero VAD finds instead of at a
        quiet tail. For many streams stepped together use ``stream_driver``."""
        from qasr_jax.streaming.driver import shared_driver

        request = prepare(self.tokenizer, self.languages, language, context, hotwords, hotword_boost,
                          hotwords_in_context)
        driver = shared_driver(self, max_new_tokens, request.hotword_edges)
        return driver.open(request, chunk_seconds, unfixed_chunks, unfixed_tokens, max_new_tokens, vad)

    def stream_driver(self, slots: int = 8, **options):
        """A ``qasr_jax.streaming.driver.StreamDriver``: up to ``slots`` streams advanced in one step
        (``driver.stream()``, ``driver.feed({stream: samples, ...})``); options: ``segment_seconds``, ``max_new_tokens``,
        ``context_tokens``, ``hotword_edges`` (room for the streams' hotword tries, see ``hotwords.edge_bucket``)."""
        from qasr_jax.streaming.driver import StreamDriver

        return StreamDriver(self.model, self.tokenizer, slots, **options)

    def transcribe(self, audio, language=None, context="", beam_size: int = 1, max_new_tokens=None,
                   batch_size: int = 8, **kwargs) -> list[Result]:
        """Transcribe one input or a list (paths, ``(samples, rate)`` tuples, 16 kHz arrays) -> one Result each.

        ``language`` (None = detect; a name or ISO code, or one per input) forces the output language; ``context``
        (text or one per input) biases towards names and terms. ``max_new_tokens`` (one for all, or one per input)
        caps each piece's output; None: a budget that grows with the piece's duration
        (``qasr_jax.decoding.pipeline.token_budget``). ``batch_size`` is the number of decode slots: a piece that
        finishes frees its slot for the next at once. ``hotwords`` (a list of words and names for every input, or one
        list per input) biases the search towards them by ``hotword_boost`` per matched token (see
        ``qasr_jax.decoding.hotwords``); ``hotwords_in_context=True`` also adds them to the context the model reads
        (off by default: on the trained tiny-en model it raised the WER of clips it had right from 0 to 20%).
        ``language_probabilities=True`` also fills ``Result.language_probability`` and ``language_probabilities``
        for detected languages (``qasr_jax.decoding.language``). ``stop_loops=True`` stops a greedy piece whose output
        ends in a pattern repeated 20 times (``Result.repetition_stopped``); ``fallback=Fallback()`` decodes a
        piece that looks hallucinated again (see ``Fallback``). Other options: ``return_timestamps``,
        ``length_penalty``, ``repetition_penalty``, ``no_repeat_ngram_size``, ``max_audio_seconds`` (longer
        inputs are cut into pieces), ``errors`` ("raise": stop on the first bad input before any work;
        "collect": report it in ``Result.error`` and go on), ``progress``.
        """
        results: list[Result | None] = [None] * len(self._inputs(audio))
        for i, r in self.transcribe_iter(audio, language, context, beam_size, max_new_tokens, batch_size, **kwargs):
            results[i] = r
        return results  # type: ignore[return-value]

    def detect_language(self, audio, context="", batch_size: int = 8, max_seconds: float = lang_probs.MAX_SECONDS,
                        kv_bytes: int = lang_probs.DEFAULT_KV_BYTES):
        """Language probabilities of one input (or a list; ``context`` one or one per input): name -> probability
        over the model's languages, most probable first, from the first ``max_seconds``; no transcript is decoded.
        ``kv_bytes``: the KV cache the languages are scored in, at most (more scores more of them at once)."""
        waves, one = lang_probs.load_waves(audio)
        dists, _ = lang_probs.language_distributions(self.model, self.tokenizer, waves,
                                                     _as_list(context, len(waves), "context"), batch_size, max_seconds,
                                                     kv_bytes)
        return dists[0] if one else dists

    @staticmethod
    def _inputs(audio) -> list:
        if isinstance(audio, (str, os.PathLike, tuple, np.ndarray)):
            return [audio]
        return list(audio)

    def transcribe_iter(self, audio, language=None, context="", beam_size: int = 1, max_new_tokens=None,
                        batch_size: int = 8, *, return_timestamps: bool = False, length_penalty: float = 1.0,
                        repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                        max_audio_seconds: float = MAX_AUDIO_SECONDS, errors: str = "raise",
                        progress: bool = False, suppress_eos: bool = False, hotwords=None,
                        hotword_boost: float = hw.DEFAULT_BOOST,
                        hotwords_in_context: bool = False, vad: bool = False, vad_max_seconds: float = 30.0,
                        language_probabilities: bool = False, stop_loops: bool = False,
                        fallback: Fallback | None = None) -> Iterator[tuple[int, Result]]:
        """Like ``transcribe`` but yields ``(input index, Result)`` as soon as each input is done.

        ``suppress_eos=True`` makes every piece run to its ``max_new_tokens`` (for benchmarks). ``vad=True`` decodes
        only speech (Silero VAD, ``qasr_jax.vad.network``): neighbouring speech merged into pieces of at most
        ``vad_max_seconds``, one Segment each; silence and noise alone give empty text.
        """
        inputs = self._inputs(audio)
        n = len(inputs)
        if n == 0:
            raise ValueError("no audio given; pass a file path, an array or a list of them")
        if errors not in ("raise", "collect"):
            raise ValueError(f"errors must be 'raise' or 'collect', got {errors!r}")
        if beam_size < 1 or batch_size < 1:
            raise ValueError(f"beam_size and batch_size must be >= 1, got {beam_size} and {batch_size}")
        limit = token_limit(self.model.config)
        budgets = _as_list(max_new_tokens, n, "max_new_tokens")
        for b in budgets:
            if b is not None and not 1 <= b <= limit:
                raise ValueError(f"max_new_tokens={b} is outside 1..{limit} (the KV cache limit); "
                                 "lower it, or cut the audio shorter with max_audio_seconds")
        if return_timestamps and self.aligner is None:
            raise ValueError("return_timestamps=True needs a forced aligner: Transcriber.from_pretrained(..., aligner=...)")
        asked = zip(_as_list(language, n, "language"), _as_list(context, n, "context"), _hotword_lists(hotwords, n))
        requests = [prepare(self.tokenizer, self.languages, lang, ctx, words, hotword_boost, hotwords_in_context,
                            "context" + (f" of input #{i}" if n > 1 else ""))  # before any audio is read
                    for i, (lang, ctx, words) in enumerate(asked)]
        langs, contexts = [r.language for r in requests], [r.context for r in requests]
        if return_timestamps:  # the aligner takes pieces of at most ALIGN_PIECE_SECONDS, as the official toolkit
            max_audio_seconds = min(max_audio_seconds, ALIGN_PIECE_SECONDS)

        options = DecodeOptions.for_tokenizer(
            self.tokenizer, beam_size=beam_size, length_penalty=length_penalty, repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size, suppress_eos=suppress_eos, stop_loops=stop_loops)
        stages = [options] if fallback is None else fallback.stages(options)
        pipes = [Pipeline(self.model, self.tokenizer, o, batch_size) for o in stages]
        results = [Result(_source_name(x, i)) for i, x in enumerate(inputs)]
        pieces: dict[int, dict[int, Piece]] = collections.defaultdict(dict)
        waves: dict[int, np.ndarray] = {}
        for i, item in enumerate(inputs):
            try:
                waves[i] = load_audio(item, name=results[i].source)
            except AudioError as e:
                if errors == "raise":
                    raise
                results[i].error = str(e)
                continue
            results[i].duration = waves[i].shape[0] / SAMPLE_RATE
            if not np.any(waves[i]):  # digital silence: nothing was said
                del waves[i]
        cuts = (speech_pieces(list(waves.values()), min(vad_max_seconds, max_audio_seconds)) if vad and waves else
                [split_long_audio(w, max_audio_seconds) for w in waves.values()])
        for i, cut in zip(waves, cuts):
            for p, piece in enumerate(cut):
                pieces[i][p] = piece
                budget = budgets[i] or token_budget(piece.duration, limit)
                pipes[0].submit(Work((i, p), piece.samples, budget, requests[i]))
        detect = [i for i in pieces if langs[i] is None] if language_probabilities else []
        found, _ = lang_probs.language_distributions(self.model, self.tokenizer, [pieces[i][0].samples for i in detect],
                                                     [contexts[i] for i in detect], batch_size)
        detected = dict(zip(detect, found))
        for i in range(n):  # bad and silent inputs first: they are done
            if results[i].error is not None or i not in pieces:
                yield i, results[i]

        parts: dict[int, dict[int, _Part]] = collections.defaultdict(dict)
        heard: dict[tuple[int, int], float] = {}  # a piece's no-speech probability: one VAD pass, when first asked

        def no_speech(key: tuple[int, int]) -> float:
            if key not in heard:
                i, p = key
                heard[key] = 1.0 - float(np.max(speech_probabilities(pieces[i][p].samples), initial=0.0))
            return heard[key]

        bar = audio_progress(sum(p.samples.shape[0] for ps in pieces.values() for p in ps.values()), SAMPLE_RATE,
                             progress)
        while any(q.busy for q in pipes):
            done = [(stage, work, out) for stage, q in enumerate(pipes) if q.busy for work, out in q.step()]
            for stage, work, out in done:
                i, p = work.key
                piece = pieces[i][p]
                part = self.decoded(piece, out, langs[i])
                if fallback is not None and fallback.silent(part, lambda: no_speech(work.key)):  # nothing said:
                    part = dataclasses.replace(part, text="", token_ids=[], token_logprobs=[], truncated=False,
                                               looped=False)  # no text, no second try
                elif stage + 1 < len(pipes) and fallback.rejects(part):  # decode it again, with the next stage
                    pipes[stage + 1].submit(work)
                    continue
                parts[i][p] = part
                bar.update(piece.samples.shape[0])
                if len(parts[i]) == len(pieces[i]):
                    self.finish(results[i], parts.pop(i), return_timestamps)
                    lang_probs.attach(results[i], detected.get(i))
                    yield i, results[i]
        bar.close()

    def decoded(self, piece: Piece, out, language: str | None) -> _Part:
        """A piece's decoder ``Output`` (``qasr_jax.decoding.slots.Output``) read as language and text; ``language``
        is the forced one (canonical name) or None."""
        lang, text = parse_output(out.token_ids, self.tokenizer, language=language, supported=self.languages)
        return _Part(piece, lang or language, text, out.token_ids, out.token_logprobs,
                     not out.finished and not out.looped, out.looped)

    def finish(self, result: Result, parts: dict[int, _Part], return_timestamps: bool) -> None:
        """Fill ``result`` from its decoded pieces (``decoded``, keyed by piece order): language, text, tokens,
        segments, and with ``return_timestamps`` the aligner's words."""
        order = [parts[k] for k in sorted(parts)]
        result.language = majority_language([p.language for p in order])
        result.text = join_texts([p.text for p in order], result.language)
        result.token_ids = [t for p in order for t in p.token_ids]
        result.token_logprobs = [x for p in order for x in p.token_logprobs]
        result.truncated = any(p.truncated for p in order)
        result.repetition_stopped = any(p.looped for p in order)
        result.segments = [Segment(round(p.piece.offset, 3), round(p.piece.offset + p.piece.duration, 3),
                                   p.text.strip()) for p in order if p.text.strip()]
        if return_timestamps:
            self._align(result, order)

    def _align(self, result: Result, order: list[_Part]) -> None:
        spoken = [p for p in order if p.text.strip()]
        try:
            per_piece = self.aligner.align_batch([p.piece.samples for p in spoken], [p.text for p in spoken],
                                                 [p.language or result.language for p in spoken])
        except ValueError as e:  # e.g. a language the aligner does not cover: keep the transcript
            result.error = f"{result.source}: timestamps unavailable: {e}"
            return
        result.words = []
        for part, words in zip(spoken, per_piece):
            scores = word_logprobs(self.tokenizer, part, [w.text for w in words])
            off = part.piece.offset
            result.words += [dataclasses.replace(w, start=round(w.start + off, 3), end=round(w.end + off, 3),
                                                 logprob=score) for w, score in zip(words, scores)]


def detect_language(audio, model: Any = DEFAULT_MODEL, context: str = "", batch_size: int = 8,
                    max_seconds: float = lang_probs.MAX_SECONDS) -> dict[str, float] | list[dict[str, float]]:
    """Language probabilities of one input (or a list): name -> probability over the model's languages, most
    probable first; ``model`` is a ``Transcriber``, a local folder or a hub id."""
    if not hasattr(model, "detect_language"):
        model = Transcriber.from_pretrained(model)
    return model.detect_language(audio, context=context, batch_size=batch_size, max_seconds=max_seconds)
