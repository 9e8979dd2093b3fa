"""Forced-alignment throughput: qasr_jax vs the PyTorch reference, in aligned seconds of audio per wall second.

Both sides get the same random-weight checkpoint (preset "aligner-0.6b": the real ForcedAligner-0.6B shapes;
``--quick``: the tiny test preset), the same espeak-ng clips and transcripts (tests/data), float32, batch 1 and 8,
in the same run. Every row aligns the same 8 clips (hello, zh, long cycled: 30.6 s of audio), in calls of
``batch`` clips. Each side does the whole job from waveform to word times:

- reference: transformers' ``Qwen3ASRProcessor`` on the official toolkit's input string (features, ids, padding),
  ``Qwen3ASRForTokenClassification`` forward, ``decode_forced_alignment`` (argmax, repair, seconds);
- qasr_jax: ``Aligner.align_batch`` (log-mel, ids, one jitted bucketed pass, repair, seconds); compilation is
  done in a warm-up call and reported on its own.

    python benchmarks/bench_aligner.py [--quick] [--repeats N] [--threads N]

The full preset peaks at about 15 GB of RAM (float32 weights in torch, in JAX and while saving) and takes about
15 minutes on 2 CPU cores (building the weights, compiling and timing included).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import tempfile
import time


CLIPS = [  # file in tests/data, transcript, language
    ("hello_en.wav", "Hello world", "English"),
    ("zh.wav", "你好，世界", "Chinese"),
    ("long_en.wav", "The quick brown fox jumps over the lazy dog. Speech recognition turns spoken words into text, "
     "and the encoder looks at eight seconds at once.", "English"),
]


def machine() -> str:
    import jax
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return (f"{cpu}; {os.cpu_count()} cores visible; torch {torch.__version__} ({torch.get_num_threads()} threads); "
            f"jax {jax.__version__} on {jax.default_backend()} ({devices})")


def config(quick: bool):
    from qasr_jax.modeling.config import preset

    if not quick:
        return preset("aligner-0.6b")
    cfg = preset("tiny")  # the test suite's tiny model with the aligner's head
    text = dataclasses.replace(cfg.text, tie_word_embeddings=False, vocab_size=152064)
    return dataclasses.replace(cfg, text=text, num_labels=5000)


def clips(size: int):
    """``size`` clips cycling through CLIPS: (waves, texts, languages)."""
    from qasr_jax.testing import speech

    picked = [CLIPS[i % len(CLIPS)] for i in range(size)]
    return [speech(f) for f, _, _ in picked], [t for _, t, _ in picked], [lang for _, _, lang in picked]


def reference_align(model, processor, waves, texts, languages):
    """The reference pipeline end to end: per-sample word dicts with start_time / end_time."""
    import torch

    inputs, word_lists = [], []
    for text, lang in zip(texts, languages):
        words = processor.split_words_for_alignment(text, lang)
        word_lists.append(words)
        inputs.append("<|audio_start|><|audio_pad|><|audio_end|>" + "<timestamp><timestamp>".join(words)
                      + "<timestamp><timestamp>")
    batch = processor(text=inputs, audio=waves, return_tensors="pt", padding=True)
    with torch.inference_mode():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       input_features=batch["input_features"],
                       input_features_mask=batch["input_features_mask"]).logits
    return processor.decode_forced_alignment(logits, batch["input_ids"], word_lists,
                                             model.config.timestamp_token_id)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny test model instead of the 0.6B shapes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer
    from transformers.models.qwen3_asr import Qwen3ASRFeatureExtractor, Qwen3ASRProcessor

    from qasr_jax.aligner import Aligner
    from qasr_jax.testing.reference import build_reference, save_hf
    from qasr_jax.testing.tokenizer_files import write_tokenizer

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    cfg = config(args.quick)
    name = "tiny aligner" if args.quick else "aligner-0.6b"
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model = build_reference(cfg, seed=0)
        folder = save_hf(model, os.path.join(tmp, "aligner"))
        write_tokenizer(folder, "official")
        print(f"built and saved the random {name} in {time.perf_counter() - t0:.1f} s", flush=True)
        processor = Qwen3ASRProcessor(feature_extractor=Qwen3ASRFeatureExtractor(),
                                      tokenizer=AutoTokenizer.from_pretrained(folder))
        aligner = Aligner.from_pretrained(folder)

        waves, texts, langs = clips(8)
        seconds = sum(len(w) for w in waves) / 16000
        rows = []
        for size in [int(b) for b in args.batches.split(",")]:
            calls = [slice(i, i + size) for i in range(0, len(waves), size)]

            def ours():
                for c in calls:
                    aligner.align_batch(waves[c], texts[c], langs[c], batch_size=size)

            def ref():
                for c in calls:
                    reference_align(model, processor, waves[c], texts[c], langs[c])

            t0 = time.perf_counter()
            ours()  # compiles this batch size's shapes
            compile_s = time.perf_counter() - t0
            ref()  # warm-up
            t_ours, t_ref = timed(ours, args.repeats), timed(ref, args.repeats)
            rows.append((size, seconds, t_ref, t_ours, compile_s))
            print(f"batch {size}: reference {t_ref:.3f} s, qasr_jax {t_ours:.3f} s", flush=True)

    print(f"\n{name}, float32, median of {args.repeats}; {machine()}\n")
    print("| batch | audio (s) | reference (s) | qasr_jax (s) | reference audio-s/s | qasr_jax audio-s/s "
          "| speed-up | qasr_jax first pass, compiling (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for size, seconds, t_ref, t_ours, compile_s in rows:
        print(f"| {size} | {seconds:.2f} | {t_ref:.3f} | {t_ours:.3f} | {seconds / t_ref:.2f} | {seconds / t_ours:.2f} "
              f"| {t_ref / t_ours:.2f}x | {compile_s:.1f} |")


if __name__ == "__main__":
    main()
