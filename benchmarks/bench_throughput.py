"""Throughput at scale (issue 15, GPU/TPU): audio seconds transcribed per wall second at growing batch sizes,
qasr_jax against transformers ``generate`` on the same card, same random-weight checkpoint and clips.

Every batch size gets ``batch`` clips of ``--seconds`` each (one frame bucket, so one program pair per batch size),
``--new-tokens`` tokens each with EOS suppressed on both sides. Ours: the first pass compiles (reported apart), the
second is timed. The reference: one untimed pass at batch 1, then one timed pass per batch size. ``--quantize
int8`` adds our int8 decoder as a third column. The published vLLM figures for comparison (Qwen3-ASR model card):
0.6B 2000 audio-s/s online at concurrency 128, 1190 offline at 256; 1.7B 1220 online at 128.

    python benchmarks/bench_throughput.py --preset asr-0.6b --dtype bfloat16 --batches 1,8,32,128,256
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np
import torch


from bench_transcribe import machine, reference_run  # noqa: E402
from qasr_jax.compiles import count_compilations  # noqa: E402
from qasr_jax.config import preset  # noqa: E402
from qasr_jax.transcribe import Transcriber  # noqa: E402
from qasr_jax.testing.reference import build_reference, save_hf  # noqa: E402
from qasr_jax.testing.tokenizer_files import write_tokenizer  # noqa: E402


def clip_set(count: int, seconds: float) -> list[np.ndarray]:
    """``count`` distinct clips of ``seconds``: noise plus a chirp, each with its own seed."""
    n = int(seconds * 16000)
    t = np.arange(n) / 16000
    out = []
    for i in range(count):
        rng = np.random.default_rng(i)
        out.append((0.3 * np.sin(2 * np.pi * (150 + 30 * i + 300 * t) * t) + 0.05 * rng.standard_normal(n))
                   .astype(np.float32))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="asr-0.6b", choices=["asr-0.6b", "asr-1.7b", "tiny"])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--batches", default="1,8,32,128,256")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--quantize", choices=["int8"], help="also time our int8 decoder")
    ap.add_argument("--torch-device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    cfg = preset(args.preset)
    folder = tempfile.mkdtemp(prefix="bench_throughput_")
    ref = build_reference(cfg)
    save_hf(ref, folder, dtype=torch.bfloat16)
    write_tokenizer(folder, "official")
    device = torch.device(args.torch_device)
    ref = ref.to(device, getattr(torch, args.dtype)).eval()
    from transformers.models.qwen3_asr import Qwen3ASRFeatureExtractor

    fe = Qwen3ASRFeatureExtractor()
    ours = {"qasr_jax": Transcriber.from_pretrained(folder, dtype=args.dtype)}
    if args.quantize:
        ours[f"qasr_jax {args.quantize}"] = Transcriber.from_pretrained(folder, dtype=args.dtype, quantize=args.quantize)
    tok = ours["qasr_jax"].tokenizer
    print(f"machine: {machine(device)}")
    print(f"model: {args.preset} random weights, {args.dtype}; clips of {args.seconds} s, {args.new_tokens} new tokens "
          f"each (EOS suppressed); audio-seconds per second\n")
    print("| batch | transformers | " + " | ".join(ours) + " | speed-up | our compile s |")
    print("|---|---:|" + "---:|" * len(ours) + "---:|---:|", flush=True)
    reference_run(ref, cfg, fe, tok, clip_set(1, args.seconds), 1, args.new_tokens)  # warm-up
    for batch in batches:
        waves = clip_set(batch, args.seconds)
        audio_s = batch * args.seconds
        ref_s = reference_run(ref, cfg, fe, tok, waves, batch, args.new_tokens)
        rates, compile_s = [], 0.0
        for asr in ours.values():
            with count_compilations() as c:
                asr.transcribe(waves, max_new_tokens=args.new_tokens, batch_size=batch, suppress_eos=True)
            compile_s += c.seconds
            start = time.perf_counter()
            asr.transcribe(waves, max_new_tokens=args.new_tokens, batch_size=batch, suppress_eos=True)
            rates.append(audio_s / (time.perf_counter() - start))
        print(f"| {batch} | {audio_s / ref_s:.1f} | " + " | ".join(f"{r:.1f}" for r in rates)
              + f" | {rates[0] * ref_s / audio_s:.2f}x | {compile_s:.1f} |", flush=True)
    print(f"\njax {jax.__version__} on {jax.devices()[0].device_kind}")


if __name__ == "__main__":
    main()
