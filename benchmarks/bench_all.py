"""Issue 15 in one command: qasr_jax in float32, bfloat16 and int8 against PyTorch (transformers) in float32 and
bfloat16, core stages and end to end, in one run, each figure next to this machine's floor for it; the report is
printed and appended to benchmarks/RESULTS.md.

    python benchmarks/bench_all.py [--preset asr-0.6b] [--repeats 5] [--e2e-repeats 2] [--e2e-clips 8]
                                   [--torch-threads N] [--no-append]

Sides: ``torch f32`` and ``torch bf16`` (transformers, loaded from the same bf16 checkpoint, so both sides hold the
same weight values), ``ours f32``, ``ours bf16`` (``qasr_jax.load(dtype="bfloat16")``) and ``ours int8``
(``quantize="int8"``, float32 activations). Every timed call of every side alternates with the others' (round
robin), so all see the same machine; medians are reported, and the CPU time other processes used during the calls.

Stages: encoder (log-mel of an 11.3 s clip -> projector output; ours ``engine.encode``), prefill (the 162-token
prompt into an empty cache; ours ``engine.extend``), decode step at batch 1 and 8 (one token per row with the prompt
as context; ours ``engine.step``), and end to end: RTFx of 8 clips (63 s of audio, 32 new tokens each, EOS
suppressed) at batch 1 and 8 (ours ``Transcriber``, torch ``generate``). Floors (see floors.py): a stage's FLOPs
over the best rate XLA's matmuls reach here in that precision, and for a decode step also the bytes it must read
(weights, head, the prompt's keys and values) over the copy bandwidth; the larger of the two.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import qasr_jax  # noqa: E402
from bench_core import PREFIX, SUFFIX, OthersMeter, clip, copy_bandwidth, make_checkpoint  # noqa: E402
from bench_transcribe import clips, reference_run  # noqa: E402
from floors import cpu_line, decoder_flops, encoder_flops, matmul_rates, step_bytes  # noqa: E402
from qasr_jax.audio import log_mel_batch  # noqa: E402
from qasr_jax.config import AUDIO_TOKEN_ID, audio_token_count, preset  # noqa: E402
from qasr_jax.tokenizer import Tokenizer  # noqa: E402
from qasr_jax.transcribe import Transcriber  # noqa: E402

OURS = {"ours f32": ("float32", None), "ours bf16": ("bfloat16", None), "ours int8": ("float32", "int8")}
TORCH = {"torch f32": "float32", "torch bf16": "bfloat16"}
HEADROOM = 256  # our cache: the prompt plus room for a 256-token transcript
NEW_TOKENS = 32


def ours_core(model, feats, n_frames, ids):
    """Our stage callables (each blocks until ready) over the engine's own programs, and the prompt logits."""
    eng = model.engine
    feats, n_frames = jnp.asarray(feats), jnp.asarray(n_frames)
    ids_j = jnp.asarray([ids], jnp.int32)
    audio, _ = eng.encode(feats, n_frames)
    embeds = eng.embed(ids_j, audio)
    n = len(ids)
    fns = {"encoder": lambda: jax.block_until_ready(eng.encode(feats, n_frames)),
           "prefill": lambda: jax.block_until_ready(eng.extend(eng.init_cache(1, n + HEADROOM), embeds, [n]))}
    for batch in (1, 8):
        rows = jnp.repeat(embeds, batch, axis=0)
        _, cache = eng.extend(eng.init_cache(batch, n + HEADROOM), rows, np.full(batch, n, np.int32))
        state = {"cache": cache}
        tokens = jnp.zeros((batch,), jnp.int32)

        def step(state=state, tokens=tokens):
            logits, cache = eng.step(state["cache"], tokens)  # the cache is donated
            jax.block_until_ready(logits)
            state["cache"] = cache.replace(lengths=cache.lengths - 1)  # same context at every timed call

        fns[f"step b{batch}"] = step
    return fns


