"""Time qasr_jax's core (encoder, prefill, one decode step) against the PyTorch reference, float32, same run.

Both sides load one random-weight checkpoint from disk (built once with tests/reference.py and saved in bfloat16,
so both hold identical float32 values) and get the same input: tests/data/long_en.wav (10.07 s) continued from
its start to 11.3 s, as log-mel features padded to whole 1 s chunks (1200 frames, 147 audio tokens).

Stages (each: warm-up calls, then ``--repeats`` timed calls with the reference and ours alternating call by call,
so both see the same machine; median and minimum reported; our compile time on its own, as our first call minus
our median):
- encoder: log-mel -> projector output. Reference ``model.model.get_audio_features``; ours ``Engine.encode``.
- prefill: prompt embeddings -> next-token logits + KV cache (decoder only). Reference
  ``model(inputs_embeds=..., use_cache=True, logits_to_keep=1)``; ours ``Model.embed`` + ``Model.prefill``.
- prompt: both together from log-mel and ids. Reference ``model(input_ids, input_features, input_features_mask,
  use_cache=True, logits_to_keep=1)`` (what ``generate`` runs first); ours encode + embed + extend.
- decode step: one token with the cache. Reference ``model(input_ids=tok, cache=cache, use_cache=True)`` with the
  cache cropped back after each call (every call sees the prompt as context); ours ``Model.step``.
The reference runs under ``torch.inference_mode()`` with torch's default thread count; ours is block_until_ready.

The machine may be shared: other processes' CPU use is measured from /proc during every timed call and reported,
and by default each timed call first waits (up to 300 s) until they use under ``--quiet`` cores. Torch's OpenMP
threads slow down far more than XLA's thread pool when another process takes a core (the reference's prefill
went from 1.2 s to 10 s at a load average of 4 on 2 cores), so numbers from a busy machine are not comparable.

The decode step is memory bound: its floor is the bytes it must read (decoder layer weights, final norm, one
embedding row and the whole LM head, which for tied models is the embedding matrix) over the machine's copy
bandwidth (large numpy copies, 1 and 2 threads, read + written bytes; the best is used).

    python benchmarks/bench_core.py [--preset asr-0.6b] [--repeats 5] [--warmup 2] [--quiet CORES] [--checkpoint DIR]

Real size needs ~10 GB of RAM at peak (both frameworks hold the 3 GB float32 model); ``--preset tiny`` is a
smoke test of the script.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np


import qasr_jax  # noqa: E402
from qasr_jax.io.audio import log_mel_batch  # noqa: E402
from qasr_jax.io.prompts import build_prompt_ids  # noqa: E402
from qasr_jax.io.tokenizer import Tokenizer  # noqa: E402
from qasr_jax.modeling.config import audio_token_count, preset  # noqa: E402

CLIP_SECONDS = 11.3
RATE = 16000
STAGES = ("encoder", "prefill", "prompt", "decode step")
DECODE_HEADROOM = 256  # our cache holds the prompt plus this many slots, as for a 256-token transcript


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def copy_bandwidth(nbytes: int = 1 << 29, repeats: int = 5) -> dict[int, float]:
    """Copy bandwidth in GB/s (read + written bytes / time) of a large numpy copy, split over 1 and 2 threads."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    out = {}
    for threads in (1, 2):
        parts = np.array_split(np.arange(src.size), threads)
        bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]

        def run(lo, hi):
            np.copyto(dst[lo:hi], src[lo:hi])

        times = []
        for _ in range(repeats + 1):
            workers = [threading.Thread(target=run, args=b) for b in bounds]
            start = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            times.append(time.perf_counter() - start)
        out[threads] = 2 * nbytes / statistics.median(times[1:]) / 1e9
    return out


def step_bytes(params, cfg) -> dict[str, int]:
    """Bytes of weights one decode step reads: decoder layers, final norm, one embedding row, the LM head."""
    dec = params["decoder"]
    layers = sum(x.nbytes for k, v in dec.items() if k.startswith("layers") for x in jax.tree_util.tree_leaves(v))
    emb = dec["embed"]["embedding"]
    if cfg.is_aligner:
        head = params["score"]["kernel"].nbytes
    elif cfg.text.tie_word_embeddings:
        head = emb.nbytes  # the tied head multiplies by the whole embedding matrix
    else:
        head = params["lm_head"]["kernel"].nbytes
    return {"layers": layers, "norm": dec["norm"]["scale"].nbytes, "embed row": emb.nbytes // emb.shape[0],
            "head": head}


