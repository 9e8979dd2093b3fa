"""What hotword biasing costs per decode step: batch 8, 100 hotwords per row, against the same step unbiased.

Both runs use the engine's slot programs on the same random-weight checkpoint: 8 prompts inserted into 8 slots,
then ``--steps`` decode steps in one ``Engine.advance`` call (EOS suppressed), timed; biased and unbiased
alternate. Every row gets its own 100 hotwords (made-up names and words, each in all the spellings the trie
holds), so the tries have 1000-2000 edges.

    python benchmarks/bench_hotwords.py [--checkpoint DIR | --preset asr-0.6b] [--steps 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np


from qasr_jax.decoding import hotwords as hw  # noqa: E402
from qasr_jax.decoding import search as S  # noqa: E402
from qasr_jax.decoding.buckets import cache_length  # noqa: E402
from bench_slots import cpu_name, random_transcriber  # noqa: E402

SYLLABLES = ["ka", "lo", "mi", "ran", "tes", "vor", "qu", "zel", "pha", "dor", "wen", "jax", "bri", "sul"]


def words(row: int, n: int = 100) -> list[str]:
    """n made-up hotwords (2-4 syllables, capitalised) for a row."""
    rng = np.random.default_rng(row)
    return ["".join(rng.choice(SYLLABLES, rng.integers(2, 5))).capitalize() for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="asr-0.6b")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    asr = random_transcriber(args.preset, args.checkpoint)
    engine, tok = asr.model.engine, asr.tokenizer
    width, hidden = 256, asr.model.config.text.hidden_size
    embeds = jax.device_put(np.random.default_rng(0).standard_normal((args.batch, width, hidden)).astype(np.float32)
                            * 0.02)
    lengths = np.full(args.batch, width - 32, np.int32)
    tries = [hw.build_trie(words(r), tok.encode) for r in range(args.batch)]
    edges = hw.edge_bucket(max(len(t[0]) for t in tries))
    packed = hw.pack(tries, [hw.DEFAULT_BOOST] * args.batch, edges)
    z = S.SearchSettings.make(tok.eos_ids, suppress_eos=True)
    ids = np.arange(args.batch)
    max_new = np.full(args.batch, args.steps + 1)

    def run(cfg, trie) -> float:
        state = engine.new_state(args.batch, cache_length(width, args.steps + 1), cfg, args.steps + 1)
        state = engine.insert(state, embeds, lengths, ids, max_new, z, cfg, tries=trie)
        jax.block_until_ready(state)
        start = time.perf_counter()
        state, steps = engine.advance(state, z, cfg, args.steps, until_any_done=False)
        jax.block_until_ready(state)
        assert steps == args.steps
        return (time.perf_counter() - start) / steps

    plain, biased = S.SearchConfig(tok.endoftext_id), S.SearchConfig(tok.endoftext_id, hotword_edges=edges)
    times: dict[str, list[float]] = {"plain": [], "biased": []}
    for rep in range(args.repeats + 1):  # the first round compiles
        for name, cfg, trie in (("plain", plain, None), ("biased", biased, packed)):
            t = run(cfg, trie)
            if rep:
                times[name].append(t)
    p, b = (statistics.median(times[k]) * 1000 for k in ("plain", "biased"))
    print(f"{cpu_name()}; {args.checkpoint or args.preset}; batch {args.batch}; 100 hotwords per row "
          f"({min(len(t[0]) for t in tries)}-{max(len(t[0]) for t in tries)} trie edges, bucket {edges}); "
          f"decode step {p:.1f} ms plain, {b:.1f} ms biased: +{100 * (b / p - 1):.1f}% "
          f"(median of {args.repeats}, {args.steps} steps each)")


if __name__ == "__main__":
    main()
