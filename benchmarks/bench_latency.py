"""Latency through the server (issue 27): the time from sending a 10 s clip to its first streamed
``transcript.text.delta``, with 1, 16 and 128 clients sending at once, and the throughput of each wave.

Starts ``qasr-jax serve`` on a free loopback port with a random-weight checkpoint (``--max-slots`` = the largest
client count), then for each client count: one untimed wave (compiles what the warm-up left out), then
``--repeats`` timed waves, each of ``clients`` threads that send the same 10 s clip (a little noise apart) as a
streamed request of ``--new-tokens`` tokens at the same moment. Reported: p50 / p95 of the first delta, p50 of the
whole request, and audio seconds per second of the wave. vLLM's published figures (Qwen3-ASR-0.6B): 92 ms to the
first token at concurrency 1, 2000 audio-s/s online at 128.

    python benchmarks/bench_latency.py --preset tiny --clients 1,4 --repeats 1 --dtype float32   # smoke run on CPU
    python benchmarks/bench_latency.py --preset asr-0.6b --clients 1,16,128                      # GPU, bf16
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import tempfile
import threading
import time

import numpy as np
import openai

from bench_server import cpu_name, wav  # noqa: E402
from bench_slots import random_checkpoint  # noqa: E402
from bench_throughput import clip_set  # noqa: E402
from qasr_jax.testing.serving import Served  # noqa: E402


def streamed(client, audio: bytes, new: int, start: threading.Barrier) -> tuple[float, float]:
    """One streamed request sent when every client is ready -> (seconds to the first delta, to the end)."""
    start.wait()
    t0 = time.perf_counter()
    first = None
    stream = client.audio.transcriptions.create(file=("clip.wav", audio), model="bench", stream=True,
                                                extra_body={"max_new_tokens": new})
    for event in stream:
        if first is None and event.type == "transcript.text.delta":
            first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError("a streamed request sent no delta (an empty transcript); raise --new-tokens")
    return first, time.perf_counter() - t0


def wave(client, files: list[bytes], new: int) -> tuple[list[float], list[float], float]:
    """Every file sent at once, one thread each -> (first-delta seconds, request seconds, wall seconds)."""
    barrier = threading.Barrier(len(files))
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(files)) as pool:
        got = list(pool.map(lambda f: streamed(client, f, new, barrier), files))
    return [g[0] for g in got], [g[1] for g in got], time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="asr-0.6b", choices=["asr-0.6b", "asr-1.7b", "tiny"])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--clients", default="1,16,128", help="client counts, comma-separated")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed waves per client count")
    ap.add_argument("--checkpoint", default=None, help="a saved random checkpoint folder (built if absent)")
    args = ap.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    root = tempfile.mkdtemp(prefix="bench-latency-")
    folder = random_checkpoint(args.preset, args.checkpoint)
    files = [wav(w) for w in clip_set(max(counts), args.seconds)]
    print(f"{cpu_name()}; {args.preset} random weights, {args.dtype}; streamed {args.seconds:g} s clips, "
          f"{args.new_tokens} new tokens each; server with {max(counts)} slots\n")
    # The warm-up compiles every shape up to --max-audio-seconds: only those of these clips (no realtime streams).
    served = Served(folder, "--dtype", args.dtype, "--max-slots", str(max(counts)), "--max-queue", "4096",
                    "--max-audio-seconds", f"{args.seconds:g}", "--realtime-slots", "0",
                    "--served-model-name", "bench", log=os.path.join(root, "server.log"))
    try:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=3600)
        print("| clients | first delta p50 ms | p95 ms | request p50 ms | audio-s/s |")
        print("|---:|---:|---:|---:|---:|", flush=True)
        for n in counts:
            wave(client, files[:n], args.new_tokens)  # compiles the row counts the warm-up left out
            firsts, totals, walls = [], [], 0.0
            for _ in range(args.repeats):
                f, t, w = wave(client, files[:n], args.new_tokens)
                firsts, totals, walls = firsts + f, totals + t, walls + w
            print(f"| {n} | {1e3 * np.percentile(firsts, 50):.0f} | {1e3 * np.percentile(firsts, 95):.0f} | "
                  f"{1e3 * np.percentile(totals, 50):.0f} | {n * args.repeats * args.seconds / walls:.1f} |",
                  flush=True)
        print(f"\ncompilations in the server (warm-up included): {served.gauge('qasr_compilations'):.0f}")
    finally:
        served.stop()


if __name__ == "__main__":
    main()
