"""Streaming: per-chunk latency against stream position, one stream and many in one driver, and the re-feed loop.

One random-weight checkpoint (tests/reference.py, saved in bfloat16 and loaded in float32, the real tokenizer
beside it) and one long track: espeak-ng speech (tests/data) joined by pauses, its loudness varying from clip to
clip (so the log-mel floor moves and kept windows get re-encoded now and then). Each stream reads the track from
its own offset.

- streams: one stream in a one-slot driver, fed chunk by chunk to the last ``--minutes`` position; side by side
  with it (a step of each in turn, so both see the same machine), the other ``--streams`` counts, each in a driver
  of that many slots, up to ``--many-minutes``. Every step's wall time is recorded: the latency each stream of the
  step sees for its chunk. Before timing, a warm-up run of each driver compiles its programs; steps that still
  compile are reported and left out of the percentiles.
- re-feed: what the official toolkit does per chunk, timed when the single stream reaches minute m
  (``--refeed-at``): the log-mel and encoder over all m minutes of audio, and a fresh prefill of the whole prompt
  (all audio tokens, and the stream's transcript so far as the prefix), then greedy decoding; the call after a
  first one that compiles.

Random weights never emit EOS, so every chunk decodes ``--max-new-tokens`` tokens and the transcript grows by
(max_new_tokens - 5) tokens a chunk. The default 12 makes both realistic for English speech (a chunk rewrites the
5 rolled-back tokens and adds about 7, 3.5 tokens a second); 32 (the official example's cap) runs every chunk to
the cap and grows the transcript 4x faster than speech does.

``--stages`` also times each step's programs (log-mel, encoder, embedding, prefill, decode loop, slot release)
by waiting for each one's result; what is left is host work (tokenizing, bookkeeping, copies).

``--capacity 32,64,128,256``: how many concurrent streams stay real time (issue 27). For each count, a driver of
that many slots steps every stream's 2 s chunk together for ``--capacity-seconds`` of audio; a step answers every
stream's chunk, so the streams keep up when the step's p95 wall time is under the chunk length (each chunk answered
before the next is due). Counts are tried in order, up to the first that falls behind. NeMo's figure for
comparison: 240 streams per H100 for its streaming model.

Machine load (load average and the CPU other processes took during each step, from /proc) is recorded with every
step: on a shared machine compare rows of the same run only.

    python benchmarks/bench_stream.py [--minutes 1,5,10,30] [--streams 1,8] [--refeed-at 1,5] [--out FILE]
    python benchmarks/bench_stream.py --preset tiny --minutes 1 --refeed-at 1    # a smoke run
    python benchmarks/bench_stream.py --dtype bfloat16 --capacity 32,64,128,256   # streams in real time (GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import numpy as np
import soundfile as sf


from bench_core import OthersMeter, cpu_model, make_checkpoint  # noqa: E402
from qasr_jax.streaming import audio as stream_audio  # noqa: E402
from qasr_jax.decoding import search as S  # noqa: E402
from qasr_jax.decoding.buckets import frame_bucket, output_buffer, prompt_width  # noqa: E402
from qasr_jax.decoding.compiles import count_compilations  # noqa: E402
from qasr_jax.io.audio import log_mel_batch, n_frames  # noqa: E402
from qasr_jax.modeling.config import preset  # noqa: E402
from qasr_jax.streaming.prompts import prompt_parts, rollback_prefix  # noqa: E402
from qasr_jax.testing.tokenizer_files import write_tokenizer  # noqa: E402
from qasr_jax.transcribe import Transcriber  # noqa: E402

SR = 16000
DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data")
STREAM_OFFSET = 7.3  # seconds between the starts of successive streams in the track


def track(seconds: float, seed: int = 0) -> np.ndarray:
    """Speech clips in random order and loudness (gain 0.2-1.0), each followed by a 0.4-1.2 s pause."""
    rng = np.random.default_rng(seed)
    clips = [sf.read(os.path.join(DATA, f), dtype="float32")[0] for f in ("long_en.wav", "hello_en.wav", "zh.wav")]
    parts, total = [], 0
    while total < seconds * SR:
        clip = clips[rng.integers(len(clips))] * rng.uniform(0.2, 1.0)
        pause = np.zeros(int(rng.uniform(0.4, 1.2) * SR), np.float32)
        parts += [clip.astype(np.float32), pause]
        total += clip.shape[0] + pause.shape[0]
    return np.concatenate(parts)[: int(seconds * SR)]


STAGES = {"encode": "encoder", "embed": "embed", "insert": "prefill", "advance": "decode", "release": "release"}


def time_stages(engine) -> dict[str, float]:
    """Wrap the engine's programs (and the streams' log-mel) so that each waits for its result and adds its wall
    time in ms to the returned dict, under its stage's name."""
    spent: dict[str, float] = {}

    def timed(fn, name):
        def run(*a, **k):
            t = time.perf_counter()
            out = jax.block_until_ready(fn(*a, **k))
            spent[name] = spent.get(name, 0.0) + (time.perf_counter() - t) * 1e3
            return out
        return run

    for method, name in STAGES.items():
        setattr(engine, method, timed(getattr(engine, method), name))
    stream_audio.log10_mel_padded_jit = timed(stream_audio.log10_mel_padded_jit, "log-mel")
    return spent