def kv_bytes_per_slot(cfg) -> int:
    t = cfg.text
    return 2 * t.layers * t.kv_heads * t.head_dim * 4


def _busy_and_own() -> tuple[int, int]:
    """(jiffies all CPUs spent busy, jiffies this process spent): their difference is everyone else's CPU time."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return user + nice + system + irq + softirq + steal, int(fields[11]) + int(fields[12])


class OthersMeter:
    """CPU cores used by other processes, measured between start() and stop() from /proc."""

    HZ = os.sysconf("SC_CLK_TCK")

    def start(self) -> None:
        self._t, self._j = time.perf_counter(), _busy_and_own()

    def stop(self) -> float:
        (busy, own), (busy0, own0) = _busy_and_own(), self._j
        return max(0.0, ((busy - busy0) - (own - own0)) / self.HZ / (time.perf_counter() - self._t))


def wait_quiet(max_cores: float, timeout: float) -> float:
    """Wait until other processes use under ``max_cores`` over half a second (at most ``timeout`` s); their use."""
    meter, deadline = OthersMeter(), time.perf_counter() + timeout
    while True:
        meter.start()
        time.sleep(0.5)
        used = meter.stop()
        if used < max_cores or time.perf_counter() > deadline:
            return used


def interleaved(ref_fn, our_fn, warmup: int, repeats: int, ref_after=None, quiet: float | None = None):
    """Reference and ours alternate call by call, after warm-up calls, so both see the same machine.

    With ``quiet`` (cores), each timed call waits until other processes use less than that. Returns
    {"ref": [ms...], "ours": [ms...], "ref_others": [cores...], "ours_others": [...]}: the other processes' CPU use
    during each timed call. ``ref_after`` runs untimed after every reference call.
    """
    out = {"ref": [], "ours": [], "ref_others": [], "ours_others": []}
    meter = OthersMeter()
    for i in range(warmup + repeats):
        for fn, after, side in ((ref_fn, ref_after, "ref"), (our_fn, None, "ours")):
            if quiet is not None and i >= warmup:
                wait_quiet(quiet, timeout=300)
            else:
                time.sleep(0.05)  # let the other framework's worker threads go idle
            meter.start()
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            others = meter.stop()
            if after:
                after()
            if i >= warmup:
                out[side].append(elapsed * 1e3)
                out[side + "_others"].append(others)
    return out


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def make_checkpoint(cfg, folder: str) -> None:
    """The random-weight reference (tests/reference.py), saved in bfloat16 in the -hf layout, then freed."""
    import torch

    from qasr_jax.testing.reference import build_reference, save_hf

    model = build_reference(cfg, seed=0)
    save_hf(model, folder, dtype=torch.bfloat16)
    del model
    gc.collect()


def clip() -> np.ndarray:
    import soundfile as sf

    here = os.path.dirname(os.path.abspath(__file__))
    wave, rate = sf.read(os.path.join(here, "..", "tests", "data", "long_en.wav"), dtype="float32")
    assert rate == RATE
    n = int(round(CLIP_SECONDS * RATE))
    return np.tile(wave, -(-n // wave.size))[:n]


def reference_stages(model, feats, n_frames, ids):
    """The reference's stage callables {stage: (fn, after)} and outputs (encoder, prefill logits, step logits)."""
    import torch

    feats_t = torch.from_numpy(np.array(feats))
    mask_t = (torch.arange(feats_t.shape[-1])[None] < torch.from_numpy(np.array(n_frames))[:, None]).long()
    ids_t = torch.tensor([ids])
    outs = {}

    def encoder():
        with torch.inference_mode():
            return model.model.get_audio_features(feats_t, mask_t).pooler_output

    with torch.inference_mode():
        audio = encoder()
        outs["encoder"] = audio[0].numpy().copy() if audio.ndim == 3 else audio.numpy().copy()
        embeds = model.model.get_input_embeddings()(ids_t)
        is_audio = ids_t == model.config.audio_token_id
        embeds = embeds.masked_scatter(is_audio[..., None].expand_as(embeds), audio)

    def prefill():
        with torch.inference_mode():
            return model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)

    def prompt():
        with torch.inference_mode():
            return model(input_ids=ids_t, input_features=feats_t, input_features_mask=mask_t, use_cache=True,
                         logits_to_keep=1)

    out = prompt()
    outs["prefill"] = out.logits[0, -1].numpy().copy()
    cache = out.cache
    tok = out.logits[:, -1].argmax(-1, keepdim=True)

    def step():
        with torch.inference_mode():
            return model(input_ids=tok, cache=cache, use_cache=True)

    def rewind():  # drop the token just appended: every timed step sees the same context
        cache.crop(-1)
        assert cache.get_seq_length() == len(ids)

    outs["step"] = step().logits[0, -1].numpy().copy()
    rewind()
    stages = {"encoder": (encoder, None), "prefill": (prefill, None), "prompt": (prompt, None),
              "decode step": (step, rewind)}
    return stages, outs


