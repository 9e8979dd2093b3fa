"""Continuous batching against fixed batches: offline transcription whose outputs differ in length.

Both paths run the engine's own programs on the same random-weight checkpoint and the same clips, each clip with
its own max_new_tokens (8 to 128, EOS suppressed so every clip generates exactly its budget):

- fixed: batches of ``--batch`` clips in input order; each batch is encoded, prefilled and decoded in one
  ``Engine.generate`` call, which runs until its longest request is done (what transcription did before slots);
- slots: the Pipeline that ``Transcriber.transcribe`` runs (clips encoded in batches, decoded in ``--batch``
  slots, each slot refilled as soon as its clip is done).

Runs alternate (fixed, slots, fixed, slots, ...) after one warm-up each; RTFx (audio seconds per wall second),
decode steps and the ratio are printed with the CPU model, and the token ids of both paths are checked equal.

    python benchmarks/bench_slots.py [--preset asr-0.6b] [--clips 48] [--seconds 2,8] [--batch 8] [--repeats 2]
                                     [--checkpoint DIR] [--tokens N]

With ``--clips 8 --seconds 3,22 --tokens 32`` it is issue 27's CPU workload (a batch of 8 mixed lengths, 32 tokens
each): the slot pipeline against the fused loop on one batch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time

import numpy as np


import qasr_jax  # noqa: E402
from qasr_jax.decoding import search as S  # noqa: E402
from qasr_jax.decoding.buckets import batch_rows, cache_length, frame_bucket, prompt_width  # noqa: E402
from qasr_jax.decoding.pipeline import DecodeOptions, Pipeline, Work  # noqa: E402
from qasr_jax.io.audio import log_mel_batch  # noqa: E402
from qasr_jax.io.prompts import build_prompt_ids  # noqa: E402
from qasr_jax.testing import speech, synthetic  # noqa: E402


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()} (family {fields.get('CPU family', '?').strip()}), " \
           f"{os.cpu_count()} cores"


def clips(n: int, low: float, high: float, seed: int = 0) -> tuple[list[np.ndarray], list[int]]:
    """n clips of low-high s (espeak speech continued with noise) and a max_new_tokens of 8 to 128 for each."""
    rng = np.random.default_rng(seed)
    base = speech("long_en.wav")
    waves = []
    for i in range(n):
        seconds = float(rng.uniform(low, high))
        tail = synthetic(max(0.0, seconds - base.shape[0] / 16000), i)
        waves.append(np.concatenate([base, tail])[: int(seconds * 16000)])
    return waves, [int(x) for x in rng.integers(8, 129, n)]


def fixed_batches(asr, waves, budgets, batch) -> tuple[list[list[int]], int]:
    """Batches in input order through Engine.generate -> (token ids per clip, decode steps)."""
    model, tok, engine = asr.model, asr.tokenizer, asr.model.engine
    cfg, z = S.SearchConfig(tok.endoftext_id), S.SearchSettings.make(tok.eos_ids, suppress_eos=True)
    out, steps = [], 0
    for start in range(0, len(waves), batch):
        part, want = waves[start:start + batch], budgets[start:start + batch]
        rows = batch_rows(len(part), batch)
        part, want = part + [part[-1]] * (rows - len(part)), want + [want[-1]] * (rows - len(want))
        frames = frame_bucket(max(w.shape[0] // 160 for w in part), model.config.audio)
        feats, valid = log_mel_batch(part, pad_to=frames)
        audio, n_tok = engine.encode(feats, valid)
        prompts = [build_prompt_ids(tok, int(n)) for n in np.asarray(n_tok)]
        width = prompt_width(max(map(len, prompts)))
        ids = np.zeros((rows, width), np.int32)
        for r, p in enumerate(prompts):
            ids[r, : len(p)] = p
        res = engine.generate(engine.embed(ids, audio), [len(p) for p in prompts], want, z, cfg,
                              max_len=cache_length(width, max(want)))
        res = S.SearchResult(*(np.asarray(x) for x in res))
        steps += int(res.steps.max()) - 1  # the prompt's logits give the first token
        out += [res.tokens[r, : res.lengths[r]].tolist() for r in range(min(batch, len(waves) - start))]
    return out, steps


def slots(asr, waves, budgets, batch) -> tuple[list[list[int]], int]:
    """The Pipeline that Transcriber.transcribe runs (continuous batching) -> (token ids per clip, decode steps)."""
    options = DecodeOptions.for_tokenizer(asr.tokenizer, suppress_eos=True)
    pipe = Pipeline(asr.model, asr.tokenizer, options, batch)
    for i, (wave, budget) in enumerate(zip(waves, budgets)):
        pipe.submit(Work(i, wave, budget))
    out: dict[int, list[int]] = {}
    while pipe.busy:
        out.update((work.key, o.token_ids) for work, o in pipe.step())
    return [out[i] for i in range(len(waves))], pipe.steps


def random_checkpoint(preset: str, checkpoint: str | None) -> str:
    """A folder with a random-weight ``preset`` checkpoint and the real tokenizer: ``checkpoint``, saved there (bf16,
    -hf layout) when it holds no model yet, or a temporary one. A folder that has a model is used as it is: its own
    tokenizer is never replaced (the trained tiny-en's ids are not Qwen's)."""
    folder = checkpoint or tempfile.mkdtemp()
    if not os.path.isfile(os.path.join(folder, "config.json")):
        import torch

        from qasr_jax.testing.reference import build_reference, save_hf
        from qasr_jax.testing.tokenizer_files import write_tokenizer

        save_hf(build_reference(qasr_jax.preset(preset), seed=3), folder, dtype=torch.bfloat16)
        write_tokenizer(folder, "hf")
    return folder


def random_transcriber(preset: str, checkpoint: str | None, dtype: str = "float32") -> qasr_jax.Transcriber:
    """A Transcriber of ``random_checkpoint(preset, checkpoint)``."""
    return qasr_jax.Transcriber.from_pretrained(random_checkpoint(preset, checkpoint), dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="asr-0.6b")
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--seconds", default="2,8", help="clip lengths: uniform between these (default 2,8)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--checkpoint", default=None, help="a saved random checkpoint folder (built if absent)")
    parser.add_argument("--tokens", type=int, help="the same max_new_tokens for every clip (bench_all's workload: 32; "
                        "default: 8-128 drawn per clip)")
    args = parser.parse_args()
    asr = random_transcriber(args.preset, args.checkpoint)
    waves, budgets = clips(args.clips, *(float(x) for x in args.seconds.split(",")))
    if args.tokens:
        budgets = [args.tokens] * len(waves)
    audio_s = sum(w.shape[0] for w in waves) / 16000
    print(f"{cpu_name()}; {args.preset}; {args.clips} clips, {audio_s:.1f} s of audio; batch {args.batch}; "
          f"max_new_tokens {min(budgets)}-{max(budgets)} (sum {sum(budgets)})", flush=True)
    times: dict[str, list[float]] = {"fixed": [], "slots": []}
    ids, steps = {}, {}
    for rep in range(args.repeats + 1):  # the first round compiles
        for name, run in (("fixed", fixed_batches), ("slots", slots)):
            start = time.perf_counter()
            ids[name], steps[name] = run(asr, waves, budgets, args.batch)
            if rep:
                times[name].append(time.perf_counter() - start)
        print(f"round {rep}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items() if v), flush=True)
    assert ids["fixed"] == ids["slots"], "the two paths gave different token ids"
    fixed, slotted = (statistics.median(times[k]) for k in ("fixed", "slots"))
    print(f"fixed batches: RTFx {audio_s / fixed:.2f} ({steps['fixed']} decode steps); slots: RTFx "
          f"{audio_s / slotted:.2f} ({steps['slots']} decode steps); slots / fixed = {fixed / slotted:.2f}x; "
          f"token ids equal")


if __name__ == "__main__":
    main()