class Run:
    """``n`` streams in a driver of ``n`` slots, each reading the track from its own offset, stepped chunk by chunk:
    every step's wall time (the latency each stream sees for that chunk), compilations and machine load."""

    def __init__(self, asr, audio: np.ndarray, n: int, args, out, stages: dict | None = None):
        self.audio, self.n, self.args, self.out, self.stages = audio, n, args, out, stages
        self.label = f"{n} stream{'s' * (n > 1)}"
        self.size = round(args.chunk_seconds * SR)
        self.driver = asr.stream_driver(slots=n, segment_seconds=args.segment_seconds,
                                        max_new_tokens=max(32, args.max_new_tokens))
        warm = self._start()  # compiles the driver's programs: a segment and a half of every stream
        with count_compilations() as compiled:
            t0 = time.perf_counter()
            for k in range(int(1.5 * args.segment_seconds / args.chunk_seconds)):
                self.driver.feed({s: self._chunk(i, k) for i, s in enumerate(warm)})
        print(f"[{self.label}] warm-up: {compiled.count} compilations, {compiled.seconds:.0f} s compiling, "
              f"{time.perf_counter() - t0:.0f} s in all", flush=True)
        self.driver.close(warm)
        self.streams, self.rows, self.text, self.k = self._start(), [], "", 0
        self.meter = OthersMeter()

    def _start(self):
        return [self.driver.stream(chunk_seconds=self.args.chunk_seconds, max_new_tokens=self.args.max_new_tokens)
                for _ in range(self.n)]

    def _chunk(self, i: int, k: int) -> np.ndarray:
        at = int(i * STREAM_OFFSET * SR) + k * self.size
        return self.audio[at : at + self.size]

    @property
    def position(self) -> float:
        """Seconds of audio each stream has been fed."""
        return round(self.k * self.args.chunk_seconds, 3)

    def step(self) -> None:
        """One chunk for every stream, timed."""
        inputs = {s: self._chunk(i, self.k) for i, s in enumerate(self.streams)}
        if self.stages is not None:
            self.stages.clear()
        self.meter.start()
        with count_compilations() as compiled:
            t = time.perf_counter()
            partials = self.driver.feed(inputs)
            ms = (time.perf_counter() - t) * 1e3
        self.k += 1
        self.text = partials[self.streams[0]].text
        row = {"run": self.label, "streams": self.n, "position": self.position, "ms": round(ms, 1),
               "compiles": compiled.count, "others": round(self.meter.stop(), 2), "load": os.getloadavg()[0],
               "segments": len(self.streams[0]._state.committed)}
        if self.stages is not None:
            row["stages"] = {k: round(v, 1) for k, v in self.stages.items()}
        self.rows.append(row)
        self.out.write(json.dumps(row) + "\n")
        self.out.flush()
        if self.position % 60 == 0:
            print(f"[{self.label}] minute {self.position / 60:g}: {ms:.0f} ms, load {row['load']:.1f}", flush=True)

    def close(self) -> None:
        """End the streams and drop the driver's cache."""
        self.driver.close(self.streams)
        self.driver = None