def torch_core(model, feats, n_frames, ids):
    """The reference's stage callables: get_audio_features, forward over embeddings, one cached step (cropped back)."""
    import torch

    feats_t = torch.from_numpy(np.array(feats)).to(model.dtype)
    mask_t = (torch.arange(feats_t.shape[-1])[None] < torch.from_numpy(np.array(n_frames))[:, None]).long()
    ids_t = torch.tensor([ids])
    with torch.inference_mode():
        audio = model.model.get_audio_features(feats_t, mask_t).pooler_output
        embeds = model.model.get_input_embeddings()(ids_t)
        is_audio = (ids_t == AUDIO_TOKEN_ID)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(is_audio, audio.reshape(-1, audio.shape[-1]))
    fns = {"encoder": lambda: model.model.get_audio_features(feats_t, mask_t),
           "prefill": lambda: model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)}
    for batch in (1, 8):
        with torch.inference_mode():
            cache = model(inputs_embeds=embeds.repeat(batch, 1, 1), use_cache=True, logits_to_keep=1).cache
        tokens = torch.zeros((batch, 1), dtype=torch.long)

        def step(cache=cache, tokens=tokens):
            model(input_ids=tokens, cache=cache, use_cache=True)
            cache.crop(-1)

        fns[f"step b{batch}"] = step
    return fns


def round_robin(fns: dict, warmup: int, repeats: int) -> dict:
    """Every side's callable in turn, ``warmup`` untimed rounds then ``repeats`` timed ones -> {side: (ms, others)}."""
    import torch

    meter, out = OthersMeter(), {side: ([], []) for side in fns}
    for i in range(warmup + repeats):
        for side, fn in fns.items():
            time.sleep(0.05)  # let the other framework's worker threads go idle
            meter.start()
            start = time.perf_counter()
            with torch.inference_mode():
                fn()
            elapsed, others = time.perf_counter() - start, meter.stop()
            if i >= warmup:
                out[side][0].append(elapsed * 1e3)
                out[side][1].append(others)
    return out


def derive(f32, side: str):
    """Our bf16 or int8 model made from the float32 one's parameters (the int8 model shares its float32 encoder)."""
    dtype, q = OURS[side]
    return qasr_jax.Model(f32.config, f32.params, dtype=dtype, quantize=q)


def load_torch(folder: str, side: str):
    import torch
    import transformers

    dtype = getattr(torch, TORCH[side])
    return transformers.Qwen3ASRForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()


def end_to_end(ours: dict, ref_side: str, ref, folder: str, repeats: int, n_clips: int) -> tuple[dict, float]:
    """{(side, batch): (seconds of the best pass, others' cores)}: ``n_clips`` clips, NEW_TOKENS each, round robin."""
    from transformers.models.qwen3_asr import Qwen3ASRFeatureExtractor

    waves, fe, tok = clips(0)[:n_clips], Qwen3ASRFeatureExtractor(), Tokenizer.from_dir(folder)
    cfg = next(iter(ours.values())).config
    out = {}
    for batch in (1, 8):
        runners = {ref_side: lambda: reference_run(ref, cfg, fe, tok, waves, batch, NEW_TOKENS)}
        for side, model in ours.items():
            asr = Transcriber(model, tok)
            runners[side] = lambda asr=asr: asr.transcribe(waves, max_new_tokens=NEW_TOKENS, batch_size=batch,
                                                           suppress_eos=True)
            runners[side]()  # compiles every bucket
        times = round_robin(runners, 0, repeats)
        out.update({(side, batch): (min(ms) / 1e3, statistics.mean(o)) for side, (ms, o) in times.items()})
    return out, sum(w.shape[0] for w in waves) / 16000


