"""Continuous batching over the engine's slots: a queue of prompt rows to decode, slots refilled as rows finish.

A :class:`SlotBatcher` owns one :class:`qasr_jax.decoding.engine.DecodeState`. Callers embed prompts in batches
(:class:`Prompts`) and submit one :class:`Row` per prompt row (a piece of a ``decoding.request.Request``, or a
stream's chunk); each :meth:`SlotBatcher.run` call inserts queued rows into free slots (one engine call for all the
rows of one prompt batch), steps every live slot until one of them finishes, and returns the finished ones. A row may
pin a slot its caller holds (:meth:`reserve`): a stream keeps its prompt's KV there between chunks and extends it
(:meth:`truncate` keeps a prefix). Shapes are fixed per batcher, so rows join and leave without compiling.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax
import numpy as np

from qasr_jax.decoding import hotwords as hw
from qasr_jax.decoding import search as S
from qasr_jax.decoding.buckets import next_pow2


@dataclasses.dataclass
class Prompts:
    """A batch of embedded prompts: ``embeds`` (batch, width, hidden) on the devices, ``lengths`` (batch,) real
    tokens per row, ``ids`` (batch, width) the prompt ids for the repetition guard (or None)."""

    embeds: jax.Array
    lengths: np.ndarray
    ids: jax.Array | None = None


@dataclasses.dataclass
class Row:
    """Decode row ``index`` of ``prompts`` for at most ``max_new`` tokens; ``slot`` is a slot the caller holds
    (``SlotBatcher.reserve``; its prompt goes on top of what the slot keeps) or None for any free one."""

    prompts: Prompts
    index: int
    max_new: int
    slot: int | None = None
    tag: Any = None  # the caller's
    hotwords: tuple | None = None  # (host trie arrays from hotwords.build_trie, boost), for a batcher with edges


@dataclasses.dataclass
class Output:
    """A finished row: generated ids (EOS excluded), each one's log-probability, whether it ended with an
    EOS (False: it stopped at max_new), and the steps it took."""

    row: Row
    token_ids: list[int]
    token_logprobs: list[float]
    finished: bool
    steps: int
    looped: bool = False  # stopped by the search's loop guard (SearchConfig.loop_period)


class SlotBatcher:
    """A queue of rows decoded in ``slots`` slots of ``max_len`` cache positions (see the module doc)."""

    def __init__(self, engine, slots: int, max_len: int, out_len: int, cfg: S.SearchConfig,
                 settings: S.SearchSettings, history_len: int = 0, refill: int = 1):
        self.engine, self.cfg, self.settings = engine, cfg, settings
        self.refill = refill  # free slots inserted into only once this many are free (or nothing else decodes)
        self.max_len, self.out_len = max_len, out_len
        self.requests = slots // cfg.beam_size  # slots for rows; each holds beam_size cache rows
        self.state = engine.new_state(slots, max_len, cfg, out_len, history_len)
        self.free = list(range(self.requests))
        self.held: set[int] = set()
        self.live: dict[int, Row] = {}
        self.queue: collections.deque[Row] = collections.deque()
        self.steps = 0  # decode steps run so far

    # -- slots the caller holds -----------------------------------------------------------------------------------
    def reserve(self) -> int:
        """Take a free slot for the caller's own use (a stream); it is never given to other rows."""
        if not self.free:
            raise RuntimeError(f"all {self.requests} slots are taken; release one or make a batcher with more")
        slot = self.free.pop(0)
        self.held.add(slot)
        return slot

    def truncate(self, slot: int, keep: int) -> None:
        """Keep only the first ``keep`` tokens of a held slot's cache (the next row extends them)."""
        self.state = self.engine.release(self.state, [slot], self.cfg, keep=[keep])

    def give_back(self, slot: int) -> None:
        """Return a held slot to the pool (emptied)."""
        if slot in self.live:
            raise RuntimeError(f"slot {slot} is still decoding")
        self.held.discard(slot)
        self.state = self.engine.release(self.state, [slot], self.cfg)
        self.free.append(slot)

    # -- the queue ------------------------------------------------------------------------------------------------
    def cancel(self, row: Row) -> None:
        """Drop a queued or decoding row (a client that went away): its slot is emptied, and freed unless held."""
        if any(r is row for r in self.queue):  # by identity: rows hold device arrays
            self.queue = collections.deque(r for r in self.queue if r is not row)
            return
        slot = next((s for s, r in self.live.items() if r is row), None)
        if slot is None:
            return  # finished already
        del self.live[slot]
        self.state = self.engine.release(self.state, [slot], self.cfg)
        if slot not in self.held:
            self.free.append(slot)

    def partial(self) -> list[tuple[Row, list[int], list[float]]]:
        """Every decoding row's tokens so far and their log-probabilities (a beam row: its best beam, which
        can still change), for callers that stream tokens as they are generated."""
        if not self.live:
            return []
        res = self.engine.results(self.state, self.cfg, self.settings)
        return [(req, res.tokens[slot, : int(res.lengths[slot])].tolist(),
                 res.token_logprobs[slot, : int(res.lengths[slot])].tolist()) for slot, req in self.live.items()]

    def submit(self, row: Row) -> None:
        """Queue a row (checked here: its prompt and tokens must fit the cache)."""
        width = row.prompts.embeds.shape[1]
        if row.max_new > self.out_len or width + row.max_new > self.max_len:
            raise ValueError(f"a row of a {width}-wide prompt and {row.max_new} new tokens does not fit "
                             f"this batcher ({self.max_len} cache positions, {self.out_len} new tokens at most)")
        if row.slot is not None and row.slot not in self.held:
            raise ValueError(f"slot {row.slot} is not held by the caller; reserve() it first")
        self.queue.append(row)

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing decoding."""
        return not self.queue and not self.live

    def _fill(self) -> None:
        """Insert queued rows into slots: one engine call per run of rows sharing a prompt batch."""
        waiting: collections.deque[Row] = collections.deque()
        unpinned = sum(r.slot is None for r in self.queue)
        wave = not self.live or len(self.free) >= min(self.refill, unpinned)  # else free slots wait for more
        while self.queue:
            first = self.queue[0]
            group: list[tuple[Row, int]] = []
            while self.queue and self.queue[0].prompts is first.prompts:
                req = self.queue[0]
                if req.slot is not None:
                    if req.slot in self.live:  # the held slot is still busy with its previous row
                        waiting.append(self.queue.popleft())
                        continue
                    slot = req.slot
                elif self.free and wave:
                    slot = self.free.pop(0)
                else:
                    break
                group.append((self.queue.popleft(), slot))
            if not group:
                break
            self._insert(first.prompts, group)
        self.queue.extendleft(reversed(waiting))

    def _insert(self, prompts: Prompts, group: list[tuple[Row, int]]) -> None:
        k = next_pow2(len(group))  # row buckets; padding repeats the last row (the same writes again)
        padded = group + [group[-1]] * (k - len(group))
        rows = np.array([r.index for r, _ in padded], np.int32)
        ids = np.array([s for _, s in padded], np.int32)
        max_new = np.array([r.max_new for r, _ in padded], np.int32)
        tries = None
        if self.cfg.hotword_edges:
            lists = [r.hotwords or (hw.EMPTY_TRIE, 0.0) for r, _ in padded]
            tries = hw.pack([t for t, _ in lists], [b for _, b in lists], self.cfg.hotword_edges)
        self.state = self.engine.insert(self.state, prompts.embeds, prompts.lengths, ids, max_new, self.settings,
                                        self.cfg, prompts.ids, rows, tries)
        for req, slot in group:
            self.live[slot] = req

    def run(self, max_steps: int | None = None) -> list[Output]:
        """Fill free slots, then step until a row finishes (or ``max_steps``) -> the rows that finished."""
        self._fill()
        if not self.live:
            return []
        done = self.engine.done(self.state)
        if not any(done[s] for s in self.live):
            self.state, steps = self.engine.advance(self.state, self.settings, self.cfg,
                                                    max_steps or self.out_len, until_any_done=True)
            self.steps += steps
            done = self.engine.done(self.state)
        finished = [s for s in self.live if done[s]]
        if not finished:
            return []
        res = self.engine.results(self.state, self.cfg, self.settings)
        out = []
        for slot in finished:
            req = self.live.pop(slot)
            n = int(res.lengths[slot])
            out.append(Output(req, res.tokens[slot, :n].tolist(), res.token_logprobs[slot, :n].tolist(),
                              bool(res.finished[slot]), int(res.steps[slot]), bool(res.looped[slot])))
            if slot not in self.held:
                self.free.append(slot)
        if any(slot not in self.held for slot in finished):
            self.state = self.engine.release(self.state, [s for s in finished if s not in self.held], self.cfg)
        return out

    def drain(self) -> list[Output]:
        """Run until nothing is queued or decoding -> every finished row, in finishing order."""
        out = []
        while not self.idle:
            out += self.run()
        return out