def our_stages(model, feats, n_frames, ids):
    """Our stage callables {stage: fn} (each blocks until ready) and outputs, same stages as the reference's."""
    feats, n_frames = jnp.asarray(feats), jnp.asarray(n_frames)
    ids_j = jnp.asarray([ids], jnp.int32)
    lengths = np.array([len(ids)], np.int32)
    empty = model.engine.init_cache(1, len(ids) + DECODE_HEADROOM)
    outs, state = {}, {}

    def encoder():
        return jax.block_until_ready(model.engine.encode(feats, n_frames))

    def prefill():
        return jax.block_until_ready(model.engine.extend(empty, model.engine.embed(ids_j, state["audio"]), lengths))

    def prompt():
        audio, _ = model.engine.encode(feats, n_frames)
        return jax.block_until_ready(model.engine.extend(empty, model.engine.embed(ids_j, audio), lengths))

    def step():
        out, state["cache"] = model.engine.step(state["cache"], state["tok"])  # the old cache is donated
        return jax.block_until_ready(out)

    def first_outputs() -> dict[str, float]:
        """Run each stage once in order, keep what the reference is compared on; seconds of each first call."""
        first = {}
        start = time.perf_counter()
        audio, n_tok = encoder()
        first["encoder"] = time.perf_counter() - start
        state["audio"] = audio
        outs["encoder"] = np.asarray(audio[0, : int(n_tok[0])])
        start = time.perf_counter()
        logits, cache = prefill()
        first["prefill"] = time.perf_counter() - start
        outs["prefill"] = np.asarray(logits[0])
        state["tok"], state["cache"] = jnp.argmax(logits, -1).astype(jnp.int32), cache
        start = time.perf_counter()
        outs["step"] = np.asarray(step()[0])
        first["decode step"] = time.perf_counter() - start
        return first

    return {"encoder": encoder, "prefill": prefill, "prompt": prompt, "decode step": step}, outs, first_outputs