# Phases: one reference model in memory at a time, with the sides its targets compare, so a 0.6B run peaks near
# 9 GB (two earlier layouts were OOM-killed at 13-14 GB on a 24 GB machine shared with other jobs).
PHASES = {"torch f32": ("ours f32",), "torch bf16": ("ours f32", "ours bf16", "ours int8")}
E2E = {"torch f32": ("ours f32",), "torch bf16": ("ours bf16", "ours int8")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="asr-0.6b", choices=["asr-0.6b", "asr-1.7b", "tiny"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--e2e-repeats", type=int, default=2)
    ap.add_argument("--checkpoint", help="folder for the random-weight checkpoint (reused when it exists)")
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    ap.add_argument("--torch-threads", type=int, help="torch's thread count (default: torch's own; on a machine "
                    "shared with other jobs 1 keeps its OpenMP threads from stalling each other)")
    ap.add_argument("--e2e-clips", type=int, default=8, help="clips timed end to end (of bench_transcribe's 8)")
    args = ap.parse_args()
    import torch
    import transformers

    from qasr_jax.compiles import enable_compilation_cache

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    enable_compilation_cache()  # a rerun loads our programs instead of compiling them (compile time is not timed)

    from tests.tokenizer_files import write_tokenizer

    cfg = preset(args.preset)
    folder = args.checkpoint or os.path.join("/tmp", f"qasr_bench_all_{args.preset}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        print(f"building the random-weight checkpoint in {folder} ...", flush=True)
        make_checkpoint(cfg, folder)
    if not os.path.isfile(os.path.join(folder, "vocab.json")):
        write_tokenizer(folder, "official")
    load = [os.getloadavg()[0]]
    bandwidth = max(copy_bandwidth().values())
    rates = matmul_rates()
    print(f"copy bandwidth {bandwidth:.1f} GB/s; matmul GFLOP/s by rows: {rates}", flush=True)

    feats, n_frames = log_mel_batch([clip()])
    feats = np.asarray(feats)
    n_audio = audio_token_count(int(n_frames[0]), cfg.audio)
    ids = PREFIX + [AUDIO_TOKEN_ID] * n_audio + SUFFIX
    ours = {"ours f32": qasr_jax.load(folder)}
    fns, core, e2e, quality = {}, {}, {}, {}
    f32_logits = np.asarray(ours["ours f32"].logits(ids, feats[0, :, : int(n_frames[0])]), np.float64)
    for ref_side, sides in PHASES.items():
        for side in sides:
            if side not in ours:
                ours[side] = derive(ours["ours f32"], side)
                logits = np.asarray(ours[side].logits(ids, feats[0, :, : int(n_frames[0])]))
                quality[side] = float(np.abs(logits - f32_logits).max() / np.abs(f32_logits).max())
            if side not in fns:
                fns[side] = ours_core(ours[side], feats, n_frames, ids)
        ref = load_torch(folder, ref_side)
        fns[ref_side] = torch_core(ref, feats, n_frames, ids)
        for stage in ("encoder", "prefill", "step b1", "step b8"):
            timed = round_robin({side: fns[side][stage] for side in (ref_side, *sides)}, 2, args.repeats)
            core.setdefault(stage, {}).update({(ref_side, side): v for side, v in timed.items()})
            print(ref_side, stage, {s: round(statistics.median(v[0]), 1) for s, v in timed.items()}, flush=True)
        timed, audio_s = end_to_end({s: ours[s] for s in E2E[ref_side]}, ref_side, ref, folder, args.e2e_repeats,
                                    args.e2e_clips)
        e2e.update({(ref_side, side, batch): v for (side, batch), v in timed.items()})
        print(ref_side, "end to end", timed, flush=True)
        del ref, fns[ref_side]
        gc.collect()
    load.append(os.getloadavg()[0])
    floors = stage_floors(ours, cfg, feats.shape[-1] // cfg.audio.chunk_frames, len(ids), bandwidth, rates)
    versions = (f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
                f"transformers {transformers.__version__}")
    text = report(args, core, e2e, audio_s, floors, quality, load, bandwidth, rates, versions, len(ids))
    print(text)
    if not args.no_append:
        with open(os.path.join(HERE, "RESULTS.md"), "a") as f:
            f.write("\n" + text)


def stage_floors(ours, cfg, chunks: int, n_prompt: int, bandwidth: float, rates) -> dict:
    """{(side, stage): floor ms} for our sides."""
    precision = {"ours f32": "float32", "ours bf16": "bfloat16", "ours int8": "int8"}
    out = {}
    for side, model in ours.items():
        best = max(rates[precision[side]].values()) * 1e9
        kv_dtype = jnp.dtype(model.dtype)
        out[side, "encoder"] = encoder_flops(cfg, chunks) / (max(rates[OURS[side][0]].values()) * 1e9) * 1e3
        out[side, "prefill"] = decoder_flops(cfg, n_prompt, n_prompt, 1) / best * 1e3
        for batch in (1, 8):
            nbytes = sum(step_bytes(model.params, cfg, batch, n_prompt, kv_dtype).values())
            flops = decoder_flops(cfg, batch, n_prompt, batch)
            out[side, f"step b{batch}"] = max(nbytes / (bandwidth * 1e9), flops / best) * 1e3
    return out


def report(args, core, e2e, audio_s, floors, quality, load, bandwidth, rates, versions, n_prompt) -> str:
    """Markdown: machine and floors, one table per reference phase, the targets."""
    med = {(ref, side, stage): statistics.median(v[0])
           for stage, runs in core.items() for (ref, side), v in runs.items()}
    others = [o for runs in core.values() for _, o in runs.values() for o in o]
    lines = [f"## Precision on CPU: bench_all.py ({datetime.datetime.now().isoformat(timespec='minutes')})", "",
             f"CPU: {cpu_line()}. {versions}. Random-weight {args.preset} (bf16 checkpoint, both sides), 11.3 s clip, "
             f"prompt {n_prompt} tokens, decode steps with the prompt as context; end to end {args.e2e_clips} clips "
             f"({audio_s:.1f} s of audio, {NEW_TOKENS} new tokens each, best of {args.e2e_repeats} passes); "
             f"median of {args.repeats} calls per "
             f"side, sides round robin within each table. Load: 1-min average {load[0]:.2f} before, {load[1]:.2f} "
             f"after; other processes used {statistics.mean(others):.2f} cores on average during the timed calls (max "
             f"{max(others):.2f}). Peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB. "
             f"Floors: copy bandwidth {bandwidth:.1f} GB/s; matmul GFLOP/s (GOP/s for int8) at "
             f"{'/'.join(str(k) for k in next(iter(rates.values())))} rows: "
             + ", ".join(f"{k} " + "/".join(f"{v:.0f}" for v in r.values()) for k, r in rates.items()) + ". "
             f"Prompt logits against ours f32 (max rel): bf16 {quality['ours bf16']:.1e}, int8 "
             f"{quality['ours int8']:.1e}."]
    for ref, sides in PHASES.items():
        cols = (ref, *sides)
        lines += ["", "| ms (floor) | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        for stage in core:
            cells = [f"{med[ref, s, stage]:.0f}" + (f" ({floors[s, stage]:.0f})" if (s, stage) in floors else "")
                     for s in cols]
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
        for batch in (1, 8):
            cells = [f"{audio_s / e2e[ref, s, batch][0]:.2f}" if (ref, s, batch) in e2e else "" for s in cols]
            lines.append(f"| RTFx end to end, batch {batch} | " + " | ".join(cells) + " |")

    def faster(a, b, stage):  # how many times faster side a is than side b, in the phase that times both
        ref = b if b in PHASES else next(r for r, sides in PHASES.items() if a in sides and b in sides)
        if isinstance(stage, int):
            return e2e[ref, b, stage][0] / e2e[ref, a, stage][0]
        return med[ref, b, stage] / med[ref, a, stage]

    speed = [("bf16 step b1 vs ours f32", "ours bf16", "ours f32", "step b1", 1.0),
             ("bf16 step b8 vs ours f32", "ours bf16", "ours f32", "step b8", 1.5),
             ("bf16 end to end b1 vs torch bf16", "ours bf16", "torch bf16", 1, 1.2),
             ("bf16 end to end b8 vs torch bf16", "ours bf16", "torch bf16", 8, 1.0),
             ("bf16 encoder vs torch bf16", "ours bf16", "torch bf16", "encoder", 1.0),
             ("int8 step b1 vs ours f32", "ours int8", "ours f32", "step b1", 1.5),
             ("int8 step b8 vs ours f32", "ours int8", "ours f32", "step b8", 2.0)]
    lines += ["", "| target | measured | met |", "|---|---:|---|"]
    for name, a, b, stage, want in speed:
        value = faster(a, b, stage)
        lines.append(f"| {name} >= {want:.1f}x | {value:.2f}x | {'yes' if value >= want else 'no'} |")
    q = quality["ours int8"]
    lines.append(f"| int8 prompt logits within 2% of f32 | {100 * q:.2f}% | {'yes' if q <= 0.02 else 'no'} |")
    for side in OURS:
        for batch, want in ((1, 1.3), (8, 1.5)):
            stage = f"step b{batch}"
            value = med["torch bf16", side, stage] / floors[side, stage]
            lines.append(f"| {side} {stage} within {want}x of its floor ({floors[side, stage]:.0f} ms) | "
                         f"{value:.2f}x | {'yes' if value <= want else 'no'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
