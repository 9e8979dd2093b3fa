"""Audio pieces in, generated ids out: batched encoding, then decoding in the engine's slots.

The :class:`Pipeline` is what offline transcription and the server share. Pieces (at most ``max_audio_seconds``
each) are grouped by the KV cache they need (prompt width and output budget, rounded up to powers of two; offline
the width to 4 steps per octave, see ``_group_of``), so a two-second clip never pays for the cache of a
twenty-minute one. Each group has its own :class:`qasr_jax.decoding.slots.SlotBatcher`, with as many slots as
``batch_size`` allows within the KV memory budget; pieces are encoded in batches as slots come free, and a finished
piece's slot takes the next one at once, so outputs of mixed lengths keep the slots full. Offline the groups run one
after another, longest first (one cache in memory at a time), the narrower groups' pieces filling the slots the
widest would leave empty (a batch of mixed lengths decodes as one batch), and freed slots are refilled in waves (one
prefill for many pieces); a server runs the groups side by side, so a long request never holds up short ones, and
refills a slot at once.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Any

import jax
import numpy as np

from qasr_jax.decoding import hotwords as hw
from qasr_jax.decoding import processors as P
from qasr_jax.decoding import search as S
from qasr_jax.decoding.buckets import (batch_rows, frame_bucket, length_bucket, next_pow2, output_buffer, prompt_width,
                                      round_up)
from qasr_jax.decoding.request import Request
from qasr_jax.decoding.slots import Output, Prompts, Row, SlotBatcher
from qasr_jax.io.audio import n_frames, pad_waves
from qasr_jax.io.prompts import build_prompt_ids
from qasr_jax.modeling.config import audio_token_count

TOKENS_PER_SECOND = 10.0  # default output budget per second of audio (see token_budget)
BUDGET_BASE = 32  # plus this many, for the "language X<asr_text>" header and short clips
DEFAULT_KV_BYTES = 8 << 30  # KV cache memory one group of slots may take (at least; see kv_budget)
KV_SHARE = 0.5  # of an accelerator's free memory, for one group's KV cache (the rest: activations, log-mel)
# Offline, freed slots are refilled once this fraction of them is free (1/8): one prefill for a wave of pieces,
# not one per finished piece. A server refills at once (a waiting request's latency comes first).
REFILL_FRACTION = 8
SPLIT_PADDING = 1.5  # an encoder batch padded to more than this times its pieces' frames is split (_encoder_batches)


def token_limit(config) -> int:
    """The most new tokens a piece may ask for: half the model's positions (the KV cache's room)."""
    return config.text.max_position_embeddings // 2


def token_budget(seconds: float, limit: int | None = None) -> int:
    """Default max_new_tokens for a piece: 32 + 10 per second of audio, at most ``limit``. Fast speech runs at
    about 3-4 English words (4-6 tokens) or 6-7 Chinese characters (about one token each) per second, so 10 per
    second leaves 1.5-2x room even for fast talkers, and a 20-minute piece gets 12 032 tokens; a piece that still
    runs out is flagged (``Result.truncated``), never silently cut."""
    budget = BUDGET_BASE + int(np.ceil(TOKENS_PER_SECOND * seconds))
    return budget if limit is None else min(budget, limit)


def kv_budget() -> int:
    """KV cache bytes a new group of slots may take: half the free memory of the first device where it reports it
    (a GPU or TPU: a batch of 256 two-minute clips needs ~70 GB at 0.6B), else ``DEFAULT_KV_BYTES``."""
    stats = jax.local_devices()[0].memory_stats() or {}  # local: another host's device has no stats here
    free = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
    return max(DEFAULT_KV_BYTES, int(KV_SHARE * free))


@dataclasses.dataclass
class Work:
    """One audio piece (16 kHz ``samples``) of a ``request`` to decode in at most ``max_new`` tokens; ``key`` is
    the caller's (it names the piece in what :meth:`Pipeline.step` returns)."""

    key: Any
    samples: np.ndarray
    max_new: int
    request: Request = Request()


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """The search settings every piece of a pipeline shares; its ids are the checkpoint tokenizer's
    (:meth:`for_tokenizer`)."""

    eos_ids: tuple[int, ...]
    pad_id: int
    beam_size: int = 1
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    suppress_eos: bool = False
    stop_loops: bool = False  # greedy search stops a piece caught in a loop (processors.LOOP_PERIOD, LOOP_REPEATS)

    @classmethod
    def for_tokenizer(cls, tokenizer, **options) -> "DecodeOptions":
        """Options that stop at ``tokenizer``'s EOS ids and pad with its ``<|endoftext|>``."""
        return cls(tuple(tokenizer.eos_ids), tokenizer.endoftext_id, **options)

    def config(self) -> S.SearchConfig:
        loops = P.LOOP_PERIOD if self.stop_loops and self.beam_size == 1 else 0
        return S.SearchConfig(self.pad_id, self.beam_size, self.repetition_penalty != 1.0, self.no_repeat_ngram_size,
                              loop_period=loops, loop_repeats=P.LOOP_REPEATS)

    def settings(self) -> S.SearchSettings:
        return S.SearchSettings.make(self.eos_ids, self.length_penalty, self.repetition_penalty,
                                     suppress_eos=self.suppress_eos)


