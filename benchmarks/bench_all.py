"""Issue 15 in one command: qasr_jax in float32, bfloat16 and int8 against PyTorch (transformers) in float32 and
bfloat16, core stages and end to end, in one run, each figure next to this machine's floor for it; the report is
printed and appended to benchmarks/RESULTS.md.

    python benchmarks/bench_all.py [--preset asr-0.6b] [--repeats 5] [--e2e-repeats 2] [--e2e-clips 8]
                                   [--torch-threads N] [--phases "ours,torch bf16,torch f32"] [--no-append]

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
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

import qasr_jax  # noqa: E402
from bench_core import OthersMeter, clip, copy_bandwidth, make_checkpoint  # noqa: E402
from bench_transcribe import clips, reference_run  # noqa: E402
from floors import cpu_line, decoder_flops, encoder_flops, matmul_rates, step_bytes  # noqa: E402
from qasr_jax.io.audio import log_mel_batch  # noqa: E402
from qasr_jax.io.prompts import build_prompt_ids  # noqa: E402
from qasr_jax.io.tokenizer import Tokenizer  # noqa: E402
from qasr_jax.modeling.config import audio_token_count, preset  # noqa: E402
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
        is_audio = (ids_t == model.config.audio_token_id)[..., None].expand_as(embeds)
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


# Each phase runs in its own process with only the models it compares (0.6B runs that held everything in one
# process were OOM-killed at 9-14 GB on a 24 GB machine shared with other jobs): our three precisions together,
# then each reference with the sides its targets compare.
PHASES = {"ours": (None, ("ours f32", "ours bf16", "ours int8"), ()),
          "torch bf16": ("torch bf16", ("ours bf16", "ours int8"), ("ours bf16", "ours int8")),
          "torch f32": ("torch f32", ("ours f32",), ("ours f32",))}
STAGES = ("encoder", "prefill", "step b1", "step b8")


def load_sides(folder: str, sides) -> dict:
    """Our models for ``sides``; bf16 and int8 are made from the float32 load, which is dropped unless wanted."""
    f32 = qasr_jax.load(folder)
    return {side: f32 if side == "ours f32" else derive(f32, side) for side in sides}


def run_phase(args, name: str, cfg, folder: str, bandwidth: float, rates) -> dict:
    """One phase, in this process -> JSON-ready results."""
    ref_side, sides, e2e_sides = PHASES[name]
    feats, n_frames = log_mel_batch([clip()])
    feats = np.asarray(feats)
    ids = build_prompt_ids(Tokenizer.from_dir(folder), audio_token_count(int(n_frames[0]), cfg.audio))
    ours = load_sides(folder, sides)
    out = {"core": {}, "e2e": {}, "quality": {}, "floors": {}, "n_prompt": len(ids)}
    if name == "ours":
        mel = feats[0, :, : int(n_frames[0])]
        want = np.asarray(ours["ours f32"].logits(ids, mel), np.float64)
        for side in ("ours bf16", "ours int8"):
            got = np.asarray(ours[side].logits(ids, mel))
            out["quality"][side] = float(np.abs(got - want).max() / np.abs(want).max())
        floors = stage_floors(ours, cfg, feats.shape[-1] // cfg.audio.chunk_frames, len(ids), bandwidth, rates)
        out["floors"] = {f"{side}|{stage}": v for (side, stage), v in floors.items()}
    fns = {side: ours_core(m, feats, n_frames, ids) for side, m in ours.items()}
    ref = None if ref_side is None else load_torch(folder, ref_side)
    if ref is not None:
        fns = {ref_side: torch_core(ref, feats, n_frames, ids), **fns}
    for stage in STAGES:
        timed = round_robin({side: f[stage] for side, f in fns.items()}, 2, args.repeats)
        out["core"].update({f"{name}|{side}|{stage}": v for side, v in timed.items()})
        print(name, stage, {s: round(statistics.median(v[0]), 1) for s, v in timed.items()}, flush=True)
    if ref is not None:
        timed, out["audio_s"] = end_to_end({s: ours[s] for s in e2e_sides}, ref_side, ref, folder,
                                           args.e2e_repeats, args.e2e_clips)
        out["e2e"] = {f"{name}|{side}|{batch}": v for (side, batch), v in timed.items()}
        print(name, "end to end", timed, flush=True)
    return out


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
    ap.add_argument("--phases", default=",".join(PHASES), help="the phases to run, comma-separated (default all: "
                    + ", ".join(PHASES) + "); a target whose phase is left out is reported as not measured")
    ap.add_argument("--phase", choices=list(PHASES), help=argparse.SUPPRESS)  # a child process: one phase
    ap.add_argument("--floors", help=argparse.SUPPRESS)  # the parent's bandwidth and rates (JSON)
    ap.add_argument("--out", help=argparse.SUPPRESS)  # where the child writes its results (JSON)
    args = ap.parse_args()
    import torch
    import transformers

    from qasr_jax.decoding.compiles import enable_compilation_cache

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    enable_compilation_cache()  # a rerun loads our programs instead of compiling them (compile time is not timed)
    cfg = preset(args.preset)
    folder = args.checkpoint or os.path.join("/tmp", f"qasr_bench_all_{args.preset}")
    if args.phase:
        measured = json.loads(args.floors)
        rates = {k: {int(r): v for r, v in d.items()} for k, d in measured["rates"].items()}
        with open(args.out, "w") as f:
            json.dump(run_phase(args, args.phase, cfg, folder, measured["bandwidth"], rates), f)
        return

    from qasr_jax.testing.tokenizer_files import write_tokenizer

    if not os.path.isfile(os.path.join(folder, "config.json")):
        print(f"building the random-weight checkpoint in {folder} ...", flush=True)
        make_checkpoint(cfg, folder)
    if not os.path.isfile(os.path.join(folder, "vocab.json")):
        write_tokenizer(folder, "official")
    load = [os.getloadavg()[0]]
    bandwidth = max(copy_bandwidth().values())
    rates = matmul_rates()
    print(f"copy bandwidth {bandwidth:.1f} GB/s; matmul GFLOP/s by rows: {rates}", flush=True)
    results, failed = {"core": {}, "e2e": {}, "quality": {}, "floors": {}}, []
    argv = [a for a in sys.argv[1:] if a != "--no-append"]
    phases = [p.strip() for p in args.phases.split(",")]
    if unknown := sorted(set(phases) - set(PHASES)):
        ap.error(f"--phases: unknown {unknown}; choose from {list(PHASES)}")
    for name in phases:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            child = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--checkpoint", folder,
                                    "--phase", name, "--out", out.name,
                                    "--floors", json.dumps({"bandwidth": bandwidth, "rates": rates})])
            if child.returncode:
                failed.append(f"{name} (exit {child.returncode})")
                continue
            with open(out.name) as f:
                part = json.load(f)
        for key in ("core", "e2e", "quality", "floors"):
            results[key].update(part[key])
        results.update({k: part[k] for k in ("audio_s", "n_prompt") if k in part})
    load.append(os.getloadavg()[0])
    versions = (f"jax {jax.__version__}, torch {torch.__version__} "
                f"({args.torch_threads or torch.get_num_threads()} threads), transformers {transformers.__version__}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
    text = report(args, results, load, bandwidth, rates, versions, failed, peak)
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


def report(args, results, load, bandwidth, rates, versions, failed, peak) -> str:
    """Markdown: machine, floors and quality; one table per phase (ms, with our floors); the targets."""
    med = {tuple(k.split("|")): statistics.median(v[0]) for k, v in results["core"].items()}
    e2e = {tuple(k.split("|")): v[0] for k, v in results["e2e"].items()}
    floors = {tuple(k.split("|")): v for k, v in results["floors"].items()}
    quality = results["quality"]
    others = [o for v in results["core"].values() for o in v[1]] or [0.0]
    audio_s = results.get("audio_s", 0.0)
    lines = [f"## Precision on CPU: bench_all.py ({datetime.datetime.now().isoformat(timespec='minutes')})", "",
             f"CPU: {cpu_line()}. {versions}. Random-weight {args.preset} (bf16 checkpoint, both sides), 11.3 s clip, "
             f"prompt {results.get('n_prompt', '?')} tokens, decode steps with the prompt as context; end to end "
             f"{args.e2e_clips} clips ({audio_s:.1f} s of audio, {NEW_TOKENS} new tokens each, best of "
             f"{args.e2e_repeats} passes); median of {args.repeats} calls per side, sides round robin within each "
             f"table (one process per table). Load: 1-min average {load[0]:.2f} before, {load[1]:.2f} after; other "
             f"processes used {statistics.mean(others):.2f} cores on average during the timed calls (max "
             f"{max(others):.2f}). Peak RSS of a phase {peak:.1f} GB. Floors: copy bandwidth {bandwidth:.1f} GB/s; "
             f"matmul GFLOP/s (GOP/s for int8) at {'/'.join(str(k) for k in next(iter(rates.values())))} rows: "
             + ", ".join(f"{k} " + "/".join(f"{v:.0f}" for v in r.values()) for k, r in rates.items()) + "."
             + "".join(f" Prompt logits of {s} against ours f32 (max rel): {q:.1e}." for s, q in quality.items())
             + (f" Phases that failed: {', '.join(failed)}." if failed else "")]
    for name, (ref, sides, _) in PHASES.items():
        cols = ((ref,) if ref else ()) + sides
        if not any((name, s, "step b1") in med for s in cols):
            continue
        lines += ["", "| ms (our floor) | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        for stage in STAGES:
            cells = [(f"{med[name, s, stage]:.0f}" if (name, s, stage) in med else "")
                     + (f" ({floors[s, stage]:.0f})" if (s, stage) in floors else "") for s in cols]
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
        for batch in ("1", "8"):
            if any((name, s, batch) in e2e for s in cols):
                cells = [f"{audio_s / e2e[name, s, batch]:.2f}" if (name, s, batch) in e2e else "" for s in cols]
                lines.append(f"| RTFx end to end, batch {batch} | " + " | ".join(cells) + " |")

    def faster(phase, a, b, stage):  # how many times faster side a is than side b, in one phase
        if stage in ("1", "8"):
            return e2e[phase, b, stage] / e2e[phase, a, stage]
        return med[phase, b, stage] / med[phase, a, stage]

    speed = [("bf16 step b1 vs ours f32", "ours", "ours bf16", "ours f32", "step b1", 1.0),
             ("bf16 step b8 vs ours f32", "ours", "ours bf16", "ours f32", "step b8", 1.5),
             ("bf16 end to end b1 vs torch bf16", "torch bf16", "ours bf16", "torch bf16", "1", 1.2),
             ("bf16 end to end b8 vs torch bf16", "torch bf16", "ours bf16", "torch bf16", "8", 1.0),
             ("bf16 encoder vs torch bf16", "torch bf16", "ours bf16", "torch bf16", "encoder", 1.0),
             ("int8 step b1 vs ours f32", "ours", "ours int8", "ours f32", "step b1", 1.5),
             ("int8 step b8 vs ours f32", "ours", "ours int8", "ours f32", "step b8", 2.0)]
    lines += ["", "| target | measured | met |", "|---|---:|---|"]
    for label, phase, a, b, stage, want in speed:
        try:
            value = faster(phase, a, b, stage)
        except KeyError:
            lines.append(f"| {label} >= {want:.1f}x | not measured | |")
            continue
        lines.append(f"| {label} >= {want:.1f}x | {value:.2f}x | {'yes' if value >= want else 'no'} |")
    if "ours int8" in quality:
        q = quality["ours int8"]
        lines.append(f"| int8 prompt logits within 2% of f32 | {100 * q:.2f}% | {'yes' if q <= 0.02 else 'no'} |")
    for side in OURS:
        for batch, want in ((1, 1.3), (8, 1.5)):
            stage = f"step b{batch}"
            if ("ours", side, stage) in med and (side, stage) in floors:
                value = med["ours", side, stage] / floors[side, stage]
                lines.append(f"| {side} {stage} within {want}x of its floor ({floors[side, stage]:.0f} ms) | "
                             f"{value:.2f}x | {'yes' if value <= want else 'no'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
