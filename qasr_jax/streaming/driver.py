"""Live transcription: Qwen's streaming algorithm, exact, at a flat cost per chunk, many streams in one step.

The algorithm is the official toolkit's (qwen-asr 0.0.6 ``init_streaming_state`` / ``streaming_transcribe`` /
``finish_streaming_transcribe``, which run there on vLLM, one stream at a time). Audio is buffered; each time
``chunk_seconds`` are complete, the model reads *all* audio so far under the prompt ``prompt_raw + prefix`` and
decodes greedily, at most ``max_new_tokens``. The prefix is empty for the first ``unfixed_chunks`` chunks; after
that it is the previous raw output (prefix + generated text, ``language X<asr_text>`` included unless the language
is forced) encoded, cut by its last ``unfixed_tokens`` tokens, decoded, and cut by one more token while it holds a
split character (U+FFFD). ``finish`` decodes the buffered tail the same way, with the cut ``max(1, n - unfixed)``.
The generated text is what vLLM's detokenizer emits: special tokens skipped, and a trailing character whose bytes
never completed left out.

Re-feeding all audio makes each chunk cost more than the last; here a chunk costs the same at minute 30 as at
minute 1. The encoder re-encodes only the open 8 s window (``qasr_jax.streaming.audio``), and each stream holds an
engine slot whose KV cache keeps the prompt through its final windows' audio tokens: a chunk truncates the slot to
that prefix and prefills only the rest (the open window's audio tokens, the template's end and the prefix text).

Endless streams are cut into *segments* so that memory and the prefix text stay bounded. Once a segment holds
``segment_seconds`` of audio it ends at the next chunk boundary whose last 0.3 s lies 20 dB below the segment's
loudest 0.1 s (a pause); its text is committed (``Partial.fixed_text``) and a fresh segment starts, whose system
context carries the committed text's last 32 tokens. A segment also ends, pause or not, when its next chunk would
not fit the slot's cache. Within a segment the output is the official algorithm's, token for token.

A :class:`StreamDriver` owns the slots (one ``qasr_jax.decoding.slots.SlotBatcher``) and advances every stream that
has a complete chunk in one step: one log-mel call, one encoder call, one prefill and one decode loop for all of them.
Streams join and leave without compiling anything.
"""

from __future__ import annotations

import collections
import threading
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from qasr_jax.decoding import hotwords as hw
from qasr_jax.decoding import search as S
from qasr_jax.decoding.buckets import output_buffer, pow2_rows, slot_count, stream_cache_length, stream_prompt_width
from qasr_jax.decoding.request import Request, prepare
from qasr_jax.decoding.slots import Prompts, Row, SlotBatcher
from qasr_jax.io.audio import SAMPLE_RATE, n_frames
from qasr_jax.io.prompts import parse_output, supported_languages
from qasr_jax.io.results import Result, Segment, join_texts, majority_language
from qasr_jax.modeling.config import audio_token_count
from qasr_jax.streaming.audio import refresh
from qasr_jax.streaming.prompts import (CARRY_TOKENS, generated_text, prompt_parts, rollback_prefix, segment_context,
                                     unfixed_chunks_for)
from qasr_jax.streaming.state import Committed, Options, Partial, SegmentState, StreamState, checked_samples

DEFAULT_SEGMENT_SECONDS = 20.0
CONTEXT_TOKENS = 256  # default room for the system prompt (context and carried text) in a slot's cache


# ----------------------------------------------------------------------------------------------------------------
# Streams and the driver


