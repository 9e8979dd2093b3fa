"""End-to-end transcription speed: qasr_jax vs the transformers reference, same checkpoint, clips and machine.

RTFx = seconds of audio / seconds of wall time, waveforms in and token ids out (features, encoder, prompt,
greedy decoding of exactly ``--new-tokens`` tokens with EOS suppressed on both sides), at batch 1 and batch 8,
in ``--dtype`` (float32 by default) on both sides. On a GPU both run there: the reference on ``cuda``, ours with
the Pallas attention kernel (``attention_impl="auto"``). qasr_jax's compile time is reported apart, and a second
set of clips with new lengths (inside the same buckets) is timed while counting compilations, which must stay at
zero.

    python benchmarks/bench_transcribe.py            # random-weight ASR-0.6B (about 7 GB of RAM for both)
    python benchmarks/bench_transcribe.py --quick    # the tiny test config, for a smoke run
    python benchmarks/bench_transcribe.py --dtype bfloat16    # on a GPU host
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import jax
import numpy as np
import soundfile as sf
import torch


from qasr_jax.decoding.compiles import count_compilations  # noqa: E402
from qasr_jax.io.prompts import build_prompt_ids  # noqa: E402
from qasr_jax.modeling.config import audio_token_count, preset  # noqa: E402
from qasr_jax.testing.reference import build_reference, save_hf  # noqa: E402
from qasr_jax.testing.tokenizer_files import write_tokenizer  # noqa: E402
from qasr_jax.transcribe import Transcriber  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data")


def clips(seed: int, count: int = 8) -> list[np.ndarray]:
    """4-12 s clips: espeak speech (looped and cut) and noise + chirp, lengths drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    speech = sf.read(os.path.join(DATA, "long_en.wav"), dtype="float32")[0]
    out = []
    for i in range(count):
        n = int(rng.uniform(4.0, 12.0) * 16000)
        if i % 2 == 0:
            out.append(np.resize(speech, n).astype(np.float32))
        else:
            t = np.arange(n) / 16000
            chirp = 0.3 * np.sin(2 * np.pi * (150 + 300 * t) * t)
            out.append((chirp + 0.05 * rng.standard_normal(n)).astype(np.float32))
    return out


def machine(device: torch.device) -> str:
    cpu = platform.processor() or "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ours = f"{jax.default_backend()}: {jax.devices()[0].device_kind}"
    theirs = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    return f"{cpu}, {os.cpu_count()} cores; jax {jax.__version__} ({ours}), torch {torch.__version__} ({theirs})"


def reference_run(model, cfg, fe, tok, waves, batch: int, new: int) -> float:
    """transformers: feature extractor + left-padded prompts + generate(min_new_tokens = max_new_tokens)."""
    device, dtype = model.device, model.dtype
    start = time.perf_counter()
    for i in range(0, len(waves), batch):
        group = waves[i : i + batch]
        inputs = fe(group, sampling_rate=16000, padding="longest", return_tensors="pt", return_attention_mask=True)
        n_audio = [audio_token_count(int(m.sum()), cfg.audio) for m in inputs["attention_mask"]]
        prompts = [build_prompt_ids(tok, n) for n in n_audio]
        width = max(map(len, prompts))
        ids = torch.tensor([[tok.im_end_id] * (width - len(p)) + p for p in prompts])  # left padding
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                                 input_features=inputs["input_features"].to(device, dtype),
                                 input_features_mask=inputs["attention_mask"].to(device), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False)
        out.cpu()  # waits for the device
    return time.perf_counter() - start


def ours_run(asr: Transcriber, waves, batch: int, new: int) -> float:
    start = time.perf_counter()
    out = asr.transcribe(waves, max_new_tokens=new, batch_size=batch, suppress_eos=True)
    assert all(len(r.token_ids) == new for r in out)
    return time.perf_counter() - start


def timed_compiles(fn):
    """(fn's result, backend compilations it caused, seconds they took)."""
    with count_compilations() as c:
        value = fn()
    return value, c.count, c.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny config instead of ASR-0.6B")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--torch-device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the reference runs (default: cuda when present)")
    args = parser.parse_args()
    cfg = preset("tiny" if args.quick else "asr-0.6b")
    workdir = tempfile.mkdtemp(prefix="bench_transcribe_")
    ref = build_reference(cfg)
    save_hf(ref, workdir)
    device = torch.device(args.torch_device)
    ref = ref.to(device, getattr(torch, args.dtype)).eval()
    write_tokenizer(workdir, "official")
    from transformers.models.qwen3_asr import Qwen3ASRFeatureExtractor

    fe = Qwen3ASRFeatureExtractor()
    asr = Transcriber.from_pretrained(workdir, dtype=args.dtype)
    first, second = clips(0), clips(1)
    audio_s = sum(w.shape[0] for w in first) / 16000
    audio_s2 = sum(w.shape[0] for w in second) / 16000
    print(f"machine: {machine(device)}")
    print(f"model: {'tiny' if args.quick else 'ASR-0.6B'} random weights, {args.dtype}; {len(first)} clips, "
          f"{audio_s:.1f} s of audio; {args.new_tokens} new tokens each (EOS suppressed)\n")
    print("| batch | reference RTFx | qasr_jax RTFx | speed-up | qasr_jax compile (s) | new lengths: RTFx, compiles |")
    print("|---|---|---|---|---|---|")
    for batch in (1, 8):
        ref_s = min(reference_run(ref, cfg, fe, asr.tokenizer, first, batch, args.new_tokens) for _ in range(2))
        cold, _, compile_s = timed_compiles(lambda: ours_run(asr, first, batch, args.new_tokens))
        warm = min(ours_run(asr, first, batch, args.new_tokens) for _ in range(2))
        new_len, n_compiles, _ = timed_compiles(lambda: ours_run(asr, second, batch, args.new_tokens))
        print(f"| {batch} | {audio_s / ref_s:.2f} | {audio_s / warm:.2f} | {ref_s / warm:.2f}x | "
              f"{compile_s:.1f} (first run {cold:.1f} s) | {audio_s2 / new_len:.2f}, {n_compiles} |", flush=True)


if __name__ == "__main__":
    main()
