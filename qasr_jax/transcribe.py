"""Transcription: audio in, language and text out, for one file or ten thousand.

Inputs are read and checked first (a bad one is reported without losing the others), long ones are cut into
pieces, pieces are sorted by length and batched; each batch runs the encoder once, then one jitted
prefill + decode loop. Batch size, feature frames, prompt length and the output buffer are padded to buckets,
so a new input length inside a bucket compiles nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from qasr_jax.audio import SAMPLE_RATE, AudioError, load_audio, log_mel_batch, n_frames
from qasr_jax.buckets import batch_rows, cache_length, frame_bucket, prompt_width
from qasr_jax.config import audio_token_count
from qasr_jax.hub import resolve_model_path
from qasr_jax.loading import Model, load
from qasr_jax.longform import Piece, split_long_audio
from qasr_jax.prompts import build_prompt_ids, normalize_language, parse_output, supported_languages
from qasr_jax.tokenizer import Tokenizer

_CJK_JOIN = {"Chinese", "Cantonese", "Japanese"}
ALIGN_PIECE_SECONDS = 180.0  # piece length when word timestamps are asked for (the official toolkit's choice)


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

    def to_dict(self) -> dict:
        """A JSON-ready dict (file, language, text, token_ids, duration, segments, words, error)."""
        d = {"file": self.source, "language": self.language, "text": self.text, "token_ids": self.token_ids,
             "duration": round(self.duration, 3), "segments": [dataclasses.asdict(s) for s in self.segments]}
        if self.words is not None:
            d["words"] = [dataclasses.asdict(w) for w in self.words]
        if self.error is not None:
            d["error"] = self.error
        return d


@dataclasses.dataclass
class _Work:
    index: int  # input index
    piece: int  # piece index within the input
    samples: np.ndarray
    offset: float


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


def _join(texts: list[str], language: str | None) -> str:
    texts = [t.strip() for t in texts if t.strip()]
    return ("" if language in _CJK_JOIN else " ").join(texts)


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
                        attention_impl: str = "auto", mesh=None, sharding=None, quantize: str | None = None
                        ) -> "Transcriber":
        """Load from a local folder or a hub id ("Qwen/Qwen3-ASR-0.6B"); ``aligner`` is an Aligner or its path.

        ``mesh`` ("data=4,model=2" or a ``jax.sharding.Mesh``) spreads the model and each batch over devices;
        ``sharding`` picks the preset ("data", "tensor", "fsdp"; see ``qasr_jax.sharding``). Token ids are the
        same as on one device; ``batch_size`` is then the global batch (a multiple of the data axis keeps every
        device busy).
        """
        path = resolve_model_path(model)
        if aligner is not None and not hasattr(aligner, "align_batch"):
            from qasr_jax.aligner import Aligner

            aligner = Aligner.from_pretrained(aligner, dtype=dtype)
        model = load(path, dtype=dtype, attention_impl=attention_impl, mesh=mesh, sharding=sharding, quantize=quantize)
        return cls(model, Tokenizer.from_dir(path), aligner)

    # ------------------------------------------------------------------------------------------------------
    def transcribe(self, audio, language=None, context="", beam_size: int = 1, max_new_tokens: int = 448,
                   batch_size: int = 8, **kwargs) -> list[Result]:
        """Transcribe one input or a list (paths, ``(samples, rate)`` tuples, 16 kHz arrays) -> one Result each.

        ``language`` (None = detect; a name or ISO code, or one per input) forces the output language; ``context``
        (text or one per input) biases towards names and terms. Other options: ``return_timestamps``,
        ``length_penalty``, ``repetition_penalty``, ``no_repeat_ngram_size``, ``max_audio_seconds`` (longer
        inputs are cut into pieces), ``errors`` ("raise": stop on the first bad input before any work;
        "collect": report it in ``Result.error`` and go on), ``progress``.
        """
        results: list[Result | None] = [None] * len(self._inputs(audio))
        for i, r in self.transcribe_iter(audio, language, context, beam_size, max_new_tokens, batch_size, **kwargs):
            results[i] = r
        return results  # type: ignore[return-value]

    @staticmethod
    def _inputs(audio) -> list:
        if isinstance(audio, (str, os.PathLike, tuple, np.ndarray)):
            return [audio]
        return list(audio)

    def transcribe_iter(self, audio, language=None, context="", beam_size: int = 1, max_new_tokens: int = 448,
                        batch_size: int = 8, *, return_timestamps: bool = False, length_penalty: float = 1.0,
                        repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                        max_audio_seconds: float = 1200.0, errors: str = "raise",
                        progress: bool = False, suppress_eos: bool = False) -> Iterator[tuple[int, Result]]:
        """Like ``transcribe`` but yields ``(input index, Result)`` as soon as each input is done.

        ``suppress_eos=True`` makes every input run to ``max_new_tokens`` (for benchmarks).
        """
        inputs = self._inputs(audio)
        n = len(inputs)
        if n == 0:
            raise ValueError("no audio given; pass a file path, an array or a list of them")
        if errors not in ("raise", "collect"):
            raise ValueError(f"errors must be 'raise' or 'collect', got {errors!r}")
        if beam_size < 1 or batch_size < 1:
            raise ValueError(f"beam_size and batch_size must be >= 1, got {beam_size} and {batch_size}")
        limit = self.model.config.text.max_position_embeddings // 2
        if not 1 <= max_new_tokens <= limit:
            raise ValueError(f"max_new_tokens={max_new_tokens} is outside 1..{limit} (the KV cache limit); "
                             "lower it, or cut the audio shorter with max_audio_seconds")
        if return_timestamps and self.aligner is None:
            raise ValueError("return_timestamps=True needs a forced aligner: Transcriber.from_pretrained(..., aligner=...)")
        langs = [None if l is None else normalize_language(l, self.languages) for l in _as_list(language, n, "language")]
        contexts = [c or "" for c in _as_list(context, n, "context")]

        results = [Result(_source_name(x, i)) for i, x in enumerate(inputs)]
        work: list[_Work] = []
        pending = collections.Counter()
        for i, item in enumerate(inputs):
            try:
                wave = load_audio(item, name=results[i].source)
                if not np.any(wave):
                    raise AudioError(f"{results[i].source}: audio is silent (every sample is zero); nothing to transcribe")
            except AudioError as e:
                if errors == "raise":
                    raise
                results[i].error = str(e)
                continue
            results[i].duration = wave.shape[0] / SAMPLE_RATE
            if return_timestamps:  # the aligner takes pieces of at most ALIGN_PIECE_SECONDS, as the official toolkit
                max_audio_seconds = min(max_audio_seconds, ALIGN_PIECE_SECONDS)
            for p, piece in enumerate(split_long_audio(wave, max_audio_seconds)):
                work.append(_Work(i, p, piece.samples, piece.offset))
                pending[i] += 1
        for i in range(n):  # bad inputs first: they are done
            if results[i].error is not None:
                yield i, results[i]

        search = dict(max_new_tokens=max_new_tokens, beam_size=beam_size, length_penalty=length_penalty,
                      repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                      suppress_eos=suppress_eos, eos_ids=self.tokenizer.eos_ids)
        pieces: dict[int, dict[int, tuple[Piece, str | None, str, list[int]]]] = collections.defaultdict(dict)
        work.sort(key=lambda w: -w.samples.shape[0])
        bar = _progress(sum(w.samples.shape[0] for w in work) / SAMPLE_RATE, progress)
        for start in range(0, len(work), batch_size):
            batch = work[start:start + batch_size]
            outs = self._run_batch(batch, langs, contexts, batch_size, search)
            for w, ids in zip(batch, outs):
                lang, text = parse_output(ids, self.tokenizer, language=langs[w.index], supported=self.languages)
                pieces[w.index][w.piece] = (Piece(w.samples, w.offset), lang or langs[w.index], text, ids)
                pending[w.index] -= 1
                if pending[w.index] == 0:
                    self._finish(results[w.index], pieces.pop(w.index), return_timestamps)
                    yield w.index, results[w.index]
            bar.update(sum(w.samples.shape[0] for w in batch) / SAMPLE_RATE)
        bar.close()

    # ------------------------------------------------------------------------------------------------------
    def _run_batch(self, batch: Sequence[_Work], langs, contexts, batch_size, search: dict) -> list[list[int]]:
        """Encode, prompt and decode one batch of pieces; ``search`` holds the search options."""
        from qasr_jax import search as S

        cfg = self.model.config
        engine = self.model.engine
        rows = batch_rows(len(batch), batch_size, self.model.data_size)
        waves = [w.samples for w in batch] + [batch[-1].samples] * (rows - len(batch))
        longest = max(n_frames(w.shape[0]) for w in waves)
        frames = frame_bucket(longest, cfg.audio)
        feats, valid_frames = log_mel_batch(waves, pad_to=frames)
        audio, n_tok = engine.encode(feats, valid_frames)
        n_tok = np.asarray(n_tok)  # one transfer; rows may live on different devices
        prompts = []
        for r in range(rows):
            w = batch[min(r, len(batch) - 1)]
            prompts.append(build_prompt_ids(self.tokenizer, int(n_tok[r]), contexts[w.index], langs[w.index]))
        capacity = audio_token_count(frames, cfg.audio)
        overhead = max(len(p) - int(n_tok[r]) for r, p in enumerate(prompts))
        seq = prompt_width(capacity + overhead)
        ids = np.zeros((rows, seq), np.int32)
        for r, p in enumerate(prompts):
            ids[r, : len(p)] = p
        lengths = np.array([len(p) for p in prompts], np.int32)
        embeds = engine.embed(ids, audio)
        settings = S.SearchSettings.make(search["eos_ids"], search["length_penalty"], search["repetition_penalty"],
                                         suppress_eos=search["suppress_eos"])
        scfg = S.SearchConfig(search["beam_size"], search["repetition_penalty"] != 1.0,
                              search["no_repeat_ngram_size"])
        max_new = search["max_new_tokens"]
        out = engine.generate(embeds, lengths, np.full(rows, max_new, np.int32), settings, scfg,
                              max_len=cache_length(seq, max_new), prompt_ids=ids)
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        return [tokens[r, : lengths[r]].tolist() for r in range(len(batch))]

    def _finish(self, result: Result, parts: dict, return_timestamps: bool) -> None:
        order = [parts[k] for k in sorted(parts)]
        langs = [lang for _, lang, _, _ in order if lang]
        result.language = collections.Counter(langs).most_common(1)[0][0] if langs else None
        result.text = _join([text for _, _, text, _ in order], result.language)
        result.token_ids = [t for _, _, _, ids in order for t in ids]
        result.segments = [Segment(round(p.offset, 3), round(p.offset + p.duration, 3), text.strip())
                           for p, _, text, _ in order if text.strip()]
        if return_timestamps:
            self._align(result, order)

    def _align(self, result: Result, order) -> None:
        spoken = [(piece, lang, text) for piece, lang, text, _ in order if text.strip()]
        try:
            per_piece = self.aligner.align_batch([p.samples for p, _, _ in spoken], [t for _, _, t in spoken],
                                                 [lang or result.language for _, lang, _ in spoken])
        except ValueError as e:  # e.g. a language the aligner does not cover: keep the transcript
            result.error = f"{result.source}: timestamps unavailable: {e}"
            return
        result.words = [
            dataclasses.replace(w, start=round(w.start + piece.offset, 3), end=round(w.end + piece.offset, 3))
            for (piece, _, _), words in zip(spoken, per_piece) for w in words
        ]


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


class _AudioHoursBar:
    """A tqdm bar over audio hours, showing throughput as audio hours per wall-clock hour."""

    def __init__(self, total_seconds: float):
        import time

        from tqdm import tqdm

        self._clock = time.perf_counter
        self._start = self._clock()
        self._done = 0.0
        self._bar = tqdm(total=round(total_seconds / 3600, 3), unit="audio-h", desc="transcribing",
                         bar_format="{l_bar}{bar}| {n:.3f}/{total:.3f} audio-h [{elapsed}<{remaining}{postfix}]")

    def update(self, seconds: float) -> None:
        self._done += seconds
        self._bar.update(round(seconds / 3600, 6))
        wall = max(self._clock() - self._start, 1e-9)
        self._bar.set_postfix_str(f"{self._done / wall:.1f} audio-h/h")

    def close(self) -> None:
        self._bar.close()


def _progress(total_seconds: float, enabled: bool):
    return _AudioHoursBar(total_seconds) if enabled else _NoBar()
