"""Throughput at scale (issues 15 and 27, GPU/TPU): audio seconds transcribed per wall second at growing batch
sizes, qasr_jax against transformers ``generate`` on the same card, same random-weight checkpoint and clips.

Every batch size gets ``batch`` clips (times ``--waves``), decoded with ``batch_size=batch`` and EOS suppressed on
both sides, so each clip takes exactly its token budget. Clips are ``--seconds`` long (one frame bucket: one program
pair per batch size) with ``--new-tokens`` each, or with ``--tokens-per-second`` a budget that follows speech
(about 3 tokens per audio second; random weights never stop on their own). ``--mix 2,30`` draws each clip's length
uniformly from 2-30 s instead, its budget following its length: the setting of vLLM's published figures, which
transformers' one ``max_new_tokens`` per call cannot express (its column is left empty there).

Ours: the first pass compiles (reported apart), the second is timed. The reference: one untimed pass at batch 1,
then one timed pass per batch size (``--no-reference`` leaves it out, to save GPU time). ``--quantize int8`` adds
our int8 decoder as a column. ``--preset asr-0.6b,asr-1.7b`` puts the models in one table, one after the other.
Published figures for comparison (Qwen3-ASR technical report, vLLM, ~2-minute clips): 0.6B 2000 audio-s/s online
at concurrency 128, 1190 offline at 256; 1.7B 1219 / 1052.

    python benchmarks/bench_throughput.py --preset asr-0.6b --dtype bfloat16 --batches 1,8,32,128,256
    python benchmarks/bench_throughput.py --seconds 120 --tokens-per-second 3 --batches 256 --no-reference
    python benchmarks/bench_throughput.py --mix 2,30 --tokens-per-second 3 --batches 256 --waves 2 --no-reference
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time

import jax
import numpy as np
import torch

from bench_slots import random_checkpoint  # noqa: E402
from bench_transcribe import machine, reference_run  # noqa: E402
from qasr_jax.decoding.compiles import count_compilations  # noqa: E402
from qasr_jax.modeling.config import preset  # noqa: E402
from qasr_jax.testing.reference import build_reference, save_hf  # noqa: E402
from qasr_jax.testing.tokenizer_files import write_tokenizer  # noqa: E402
from qasr_jax.transcribe import Transcriber  # noqa: E402


def clip_set(count: int, seconds: float | list[float]) -> list[np.ndarray]:
    """``count`` distinct clips of ``seconds`` (one length, or one per clip): noise plus a chirp, each its own seed."""
    lengths = seconds if isinstance(seconds, list) else [seconds] * count
    out = []
    for i, s in enumerate(lengths):
        n = int(s * 16000)
        t = np.arange(n) / 16000
        rng = np.random.default_rng(i)
        out.append((0.3 * np.sin(2 * np.pi * (150 + 30 * i + 300 * t) * t) + 0.05 * rng.standard_normal(n))
                   .astype(np.float32))
    return out


def workload(count: int, args) -> tuple[list[np.ndarray], list[int]]:
    """The clips of one row of the table and each one's token budget."""
    if args.mix:
        low, high = (float(x) for x in args.mix.split(","))
        seconds = [float(s) for s in np.random.default_rng(count).uniform(low, high, count)]
    else:
        seconds = [args.seconds] * count
    if args.tokens_per_second:
        budgets = [max(1, int(np.ceil(args.tokens_per_second * s))) for s in seconds]
    else:
        budgets = [args.new_tokens] * count
    return clip_set(count, seconds), budgets