class Stream:
    """One live audio stream: :meth:`feed` 16 kHz samples as they come, :meth:`finish` for the Result. Dropping a
    stream without finishing it frees its slot."""

    def __init__(self, driver: "StreamDriver", state: StreamState):
        self.driver = driver
        self._state = state
        self._finalizer = weakref.finalize(self, driver._abandon, state)

    def __repr__(self) -> str:
        return f"<Stream {self._state.name}, {self._state.fed / SAMPLE_RATE:.1f} s fed>"

    def feed(self, samples) -> Partial:
        """Buffer 16 kHz mono float32 or int16 samples (any length); each complete chunk is decoded -> the Partial."""
        return self.driver.feed({self: samples})[self]

    def finish(self) -> Result:
        """Decode the buffered tail and end the stream -> its Result (segments with their times; no log-probs)."""
        return self.driver.finish([self])[0]

    def close(self) -> None:
        """End the stream without a result and free its slot."""
        self.driver.close([self])

    @property
    def partial(self) -> Partial:
        """The transcript as of the last complete chunk."""
        return self._state.partial()

    @property
    def generated_ids(self) -> list[int]:
        """The ids the last chunk's decode generated after its prompt (EOS excluded)."""
        return list(self._state.generated)


class StreamDriver:
    """Up to ``slots`` streams over one model, advanced together: every stream with a complete chunk goes
    through one log-mel, encoder, prefill and decode step (see the module doc)."""

    def __init__(self, model, tokenizer, slots: int = 8, segment_seconds: float = DEFAULT_SEGMENT_SECONDS,
                 max_new_tokens: int = 32, context_tokens: int = CONTEXT_TOKENS, hotword_edges: int = 0):
        """``model``: a loaded model (``qasr_jax.load``), ``tokenizer`` its tokenizer, as a Pipeline takes them."""
        if slots < 1 or max_new_tokens < 1 or context_tokens < 1:
            raise ValueError(f"slots, max_new_tokens and context_tokens must be >= 1, got {slots}, "
                             f"{max_new_tokens} and {context_tokens}")
        if not segment_seconds > 0:
            raise ValueError(f"segment_seconds must be > 0, got {segment_seconds}")
        tok = self.tokenizer = tokenizer
        self.engine, self.config = model.engine, model.config
        self.languages = supported_languages(self.config.support_languages)
        self.segment_seconds = float(segment_seconds)
        self.out_len = output_buffer(max_new_tokens)
        self.max_len = stream_cache_length(segment_seconds, context_tokens, self.out_len, self.config.audio)
        # Streams may carry hotword tries of up to this many edges (0: none; a biased step costs a little more).
        self.hotword_edges = hw.edge_bucket(hotword_edges) if hotword_edges > 0 else 0
        cfg = S.SearchConfig(tok.endoftext_id, hotword_edges=self.hotword_edges)
        self.batcher = SlotBatcher(self.engine, slot_count(slots, 1, self.engine.data_size), self.max_len,
                                   self.out_len, cfg, S.SearchSettings.make(tok.eos_ids))
        self._lock = threading.RLock()
        self._abandoned: collections.deque[StreamState] = collections.deque()
        self._made = 0

    def __repr__(self) -> str:
        return f"<StreamDriver {self.batcher.requests} slots, {self.free} free, cache {self.max_len}>"

    @property
    def free(self) -> int:
        """Slots free for new streams."""
        with self._lock:
            self._reclaim()
            return len(self.batcher.free)

    # -- streams join and leave -----------------------------------------------------------------------------------
    def stream(self, language=None, context: str = "", chunk_seconds: float = 2.0,
               unfixed_chunks: int | None = None, unfixed_tokens: int = 5, max_new_tokens: int = 32, hotwords=None,
               hotword_boost: float = hw.DEFAULT_BOOST, hotwords_in_context: bool = False, vad: bool = False) -> Stream:
        """A new stream in a free slot (the official algorithm's parameters and defaults, ``unfixed_chunks`` by default
        at least 4 s of audio; see the module doc). ``hotwords`` (words and names) bias its decoding by
        ``hotword_boost`` per matched token and, with ``hotwords_in_context=True``, join its context, as in
        ``Transcriber.transcribe``; the driver must have been made with room for their trie (``hotword_edges``;
        ``Transcriber.stream`` sizes it itself). ``vad=True``: segments end at pauses Silero VAD finds
        (``qasr_jax.vad``) instead of at a quiet tail, so noise without speech counts as a pause. The request is
        checked by ``decoding.request.prepare``."""
        request = prepare(self.tokenizer, self.languages, language, context, hotwords, hotword_boost,
                          hotwords_in_context)
        return self.open(request, chunk_seconds, unfixed_chunks, unfixed_tokens, max_new_tokens, vad)

    def open(self, request: Request, chunk_seconds: float = 2.0, unfixed_chunks: int | None = None,
             unfixed_tokens: int = 5, max_new_tokens: int = 32, vad: bool = False) -> Stream:
        """A new stream of a prepared ``request`` (``decoding.request.prepare``), as :meth:`stream`."""
        if not chunk_seconds > 0:
            raise ValueError(f"chunk_seconds must be > 0, got {chunk_seconds}")
        unfixed_chunks = unfixed_chunks_for(chunk_seconds) if unfixed_chunks is None else unfixed_chunks
        if unfixed_chunks < 0 or unfixed_tokens < 0:
            raise ValueError(f"unfixed_chunks and unfixed_tokens must be >= 0, got {unfixed_chunks} and "
                             f"{unfixed_tokens}")
        if not 1 <= max_new_tokens <= self.out_len:
            raise ValueError(f"max_new_tokens={max_new_tokens} is outside 1..{self.out_len}, this driver's output "
                             f"buffer; make a driver with more: asr.stream_driver(max_new_tokens={max_new_tokens})")
        if request.hotword_edges > self.hotword_edges:
            raise ValueError(f"these hotwords make a trie of {request.hotword_edges} edges and this driver has room "
                             f"for {self.hotword_edges}; make a driver with more: "
                             f"asr.stream_driver(hotword_edges={request.hotword_edges})")
        opts = Options(request, max(1, round(chunk_seconds * SAMPLE_RATE)), int(unfixed_chunks), int(unfixed_tokens),
                       int(max_new_tokens), bool(vad))
        head, after = prompt_parts(self.tokenizer, request.context, request.language, "")
        # The largest first chunk of a segment: the context, the carried text, one chunk of audio, the template.
        need = len(head) + CARRY_TOKENS + 4 + audio_token_count(n_frames(opts.chunk_samples), self.config.audio)
        if need + len(after) > self.max_len - self.out_len:
            raise ValueError(
                f"a chunk of {chunk_seconds} s with this context needs {need + len(after)} prompt positions, more "
                f"than the {self.max_len - self.out_len} this driver's cache leaves; shorten the context or the "
                "chunk, or make a driver with more room: asr.stream_driver(context_tokens=..., segment_seconds=...)")
        with self._lock:
            self._reclaim()
            if not self.batcher.free:
                raise RuntimeError(f"all {self.batcher.requests} stream slots of this driver are in use; finish or "
                                   "close a stream, or make a driver with more: asr.stream_driver(slots=...)")
            self._made += 1
            state = StreamState(f"#{self._made}", opts, self.batcher.reserve())
            state.segment = SegmentState(self.config.audio, request.context, 0, self.tokenizer, request.language)
            return Stream(self, state)

    def _abandon(self, state: StreamState) -> None:
        # Runs when a Stream is garbage collected, possibly in the middle of another call: only note it here.
        if not state.done:
            self._abandoned.append(state)

    def _reclaim(self) -> None:
        while self._abandoned:
            self._release(self._abandoned.popleft())

    def _release(self, state: StreamState) -> None:
        if not state.done:
            state.done = True
            self.batcher.give_back(state.slot)

    def _own(self, stream: Stream) -> StreamState:
        if not isinstance(stream, Stream) or stream.driver is not self:
            raise ValueError(f"{stream!r} is not a stream of this driver; make streams with driver.stream()")
        if stream._state.done:
            raise RuntimeError(f"stream {stream._state.name} is finished or closed; start a new one with "
                               "asr.stream() to transcribe more audio")
        return stream._state

    def close(self, streams: Iterable[Stream]) -> None:
        """End streams without results and free their slots (closing a stream twice is harmless)."""
        with self._lock:
            for stream in streams:
                if not isinstance(stream, Stream) or stream.driver is not self:
                    raise ValueError(f"{stream!r} is not a stream of this driver; close it with its own driver")
                self._release(stream._state)
                stream._finalizer.detach()

    # -- audio in, text out -----------------------------------------------------------------------------------------
    def feed(self, inputs: Mapping[Stream, Any]) -> dict[Stream, Partial]:
        """Buffer each stream's new samples, then advance every stream with a complete chunk together, chunk by
        chunk -> each stream's Partial. Every input is checked before any is used."""
        with self._lock:
            self._reclaim()
            checked = [(stream, self._own(stream), checked_samples(x, f"stream {stream._state.name}"))
                       for stream, x in inputs.items()]
            for _, state, x in checked:
                state.buffer = np.concatenate([state.buffer, x])
                state.fed += x.shape[0]
            while True:
                ready = [s for _, s, _ in checked if s.buffer.shape[0] >= s.opts.chunk_samples]
                if not ready:
                    break
                chunks = [s.buffer[: s.opts.chunk_samples] for s in ready]
                for s in ready:
                    s.buffer = s.buffer[s.opts.chunk_samples :]
                self._advance(ready, chunks, final=False)
            return {stream: state.partial() for stream, state, _ in checked}

    def finish(self, streams: Iterable[Stream]) -> list[Result]:
        """Decode each stream's buffered tail (all together) and end the streams -> their Results, in order."""
        with self._lock:
            self._reclaim()
            streams = list(streams)
            states = [self._own(s) for s in streams]
            if len({id(s) for s in states}) != len(states):
                raise ValueError("a stream is listed twice; finish each stream once")
            tails = [s for s in states if s.buffer.shape[0]]
            if tails:
                self._advance(tails, [s.buffer for s in tails], final=True)
            results = []
            for stream, state in zip(streams, states):
                state.buffer = np.zeros(0, np.float32)
                self._commit(state, fresh=False)
                results.append(self._result(state))
            self.close(streams)
            return results

    # -- one step for many streams ----------------------------------------------------------------------------------
    def _prefix(self, state: StreamState, final: bool) -> str:
        seg = state.segment
        if seg.chunks < state.opts.unfixed_chunks:
            return ""
        return rollback_prefix(self.tokenizer, seg.raw, state.opts.unfixed_tokens, final)

    def _advance(self, states: list[StreamState], chunks: list[np.ndarray], final: bool) -> None:
        """One chunk (or, ``final``, the tail) for each of ``states``: encode, prefill, decode, all together."""
        tok, wt = self.tokenizer, self.config.audio.window_tokens
        room = self.max_len - self.out_len
        jobs = []
        for state, chunk in zip(states, chunks):
            seg = state.segment
            prefix = self._prefix(state, final)
            _, after = prompt_parts(tok, seg.context, state.opts.request.language, prefix)
            n_audio = audio_token_count(n_frames(seg.audio.samples + chunk.shape[0]), self.config.audio)
            if seg.chunks and len(seg.header) + n_audio + len(after) > room:  # the cache is full: a new segment
                self._commit(state, fresh=True)
                seg, prefix = state.segment, self._prefix(state, final)
                _, after = prompt_parts(tok, seg.context, state.opts.request.language, prefix)
            seg.audio.append(chunk)
            seg.hear(chunk)
            state.listen(chunk)
            if seg.heard:
                jobs.append((state, seg, prefix, after))
            else:  # nothing said yet, as transcribe() sees silence: the chunk counts, its output is empty
                seg.chunks += 1
                if seg.audio.samples >= self.segment_seconds * SAMPLE_RATE:
                    self._commit(state, fresh=True)
        if not jobs:
            return
        refresh(self.engine, [seg.audio for _, seg, _, _ in jobs])

        rows = []  # (ids, audio embeds) of each prompt's part after what its slot keeps
        for state, seg, prefix, after in jobs:
            kept_windows = seg.audio.stable if seg.inserted else 0
            keep = len(seg.header) + wt * kept_windows if seg.inserted else 0
            pads = [tok.audio_pad_id] * (seg.audio.n_tokens - wt * kept_windows)
            ids = ([] if seg.inserted else seg.header) + pads + after
            if keep + len(ids) > room:  # _commit above keeps every prompt inside the cache
                raise RuntimeError(f"stream {state.name}: a prompt of {keep + len(ids)} positions overflows the "
                                   f"cache's {room}")
            self.batcher.truncate(state.slot, keep)
            rows.append((ids, seg.audio.embeddings(kept_windows)))
        width = stream_prompt_width(max(len(ids) for ids, _ in rows), room)
        n_rows = pow2_rows(len(rows), self.engine.data_size)
        ids_batch = np.full((n_rows, width), tok.endoftext_id, np.int32)
        audio_batch = np.zeros((n_rows, width, self.config.text.hidden_size), np.float32)
        for r, (ids, audio) in enumerate(rows):
            ids_batch[r, : len(ids)] = ids
            audio_batch[r, : audio.shape[0]] = audio
        lengths = np.zeros(n_rows, np.int32)
        lengths[: len(rows)] = [len(ids) for ids, _ in rows]
        prompts = Prompts(self.engine.embed(ids_batch, audio_batch), lengths)
        for r, (state, _, prefix, _) in enumerate(jobs):
            self.batcher.submit(Row(prompts, r, state.opts.max_new, slot=state.slot, tag=(state, prefix),
                                    hotwords=state.opts.request.hotwords))

        for out in self.batcher.drain():
            state, prefix = out.row.tag
            seg = state.segment
            seg.inserted = True
            state.generated = out.token_ids
            seg.raw = prefix + generated_text(tok, out.token_ids)
            lang, seg.text = parse_output(tok.encode(seg.raw, parse_special=True), tok, state.opts.request.language,
                                          supported=self.languages)
            seg.language = lang or state.opts.request.language
            seg.truncated = not out.finished
            seg.chunks += 1
            if not final and seg.audio.samples >= self.segment_seconds * SAMPLE_RATE and state.paused():
                self._commit(state, fresh=True)

    def _commit(self, state: StreamState, fresh: bool) -> None:
        """End the open segment: its text joins the committed ones; ``fresh`` starts the next segment."""
        seg = state.segment
        if seg.chunks:
            end = seg.start + seg.audio.samples
            span = Segment(round(seg.start / SAMPLE_RATE, 3), round(end / SAMPLE_RATE, 3), seg.text)
            state.committed.append(Committed(span, seg.language, seg.raw, seg.truncated))
        if fresh:
            asked = state.opts.request
            context = segment_context(self.tokenizer, asked.context, join_texts(state.texts(), state.language()))
            state.segment = SegmentState(self.config.audio, context, seg.start + seg.audio.samples, self.tokenizer,
                                         asked.language)

    def _result(self, state: StreamState) -> Result:
        language = majority_language([c.language for c in state.committed])
        ids = [i for c in state.committed for i in self.tokenizer.encode(c.raw, parse_special=True)]
        return Result(source=f"stream {state.name}", language=language, text=join_texts(state.texts(), language),
                      token_ids=ids, duration=state.fed / SAMPLE_RATE,
                      segments=[c.span for c in state.committed if c.span.text],
                      truncated=any(c.truncated for c in state.committed))


def shared_driver(transcriber, max_new_tokens: int, hotword_edges: int = 0) -> StreamDriver:
    """A one-slot driver of ``transcriber`` with a free slot (made when all are taken): what ``asr.stream()`` uses,
    so that a lone stream decodes one row per step. ``hotword_edges``: the trie size its hotwords need (0: none;
    rounded up to ``hotwords.edge_bucket``)."""
    edges = hw.edge_bucket(hotword_edges) if hotword_edges > 0 else 0
    drivers = transcriber.__dict__.setdefault("_stream_drivers", [])
    for driver in drivers:
        if driver.out_len >= max_new_tokens and driver.hotword_edges == edges and driver.free:
            return driver
    driver = StreamDriver(transcriber.model, transcriber.tokenizer, slots=1, max_new_tokens=max(32, max_new_tokens),
                          hotword_edges=edges)
    drivers.append(driver)
    return driver