def report(args, cfg, rows, first, diffs, load, bw, sizes, n_frames_padded, n_audio, n_prompt) -> None:
    """Print the machine, the settings and the table (markdown)."""
    import torch
    import transformers

    med = {k: (statistics.median(v["ref"]), statistics.median(v["ours"])) for k, v in rows.items()}
    print(f"\n# bench_core  {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores (affinity {len(os.sched_getaffinity(0))}), "
          f"1-min load average {load[0]:.2f} before timing, {load[1]:.2f} after")
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    quiet = "no wait" if args.quiet is None else f"each timed call waited for other processes < {args.quiet} cores"
    print(f"preset {args.preset}, float32, clip {CLIP_SECONDS} s = {n_frames_padded} frames, {n_audio} audio "
          f"tokens, prompt {n_prompt} tokens; warm-up {args.warmup}, then {args.repeats} interleaved calls each "
          f"({quiet})\n")
    print("| stage | reference ms (median / min) | ours ms (median / min) | reference / ours (medians) "
          "| our compile s | other processes, cores (ref / ours) | max rel diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for stage in STAGES:
        v = rows[stage]
        r, o = med[stage]
        compile_s = f"{first[stage] - o / 1e3:.1f}" if stage in first else "(above)"
        print(f"| {stage} | {r:.0f} / {min(v['ref']):.0f} | {o:.0f} / {min(v['ours']):.0f} | {r / o:.2f}x "
              f"| {compile_s} | {statistics.mean(v['ref_others']):.2f} / {statistics.mean(v['ours_others']):.2f} "
              f"| {diffs[stage]:.1e} |")
    best_bw = max(bw.values())
    weights = sum(sizes.values())
    bound_ms = weights / (best_bw * 1e9) * 1e3
    print("\ncopy bandwidth: " + ", ".join(f"{t} thread{'s' * (t > 1)} {v:.1f} GB/s" for t, v in bw.items()))
    print("decode step reads " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items())
          + f" = {weights / 1e6:.0f} MB of weights (+ KV cache {kv_bytes_per_slot(cfg) / 1e3:.0f} kB per slot: "
          f"{n_prompt} used, {n_prompt + DECODE_HEADROOM} allocated in ours)")
    ref_ms, step_ms = med["decode step"]
    print(f"bandwidth bound {bound_ms:.1f} ms; ours {step_ms:.1f} ms = {step_ms / bound_ms:.2f}x the bound "
          f"(best {min(rows['decode step']['ours']) / bound_ms:.2f}x); reference {ref_ms:.1f} ms = "
          f"{ref_ms / bound_ms:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="asr-0.6b", choices=["asr-0.6b", "asr-1.7b", "tiny"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quiet", type=float, default=0.3, metavar="CORES",
                    help="before each timed call wait (up to 300 s) until other processes use fewer cores than this; "
                         "a negative value disables waiting")
    ap.add_argument("--checkpoint", help="folder for the random-weight checkpoint (reused when it exists)")
    args = ap.parse_args()
    if args.quiet is not None and args.quiet < 0:
        args.quiet = None
    import torch
    import transformers

    cfg = preset(args.preset)
    folder = args.checkpoint or os.path.join(tempfile.gettempdir(), f"qasr_bench_core_{args.preset}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        print(f"building the random-weight checkpoint in {folder} ...", flush=True)
        make_checkpoint(cfg, folder)

    wave = clip()
    feats, n_frames = log_mel_batch([wave])
    feats = np.asarray(feats)
    n_audio = audio_token_count(int(n_frames[0]), cfg.audio)
    if not os.path.isfile(os.path.join(folder, "vocab.json")):
        from qasr_jax.testing.tokenizer_files import write_tokenizer

        write_tokenizer(folder, "official")
    ids = build_prompt_ids(Tokenizer.from_dir(folder), n_audio)

    # qasr_jax first (its loading peak is the larger), then the reference from the same files.
    model = qasr_jax.load(folder, dtype="float32")
    ours, our_outs, first_outputs = our_stages(model, feats, n_frames, ids)
    first = first_outputs()
    ref_model = transformers.Qwen3ASRForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    ref, ref_outs = reference_stages(ref_model, feats, n_frames, ids)
    rows, load = {}, [os.getloadavg()[0]]
    for stage in STAGES:
        fn, after = ref[stage]
        rows[stage] = interleaved(fn, ours[stage], args.warmup, args.repeats, ref_after=after, quiet=args.quiet)
        print(f"{stage}: reference {[round(x) for x in rows[stage]['ref']]} ms, ours "
              f"{[round(x) for x in rows[stage]['ours']]} ms", flush=True)
    load.append(os.getloadavg()[0])
    if args.quiet is not None:
        wait_quiet(args.quiet, timeout=300)
    bw = copy_bandwidth()
    diffs = {"encoder": rel(our_outs["encoder"], ref_outs["encoder"]),
             "prefill": rel(our_outs["prefill"], ref_outs["prefill"]),
             "prompt": rel(our_outs["prefill"], ref_outs["prefill"]),
             "decode step": rel(our_outs["step"], ref_outs["step"])}
    report(args, cfg, rows, first, diffs, load, bw, step_bytes(model.params, cfg), feats.shape[-1], n_audio, len(ids))


if __name__ == "__main__":
    main()
