"""The engine thread: every request's pieces decode in shared steps over the engine's slots.

HTTP handlers run on the event loop; they hand a prepared ``decoding.request.Request`` with its audio pieces to the
:class:`Scheduler` (``submit`` returns the :class:`Job` that tracks it) and wait for its events. One background
thread owns the model: it feeds new pieces into a :class:`qasr_jax.decoding.pipeline.Pipeline`
(``side_by_side=True``: groups of different cache shapes decode side by side, so a long request never holds up short
ones), encodes whatever arrived together in one batch, and steps every live slot a few tokens at a time, so that new
requests join within about ``STEP_SECONDS`` (the steps per look follow the measured time per step) and streamed
requests get their tokens as they are generated. A job that is cancelled (its client went away) frees its slots at
the next step.

The warm-up compiles only what a first short request needs; every other shape (a longer piece, a burst of rows,
beam search, hotwords, the realtime streams) compiles when first used, and a log line says what compiled for what.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from qasr_jax.decoding.compiles import CompileCount
from qasr_jax.decoding.longform import Piece
from qasr_jax.decoding.pipeline import DEFAULT_KV_BYTES, DecodeOptions, Pipeline, Work, token_budget, token_limit
from qasr_jax.decoding.request import Request
from qasr_jax.io.audio import SAMPLE_RATE
from qasr_jax.server import heap
from qasr_jax.streaming.driver import StreamDriver

log = logging.getLogger("qasr_jax.server")

STEP_SECONDS = 0.1  # decoding between looks at the queue: a new request waits about this long to join
MAX_STEP_TOKENS = 256

WARMUP_SECONDS = 1.0  # the warm-up's clip: the shapes of a short request
# On CPU the server encodes and prefills at most this many pieces per call: at 0.6B each 30 s piece adds ~0.2 GiB
# of activations to such a call (RESULTS "Server readiness and memory"), which is compute-bound on CPU, so more rows
# per call gain nothing; the decode steps still batch every slot. Fewer row counts also mean fewer programs.
CPU_ENCODE_ROWS = 4
_ids = itertools.count()


@dataclasses.dataclass(frozen=True)
class Event:
    """What the engine thread tells a job: ``tokens`` (a streamed piece's ids and log-probabilities so far),
    ``piece`` (a piece is done: its decoder ``Output``), or ``failed`` (``message`` says why)."""

    kind: str
    piece: int = 0
    token_ids: tuple[int, ...] = ()
    token_logprobs: tuple[float, ...] = ()
    output: Any = None
    message: str = ""


@dataclasses.dataclass(eq=False)
class Job:
    """A request in the scheduler's hands: the prepared ``request``, its audio pieces, each piece's token budget
    and the beam size; ``deliver`` is called on the engine thread with each :class:`Event`."""

    request: Request
    pieces: list[Piece]
    budgets: list[int]
    deliver: Callable[[Event], None]
    beam_size: int = 1
    stream: bool = False  # deliver ``tokens`` events (greedy only: a beam's best hypothesis can still change)
    id: int = dataclasses.field(default_factory=lambda: next(_ids))


def _what(new: list[Job], realtime: list[tuple]) -> str:
    """What an engine loop turn worked on, for the log line of what it compiled."""
    parts = [f"a request of {len(j.pieces)} piece(s) of up to {max(p.duration for p in j.pieces):.1f} s"
             f"{f', beam {j.beam_size}' if j.beam_size > 1 else ''}{', hotwords' if j.request.hotwords else ''}"
             for j in new]
    if realtime:
        parts.append("realtime streams")
    return "; ".join(parts) or "the requests decoding (a new cache shape or row count)"


class Scheduler:
    """Drives one Pipeline per beam size from one thread (see the module doc); thread-safe ``submit``/``cancel``."""

    def __init__(self, model, tokenizer, compiles: CompileCount, max_slots: int, realtime_slots: int = 8,
                 step_seconds: float = STEP_SECONDS, kv_bytes: int = DEFAULT_KV_BYTES):
        """``model`` (a loaded model) and ``tokenizer``: what every Pipeline and the streams' driver are made of."""
        self.model, self.tokenizer = model, tokenizer
        self.compiles, self.max_slots, self.step_seconds = compiles, max_slots, step_seconds
        self.kv_bytes = kv_bytes  # KV cache memory the groups of one Pipeline share
        self.seconds_per_step = 0.0  # measured: decode steps run for about step_seconds between looks
        self.pipes: dict[int, Pipeline] = {}
        self.realtime_slots = realtime_slots
        self.driver = None  # the streams' StreamDriver, made when the first realtime utterance opens
        self._rt: list[tuple] = []  # realtime operations waiting for the engine thread
        self.jobs: dict[int, tuple[Job, set[int]]] = {}  # engine thread only: job id -> (job, pieces not done)
        self._cond = threading.Condition()
        self._new: list[Job] = []
        self._gone: list[Job] = []
        self._stop = False
        self.waiting = 0  # pieces waiting for a slot (read by the metrics)
        self.live = 0  # pieces decoding

    # -- any thread -----------------------------------------------------------------------------------------------
    def submit(self, request: Request, pieces: list[Piece], budgets: list[int], deliver: Callable[[Event], None],
               beam_size: int = 1, stream: bool = False) -> Job:
        """Queue the pieces of a prepared ``request`` (each with its token budget) -> the Job that tracks them
        (``cancel`` takes it); events come back through ``deliver``, ``tokens`` events too when ``stream``."""
        job = Job(request, pieces, budgets, deliver, beam_size, stream)
        if pieces:
            self._queue(job)
        return job

    def _queue(self, job: Job) -> None:
        with self._cond:
            self._new.append(job)
            self.waiting += len(job.pieces)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Drop a job (its client went away): its pieces leave the queue and their slots at the next step."""
        with self._cond:
            self._gone.append(job)
            self._cond.notify()

    def realtime(self, op: str, item, samples: np.ndarray | None = None) -> None:
        """Queue a realtime operation on an utterance (``qasr_jax.server.realtime.Item``): "open" its stream,
        "feed" it 16 kHz samples, "commit" it (its Result is delivered), or "close" it (no result)."""
        with self._cond:
            self._rt.append((op, item, samples))
            self._cond.notify()

    def stop(self) -> None:
        """Make ``run`` return once the jobs in flight are done."""
        with self._cond:
            self._stop = True
            self._cond.notify()

    # -- the engine thread ------------------------------------------------------------------------------------------
    def _pipe(self, beam_size: int) -> Pipeline:
        if beam_size not in self.pipes:
            options = DecodeOptions.for_tokenizer(self.tokenizer, beam_size=beam_size)
            rows = CPU_ENCODE_ROWS if jax.default_backend() == "cpu" else None
            self.pipes[beam_size] = Pipeline(self.model, self.tokenizer, options, self.max_slots,
                                             self.kv_bytes, side_by_side=True, encode_rows=rows)
        return self.pipes[beam_size]

    def warm_up(self) -> None:
        """Compile what a first short request needs (greedy, one row): encode a WARMUP_SECONDS clip, insert it into
        a slot, one step, read, release. Everything else compiles when first used (see ``run``)."""
        pipe = self._pipe(1)
        noise = 0.05 * np.random.default_rng(0).standard_normal(int(WARMUP_SECONDS * SAMPLE_RATE))
        work = Work("warm-up", noise.astype(np.float32), token_budget(WARMUP_SECONDS, token_limit(self.model.config)))
        pipe.submit(work)
        pipe.step(max_steps=1)
        pipe.partial()
        pipe.cancel(work.key)
        heap.trim()

    def _busy(self) -> bool:
        return any(p.busy for p in self.pipes.values())

    def run(self) -> None:
        """The engine loop: take new and cancelled jobs, step every busy pipeline, deliver what finished."""
        while True:
            with self._cond:
                while not (self._new or self._gone or self._rt or self._stop or self._busy()):
                    self._cond.wait()
                new, gone, self._new, self._gone = self._new, self._gone, [], []
                rt, self._rt = self._rt, []
                if self._stop and not new and not self.jobs:
                    return
            compiled, seconds = self.compiles.count, self.compiles.seconds
            for job in gone:
                self._drop(job)
            for job in new:
                self._start(job)
            if rt:
                self._realtime(rt)
            for beam, pipe in list(self.pipes.items()):
                if pipe.busy:
                    self._step(beam, pipe)
            if self.compiles.count > compiled:
                heap.trim()  # the compiler's working memory, back before the next compile (server.heap)
                log.info("compiled %d programs (%.1f s) on first use of their shapes, for %s",
                         self.compiles.count - compiled, self.compiles.seconds - seconds, _what(new, rt))
            with self._cond:
                self.waiting = sum(p.waiting for p in self.pipes.values()) + sum(len(j.pieces) for j in self._new)
                self.live = sum(p.live for p in self.pipes.values())

    def _realtime(self, ops: list[tuple]) -> None:
        """Every session's new audio in one ``feed`` (one step for all streams with a complete chunk), then the
        commits in one ``finish``; each utterance's Partial or Result goes back through its ``deliver``."""
        feeds: dict = {}
        ends: dict[str, list] = {"commit": [], "close": []}
        for op, item, samples in ops:
            if op == "open":
                if self.driver is None:  # its KV cache is allocated now, for every realtime slot
                    self.driver = StreamDriver(self.model, self.tokenizer, slots=self.realtime_slots)
                try:
                    item.stream = self.driver.open(item.request)
                except (RuntimeError, ValueError) as e:  # every stream slot taken, or a context too long
                    item.deliver(("failed", item, str(e)))
            elif item.stream is None:
                continue  # its stream could not open: already told
            elif op == "feed":
                feeds.setdefault(item, []).append(samples)
            else:
                ends[op].append(item)
        closed = set(ends["close"])
        try:
            feeds = {item: np.concatenate(parts) for item, parts in feeds.items() if item not in closed}
            if feeds:
                partial = self.driver.feed({item.stream: samples for item, samples in feeds.items()})
                for item in feeds:
                    item.deliver(("partial", item, partial[item.stream]))
            commits = [item for item in ends["commit"] if item not in closed]
            if commits:
                for item, result in zip(commits, self.driver.finish([item.stream for item in commits])):
                    item.deliver(("completed", item, result))
        except Exception as e:  # the engine failed: these utterances end with an error, their slots freed
            log.exception("streaming failed")
            for item in {*feeds, *ends["commit"]}:
                item.deliver(("failed", item, f"streaming failed: {type(e).__name__}: {e}"))
                closed.add(item)
        self.driver.close([item.stream for item in closed])
        for item in closed:  # later operations on a closed utterance are skipped (see above), not fed to the driver
            item.stream = None

    def _start(self, job: Job) -> None:
        pipe = self._pipe(job.beam_size)
        self.jobs[job.id] = (job, set(range(len(job.pieces))))
        for p, (piece, budget) in enumerate(zip(job.pieces, job.budgets)):
            pipe.submit(Work((job.id, p), piece.samples, budget, job.request))

    def _drop(self, job: Job) -> None:
        if self.jobs.pop(job.id, None) is None:
            return  # finished before the client went away
        pipe = self._pipe(job.beam_size)
        for p in range(len(job.pieces)):
            pipe.cancel((job.id, p))

    def _step(self, beam: int, pipe: Pipeline) -> None:
        per_step = self.seconds_per_step or self.step_seconds / 8  # 8 steps until a step has been timed
        steps = max(1, min(MAX_STEP_TOKENS, int(self.step_seconds / per_step)))
        try:
            start, before = time.perf_counter(), pipe.steps
            finished = pipe.step(steps)
            if pipe.steps > before:  # the time per step, smoothed (it includes the encoding of new pieces)
                now = (time.perf_counter() - start) / (pipe.steps - before)
                self.seconds_per_step = now if not self.seconds_per_step else 0.8 * self.seconds_per_step + 0.2 * now
            # Greedy pieces only: a beam's best hypothesis can still change, so beam jobs get their text when done.
            partial = pipe.partial() if beam == 1 and any(j.stream for j, _ in self.jobs.values()) else []
        except Exception as e:  # the engine failed (e.g. out of memory): fail this pipeline's jobs, start afresh
            log.exception("decoding failed")
            del self.pipes[beam]
            for job_id, (job, _) in list(self.jobs.items()):
                if job.beam_size == beam:
                    del self.jobs[job_id]
                    job.deliver(Event("failed", message=f"decoding failed: {type(e).__name__}: {e}"))
            return
        for work, out in finished:
            job_id, p = work.key
            job, left = self.jobs[job_id]
            left.discard(p)
            if not left:
                del self.jobs[job_id]
            job.deliver(Event("piece", p, output=out))
        for work, ids, logprobs in partial:
            job_id, p = work.key
            if job_id in self.jobs and self.jobs[job_id][0].stream:
                self.jobs[job_id][0].deliver(Event("tokens", p, tuple(ids), tuple(logprobs)))