def refeed_once(asr, audio: np.ndarray, text: str, max_new: int) -> tuple[float, int]:
    """One chunk of the official loop on ``audio`` with ``text`` as the transcript so far -> (ms, prompt tokens)."""
    tok, engine, cfg = asr.tokenizer, asr.model.engine, asr.model.config
    t = time.perf_counter()
    feats, valid = log_mel_batch([audio], pad_to=frame_bucket(n_frames(audio.shape[0]), cfg.audio))
    embeds, n_tokens = engine.encode(feats, valid)
    head, after = prompt_parts(tok, "", None, rollback_prefix(tok, text, 5))
    ids = head + [tok.audio_pad_id] * int(n_tokens[0]) + after
    width = prompt_width(len(ids))
    padded = np.full((1, width), tok.endoftext_id, np.int32)
    padded[0, : len(ids)] = ids
    res = engine.generate(engine.embed(padded, embeds), [len(ids)], [max_new], S.SearchSettings.make(tok.eos_ids),
                          S.SearchConfig(tok.endoftext_id), max_len=width + output_buffer(max_new))
    np.asarray(res.tokens)
    return (time.perf_counter() - t) * 1e3, len(ids)


def percentiles(rows, minute: int) -> tuple[float, float, int, float] | None:
    """(p50, p95, steps, mean load) of the steps whose chunk ends in minute ``minute`` (compiling steps left out)."""
    sel = [r for r in rows if (minute - 1) * 60 < r["position"] <= minute * 60]
    ms = [r["ms"] for r in sel if r["compiles"] == 0]
    if not ms:
        return None
    return (statistics.median(ms), float(np.percentile(ms, 95)), len(ms),
            statistics.mean(r["load"] for r in sel))