def checkpoint(name: str, dtype: str, device: torch.device, reference: bool, folder: str | None):
    """A random-weight checkpoint folder of preset ``name`` and (with ``reference``) its transformers model; without
    the reference, ``folder`` is reused when it holds one (``bench_slots.random_checkpoint``)."""
    if not reference:
        return random_checkpoint(name, folder), None
    folder = tempfile.mkdtemp(prefix="bench_throughput_")
    ref = build_reference(preset(name))
    save_hf(ref, folder, dtype=torch.bfloat16)
    write_tokenizer(folder, "official")
    return folder, ref.to(device, getattr(torch, dtype)).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="asr-0.6b", help="asr-0.6b, asr-1.7b or tiny; several comma-separated")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--batches", default="1,8,32,128,256")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--mix", metavar="LOW,HIGH", help="clip lengths drawn uniformly from LOW-HIGH seconds")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--tokens-per-second", type=float, help="token budget per audio second (instead of --new-tokens)")
    ap.add_argument("--waves", type=int, default=1, help="clips per row: this many times the batch size")
    ap.add_argument("--quantize", choices=["int8"], help="also time our int8 decoder")
    ap.add_argument("--no-reference", action="store_true", help="leave transformers out")
    ap.add_argument("--checkpoint", help="without the reference: a random checkpoint folder to reuse (one preset)")
    ap.add_argument("--torch-device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    presets = args.preset.split(",")
    for name in presets:
        preset(name)  # an unknown name fails here, before any model is built
    reference = not args.no_reference and not args.mix
    device = torch.device(args.torch_device)
    columns = ["qasr_jax"] + ([f"qasr_jax {args.quantize}"] if args.quantize else [])
    length = f"clips of {args.mix.replace(',', '-')} s" if args.mix else f"clips of {args.seconds:g} s"
    budget = (f"{args.tokens_per_second:g} new tokens per audio second" if args.tokens_per_second
              else f"{args.new_tokens} new tokens each")
    print(f"machine: {machine(device)}")
    print(f"random weights, {args.dtype}; {length}, {budget} (EOS suppressed), {args.waves} batch(es) of clips per "
          f"row; audio-seconds per second\n")
    print("| model | batch | clips | audio s | transformers | " + " | ".join(columns) + " | speed-up | our compile s |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(columns) + "---:|---:|", flush=True)
    for name in presets:
        folder, ref = checkpoint(name, args.dtype, device, reference, args.checkpoint if len(presets) == 1 else None)
        ours = [Transcriber.from_pretrained(folder, dtype=args.dtype)]
        if args.quantize:
            ours.append(Transcriber.from_pretrained(folder, dtype=args.dtype, quantize=args.quantize))
        tok = ours[0].tokenizer
        if reference:
            from transformers.models.qwen3_asr import Qwen3ASRFeatureExtractor

            fe = Qwen3ASRFeatureExtractor()
            reference_run(ref, preset(name), fe, tok, clip_set(1, args.seconds), 1, args.new_tokens)  # warm-up
        for batch in batches:
            waves, budgets = workload(batch * args.waves, args)
            audio_s = sum(w.shape[0] for w in waves) / 16000
            ref_s = (reference_run(ref, preset(name), fe, tok, waves, batch, budgets[0])
                     if reference and len(set(budgets)) == 1 else None)
            rates, compile_s = [], 0.0
            for asr in ours:
                with count_compilations() as c:
                    asr.transcribe(waves, max_new_tokens=budgets, batch_size=batch, suppress_eos=True)
                compile_s += c.seconds
                start = time.perf_counter()
                asr.transcribe(waves, max_new_tokens=budgets, batch_size=batch, suppress_eos=True)
                rates.append(audio_s / (time.perf_counter() - start))
            ref_col = f"{audio_s / ref_s:.1f}" if ref_s else ""
            speedup = f"{rates[0] * ref_s / audio_s:.2f}x" if ref_s else ""
            print(f"| {name} | {batch} | {len(waves)} | {audio_s:.0f} | {ref_col} | "
                  + " | ".join(f"{r:.1f}" for r in rates) + f" | {speedup} | {compile_s:.1f} |", flush=True)
        del ours, ref
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\njax {jax.__version__} on {jax.devices()[0].device_kind}")


if __name__ == "__main__":
    main()