class _Group:
    """The pieces that share one cache shape and hotword trie size, and their batcher (made when first needed,
    dropped when idle)."""

    def __init__(self, width: int, out_len: int, edges: int):
        self.width, self.out_len, self.edges = width, out_len, edges
        self.pending: collections.deque[Work] = collections.deque()
        self.batcher: SlotBatcher | None = None

    @property
    def idle(self) -> bool:
        return not self.pending and (self.batcher is None or self.batcher.idle)


class Pipeline:
    """Pieces in (:meth:`submit`), finished ``(Work, Output)`` pairs out of each :meth:`step` (see module doc)."""

    def __init__(self, model, tokenizer, options: DecodeOptions, batch_size: int = 8,
                 kv_bytes: int | None = None, side_by_side: bool = False, encode_rows: int | None = None):
        """``encode_rows``: at most this many pieces per encoder (and so prefill) call, whatever the slots (None:
        as many as a group has slots); a server on CPU sets it, since those calls' activations grow with their
        rows while the decode steps they feed batch every slot anyway."""
        if batch_size < 1 or (encode_rows is not None and encode_rows < 1):
            raise ValueError(f"batch_size and encode_rows must be >= 1, got {batch_size} and {encode_rows}")
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.batch_size, self.kv_bytes, self.side_by_side = batch_size, kv_bytes, side_by_side
        self.encode_rows = encode_rows
        self.cfg, self.settings = options.config(), options.settings()
        self.groups: dict[tuple[int, int, int], _Group] = {}
        self.steps = 0  # decode steps run by every batcher so far
        self._prompt_parts: dict[tuple[str, str | None], tuple[list[int], list[int]]] = {}

    # -- shapes -------------------------------------------------------------------------------------------------
    def prompt_ids(self, work: Work, n_audio: int) -> list[int]:
        """The prompt ids of a piece with ``n_audio`` audio tokens."""
        # The text around the audio pads is tokenized once per (context, language), not once per piece.
        key = (work.request.context, work.request.language)
        if key not in self._prompt_parts:
            ids = build_prompt_ids(self.tokenizer, 0, work.request.context, work.request.language)
            at = ids.index(self.tokenizer.audio_start_id) + 1
            self._prompt_parts[key] = (ids[:at], ids[at:])
        head, tail = self._prompt_parts[key]
        return head + [self.tokenizer.audio_pad_id] * n_audio + tail

    def _group_of(self, work: Work) -> tuple[int, int, int]:
        # The prompt's own width: its audio tokens from its real frames (its encoder bucket's frames made a 22 s
        # clip's 288-token prompt a 320-token group, and its cache 64 positions wider, 6% slower at batch 8).
        width = len(self.prompt_ids(work, audio_token_count(n_frames(work.samples.shape[0]), self.model.config.audio)))
        edges = hw.edge_bucket(work.request.hotword_edges) if work.request.hotwords else 0
        out_len = next_pow2(output_buffer(work.max_new), 64)
        if self.side_by_side:  # each group side by side holds a cache and its programs: few, wide groups
            return next_pow2(prompt_width(width), 256), out_len, edges
        # Offline one group decodes at a time and the narrower ones fill its free slots, so a finer width costs no
        # batch: its cache (read by every step) is at most 1/4 wider than its widest prompt, not 2x (a 22 s clip's
        # 320-wide prompt in a 512-wide cache made a batch of 8 decode 9% slower than the fused loop).
        return max(256, length_bucket(prompt_width(width))), out_len, edges

    def _slot_bytes(self, width: int, out_len: int) -> int:
        t = self.model.config.text
        return 2 * t.layers * t.kv_heads * t.head_dim * (width + out_len) * np.dtype(self.model.engine.dtype).itemsize

    def _slots(self, width: int, out_len: int) -> int:
        """Slots for a new group: as many as ``batch_size`` asks and the KV budget leaves. A given ``kv_bytes`` is
        shared by the groups that decode side by side (what the live ones hold is taken off it; a new group gets
        one slot at least); without it, each new group takes half the device memory then free (``kv_budget``)."""
        if self.kv_bytes is None:
            budget = kv_budget()
        else:
            budget = self.kv_bytes - self.kv_held()
        fits = max(1, int(budget // (self._slot_bytes(width, out_len) * self.options.beam_size)))
        return round_up(min(self.batch_size, fits) * self.options.beam_size,
                        self.model.data_size * self.options.beam_size)

    def kv_held(self) -> int:
        """The KV cache bytes the groups' slots hold now (a group without a batcher holds none)."""
        return sum(g.batcher.requests * self.options.beam_size * self._slot_bytes(g.width, g.out_len)
                   for g in self.groups.values() if g.batcher is not None)

    # -- the queue ----------------------------------------------------------------------------------------------
    def submit(self, work: Work) -> None:
        """Queue a piece (pieces are served longest first within their group)."""
        if work.max_new < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {work.max_new}")
        key = self._group_of(work)
        group = self.groups.setdefault(key, _Group(*key))
        group.pending.append(work)

    @property
    def busy(self) -> bool:
        """Pieces queued or decoding."""
        return any(not g.idle for g in self.groups.values())

    @property
    def waiting(self) -> int:
        """Pieces queued for a slot (not decoding yet)."""
        return sum(len(g.pending) + (len(g.batcher.queue) if g.batcher else 0) for g in self.groups.values())

    @property
    def live(self) -> int:
        """Pieces decoding in slots now."""
        return sum(len(g.batcher.live) for g in self.groups.values() if g.batcher)

    def cancel(self, key: Any) -> None:
        """Drop the pieces of ``key`` (``Work.key``), queued or decoding; their slots take other pieces."""
        for group in self.groups.values():
            group.pending = collections.deque(w for w in group.pending if w.key != key)
            if group.batcher is not None:
                for req in [*group.batcher.queue, *group.batcher.live.values()]:
                    if req.tag.key == key:
                        group.batcher.cancel(req)

    def partial(self) -> list[tuple[Work, list[int], list[float]]]:
        """Every decoding piece's tokens so far and their log-probabilities (see ``SlotBatcher.partial``)."""
        return [(req.tag, ids, lps) for g in self.groups.values() if g.batcher
                for req, ids, lps in g.batcher.partial()]

    def _encode(self, group: _Group) -> None:
        """Encode the group's next pieces (as many as it has slots) and queue them in its batcher."""
        batcher = group.batcher
        take = [group.pending.popleft() for _ in range(min(batcher.requests, len(group.pending)))]
        cap = min(batcher.requests, self.encode_rows or batcher.requests)
        for part in (p for i in range(0, len(take), cap) for p in self._encoder_batches(take[i : i + cap], cap)):
            batch = self.encode_batch(part, cap)
            for r, work in enumerate(part):
                batcher.submit(Row(batch, r, work.max_new, tag=work, hotwords=work.request.hotwords))

    def _encoder_batches(self, take: list[Work], cap: int) -> list[list[Work]]:
        """Pieces (longest first) as one encoder batch, or one per octave of audio length where one batch would pad
        to over ``SPLIT_PADDING`` times their frames (a 3 s piece beside a 22 s one: the encoder's work is all in
        the padded frames); either way they decode together. Shapes stay buckets: a mix of lengths within one
        octave is never split, so it compiles nothing new. On a data-parallel mesh every part pads its rows to the
        data axis (less to save) and each shape is a sharded compile, so the pieces stay one batch there."""
        if self.model.data_size > 1:
            return [take]
        audio = self.model.config.audio

        def octave(work: Work) -> int:
            return next_pow2(-(-n_frames(work.samples.shape[0]) // audio.chunk_frames))

        def padded(works: list[Work]) -> int:  # the frames an encoder batch of these pieces computes
            longest = max(n_frames(w.samples.shape[0]) for w in works)
            return batch_rows(len(works), cap, self.model.data_size) * frame_bucket(longest, audio)

        parts = [list(p) for _, p in itertools.groupby(take, key=octave)]
        return parts if padded(take) > SPLIT_PADDING * sum(map(padded, parts)) else [take]

    def encode_batch(self, works: list[Work], cap: int) -> Prompts:
        """Encode pieces as one batch (rows padded to a bucket of at most ``cap``) -> their embedded prompts (the
        prompts' audio pads counted here, from each piece's frames, so one program encodes and embeds)."""
        engine, audio = self.model.engine, self.model.config.audio
        rows = batch_rows(len(works), cap, self.model.data_size)
        works = works + [works[-1]] * (rows - len(works))
        frames = [n_frames(w.samples.shape[0]) for w in works]
        samples, lengths, padded = pad_waves([w.samples for w in works], pad_to=frame_bucket(max(frames), audio))
        prompts = [self.prompt_ids(w, audio_token_count(f, audio)) for w, f in zip(works, frames)]
        ids = np.zeros((rows, prompt_width(max(map(len, prompts)))), np.int32)
        for r, p in enumerate(prompts):
            ids[r, : len(p)] = p
        ids_dev = engine.put(ids)
        widths = np.array([len(p) for p in prompts], np.int32)
        return Prompts(engine.embed_waves(samples, lengths, ids_dev, padded), widths,
                       ids_dev if self.cfg.penalize_repetition or self.cfg.no_repeat_ngram_size else None)

    def _borrow(self, group: _Group) -> None:
        """Offline, fill the slots a group would leave empty with the pending pieces of narrower groups (same
        hotword room), widest first: a batch of mixed lengths decodes as one batch, in the cache it already has."""
        spare = group.batcher.requests - len(group.batcher.live) - len(group.batcher.queue) - len(group.pending)
        others = sorted((g for g in self.groups.values() if g is not group and g.pending and g.edges == group.edges
                         and g.width <= group.width and g.out_len <= group.out_len), key=lambda g: -g.width)
        for other in others:
            while spare > 0 and other.pending:
                group.pending.append(other.pending.popleft())
                spare -= 1

    def step(self, max_steps: int | None = None) -> list[tuple[Work, Output]]:
        """Encode what free slots can take, decode until a piece finishes (or ``max_steps`` steps: a server keeps
        them few, so that new pieces join soon) -> the finished pieces."""
        live = [g for g in self.groups.values() if not g.idle]
        if not self.side_by_side:  # one cache at a time: the group holding the longest prompts first
            live = sorted(live, key=lambda g: (-g.width, -g.out_len, g.edges))[:1]
        done: list[tuple[Work, Output]] = []
        for group in live:
            if group.batcher is None:
                slots = self._slots(group.width, group.out_len)
                cfg = dataclasses.replace(self.cfg, hotword_edges=group.edges)
                group.batcher = SlotBatcher(self.model.engine, slots, group.width + group.out_len, group.out_len,
                                            cfg, self.settings, history_len=group.width + group.out_len,
                                            refill=1 if self.side_by_side else max(1, slots // REFILL_FRACTION))
            if not self.side_by_side:
                self._borrow(group)
            if group.pending and not group.batcher.queue:
                group.pending = collections.deque(sorted(group.pending, key=lambda w: -w.samples.shape[0]))
                self._encode(group)
            before = group.batcher.steps
            done += [(out.row.tag, out) for out in group.batcher.run(max_steps)]
            self.steps += group.batcher.steps - before
            if group.idle:  # its cache is freed (a server would otherwise keep one per shape it has seen);
                group.batcher = None  # a later piece makes a new one, which compiles nothing
        return done