def capacity(asr, args, out) -> None:
    """The capacity table: per stream count, the p50 / p95 step wall time and whether the streams keep up."""
    counts = [int(n) for n in args.capacity.split(",")]
    audio = track(args.capacity_seconds + STREAM_OFFSET * max(counts) + 2 * args.segment_seconds)
    budget = 1e3 * args.chunk_seconds
    print(f"{cpu_model()}; {jax.devices()[0].device_kind}; preset {args.preset}, {args.dtype}; chunk "
          f"{args.chunk_seconds} s, max_new_tokens {args.max_new_tokens}, {args.capacity_seconds:g} s per stream")
    print(f"\n| streams | p50 ms | p95 ms | steps | real time (p95 < {budget:.0f} ms) |\n|---:|---:|---:|---:|---|")
    kept = 0
    for n in counts:
        run = Run(asr, audio, n, args, out)
        while run.position < args.capacity_seconds:
            run.step()
        run.close()
        ms = [r["ms"] for r in run.rows if r["compiles"] == 0]
        p95 = float(np.percentile(ms, 95))
        print(f"| {n} | {statistics.median(ms):.0f} | {p95:.0f} | {len(ms)} | {'yes' if p95 < budget else 'no'} |",
              flush=True)
        if p95 >= budget:
            break
        kept = n
    print(f"\nstreams kept in real time: {kept} (of the counts tried)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="asr-0.6b", choices=["asr-0.6b", "tiny"])
    ap.add_argument("--checkpoint", help="folder for the random-weight checkpoint (reused when it exists)")
    ap.add_argument("--minutes", default="1,5,10,30", help="stream positions to report (the run goes to the last)")
    ap.add_argument("--streams", default="1,8", help="stream counts, each run in a driver of that many slots")
    ap.add_argument("--many-minutes", type=float, default=None,
                    help="how far the runs of more than one stream go (default: as far as one stream)")
    ap.add_argument("--refeed-at", default="1,5", help="minutes at which to time the re-feed loop ('' for none)")
    ap.add_argument("--chunk-seconds", type=float, default=2.0)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--segment-seconds", type=float, default=20.0)
    ap.add_argument("--stages", action="store_true", help="time each step's programs too")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--capacity", metavar="COUNTS", help="only the capacity table, for these stream counts")
    ap.add_argument("--capacity-seconds", type=float, default=60.0, help="audio each capacity run streams")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "bench_stream.jsonl"),
                    help="every step as a JSON line (appended as it runs)")
    args = ap.parse_args()
    minutes = [int(m) for m in args.minutes.split(",")]
    counts = [int(n) for n in args.streams.split(",")]
    refeed_at = [int(m) for m in args.refeed_at.split(",") if m]

    folder = args.checkpoint or os.path.join(tempfile.gettempdir(), f"qasr_bench_stream_{args.preset}")
    if not os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        print(f"building the random-weight checkpoint in {folder} ...", flush=True)
        make_checkpoint(preset(args.preset), folder)
        write_tokenizer(folder, "official")
    asr = Transcriber.from_pretrained(folder, dtype=args.dtype)
    if args.capacity:
        with open(args.out, "a") as out:
            capacity(asr, args, out)
        return
    stages = time_stages(asr.model.engine) if args.stages else None
    longest = max(minutes) * 60
    audio = track(longest + STREAM_OFFSET * max(counts) + 2 * args.segment_seconds)
    print(f"{cpu_model()}; {os.cpu_count()} cores; preset {args.preset}; chunk {args.chunk_seconds} s, "
          f"max_new_tokens {args.max_new_tokens}, segment {args.segment_seconds} s", flush=True)

    out = open(args.out, "a")
    single = Run(asr, audio, 1, args, out, stages)
    many = {n: Run(asr, audio, n, args, out, stages) for n in counts if n > 1}
    many_until = (args.many_minutes or max(minutes)) * 60
    refeeds = {}
    while single.position < longest:
        single.step()
        for run in list(many.values()):  # side by side with the single stream, one step each in turn
            if run.driver is not None:
                run.step()
                if run.position >= many_until:
                    run.close()
        minute = single.position / 60
        if minute in refeed_at:  # the official loop's chunk at this position, under the same load
            if minute == max(refeed_at):
                for run in many.values():  # its prompt needs the memory
                    if run.driver is not None:
                        run.close()
            clip = audio[: int(single.position * SR)]
            first, _ = refeed_once(asr, clip, single.text, args.max_new_tokens)  # compiles
            ms, tokens = refeed_once(asr, clip, single.text, args.max_new_tokens)
            refeeds[int(minute)] = ms
            out.write(json.dumps({"run": "refeed", "minute": minute, "ms": round(ms, 1), "first_ms": round(first),
                                  "prompt": tokens, "load": os.getloadavg()[0]}) + "\n")
            print(f"re-feed at minute {minute:g}: {ms:.0f} ms ({tokens} prompt tokens; first call {first:.0f} ms)",
                  flush=True)
    out.close()
    runs = {1: single, **many}

    print("\n| streams | minute | p50 ms | p95 ms | steps | load | re-feed ms (1 stream) |")
    print("|---|---|---|---|---|---|---|")
    for n in counts:
        for m in minutes:
            stats = percentiles(runs[n].rows, m)
            if stats is None:
                continue
            p50, p95, steps, load = stats
            rf = f"{refeeds[m]:.0f} ({refeeds[m] / p50:.1f}x p50)" if n == 1 and m in refeeds else ""
            print(f"| {n} | {m} | {p50:.0f} | {p95:.0f} | {steps} | {load:.1f} | {rf} |")
    if stages is not None:
        print("\nmean ms per step (steps without compiling):")
        for n, run in runs.items():
            steady = [r for r in run.rows if r["compiles"] == 0]
            mean = {k: statistics.mean(r["stages"].get(k, 0.0) for r in steady) for k in
                    ("log-mel", *STAGES.values())}
            mean["host"] = statistics.mean(r["ms"] for r in steady) - sum(mean.values())
            print(f"  {n} stream(s): " + ", ".join(f"{k} {v:.0f}" for k, v in mean.items()))
    compiling = sum(r["compiles"] > 0 for run in runs.values() for r in run.rows)
    print(f"\nsteps that compiled after the warm-up (left out above): {compiling}; every step in {args.out}")


if __name__ == "__main__":
    main()
