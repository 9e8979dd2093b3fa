"""Compile time and program counts (issue 24): what a user waits for before the first transcript.

Sections (``--sections``, comma-separated):

* ``layers``: lower and compile times of the decode step and a 256-token prefill for the decoder of ``--preset``'s
  width cut to 4 and to its full depth, scanned and unrolled; abstract parameters (nothing allocated).
* ``step``: decode step time at batch 1 and 8, scanned and unrolled, random weights of ``--preset`` (real size:
  run it alone).
* ``cli``: ``qasr-jax transcribe`` of one 5 s clip (``--max-new-tokens 32``) with an empty compilation cache, then
  again with the cache it filled (subprocesses; the random checkpoint is saved to ``--checkpoint``).
* ``programs``: the programs one CLI job of 20 mixed-length files compiles (tiny model unless ``--preset``), and
  one stream of 10 s in 2 s chunks, by name.
* ``stream``: a new stream's open-to-first-partial time in a fresh process, cold and warm compilation cache,
  against a steady chunk (random weights of ``--preset``, saved to ``--checkpoint``).
* ``buckets``: compile seconds per new batch bucket (1, 32, 256 clips of 10 s, 32 new tokens) for ``--preset`` in
  ``--dtype``, scanned and unrolled (the GPU check in gpu_checks.sh).

    python benchmarks/bench_compile.py --sections layers --preset asr-0.6b
    python benchmarks/bench_compile.py --sections step,cli --preset asr-0.6b --checkpoint /tmp/asr06
    python benchmarks/bench_compile.py --sections programs
    python benchmarks/bench_compile.py --sections stream --preset asr-0.6b --checkpoint /tmp/asr06
    python benchmarks/bench_compile.py --sections buckets,step --preset asr-0.6b --dtype bfloat16   # GPU
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import soundfile as sf

from qasr_jax.decoding.compiles import count_compilations
from qasr_jax.decoding.engine import Engine
from qasr_jax.io.tokenizer import Tokenizer
from qasr_jax.loading import Model
from qasr_jax.modeling.config import preset
from qasr_jax.modeling.model import param_shapes
from qasr_jax.testing import synthetic
from qasr_jax.transcribe import Transcriber

MODES = ("scan", "unrolled")
JOB_SECONDS = [0.4, 1.3, 2.2, 3.1, 4.7, 5.5, 6.9, 7.4, 8.8, 9.6, 10.2, 11.5, 12.9, 13.3, 14.8, 15.2, 1.9, 3.6, 6.1, 16.0]


def with_layers(cfg, layers: int):
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, layers=layers))


def random_params(cfg, dtype: str):
    """Random weights of ``cfg`` made on the device (scaled so that nothing overflows)."""
    shapes = param_shapes(cfg, dtype)
    leaves, tree = jax.tree_util.tree_flatten(shapes)
    key = jax.random.PRNGKey(0)
    return jax.tree_util.tree_unflatten(tree, [
        (0.02 * jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)).astype(x.dtype)
        for i, x in enumerate(leaves)])


def section_layers(args) -> None:
    base = preset(args.preset)
    print(f"\n### Compile: decoder of {args.preset}'s width, abstract parameters ({jax.default_backend()})\n")
    print("| program | layers | mode | lower s | compile s |")
    print("|---|---:|---|---:|---:|")
    for depth in (4, base.text.layers):
        cfg = with_layers(base, depth)
        for mode in MODES:
            eng = Engine(cfg, param_shapes(cfg, args.dtype), args.dtype, layers=mode)
            cache = jax.eval_shape(lambda: eng.init_cache(1, 512))
            hidden = jax.ShapeDtypeStruct((1, 256, cfg.text.hidden_size), jnp.dtype(args.dtype))
            one = jax.ShapeDtypeStruct((1,), jnp.int32)
            programs = {"step": (eng._step, (eng._params, one, jax.ShapeDtypeStruct((1,), bool), cache)),
                        "prefill 256": (eng._extend, (eng._params, hidden, one, cache, None))}
            for name, (fn, fn_args) in programs.items():
                start = time.perf_counter()
                lowered = fn.lower(*fn_args)
                mid = time.perf_counter()
                lowered.compile()
                print(f"| {name} | {depth} | {mode} | {mid - start:.2f} | {time.perf_counter() - mid:.2f} |",
                      flush=True)


def section_step(args) -> None:
    cfg = preset(args.preset)
    params = random_params(cfg, args.dtype)
    print(f"\n### Decode step, {args.preset} random weights, {args.dtype} ({jax.default_backend()}), 512-position "
          "cache\n")
    print("| mode | batch | first call s | step ms (median / min of 20) |")
    print("|---|---:|---:|---:|")
    for mode in MODES:
        eng = Engine(cfg, params, args.dtype, layers=mode)
        for batch in (1, 8):
            cache = eng.init_cache(batch, 512)
            tokens = np.zeros(batch, np.int32)
            times = []
            for _ in range(21):
                start = time.perf_counter()
                logits, cache = eng.step(cache, tokens)
                logits.block_until_ready()
                times.append(time.perf_counter() - start)
            print(f"| {mode} | {batch} | {times[0]:.2f} | {np.median(times[1:]) * 1e3:.1f} / "
                  f"{min(times[1:]) * 1e3:.1f} |", flush=True)
        del eng


_PROBE = ("import sys, json; from qasr_jax.cli.core import main; from qasr_jax.decoding.compiles import count_compilations\n"
          "with count_compilations() as c:\n    code = main(sys.argv[1:])\n"
          "print('PROGRAMS', json.dumps({'count': c.count, 'compiled': c.compiled, 'seconds': c.seconds, "
          "'names': c.names}), file=sys.stderr)\nsys.exit(code)")


def run_probe(code: str, argv: list[str], tag: str, env: dict | None = None) -> tuple[float, dict]:
    """Run ``code`` in a fresh Python process with ``argv`` -> (wall s, the JSON it printed to stderr after
    ``tag``)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    line = next(x for x in proc.stderr.splitlines() if x.startswith(tag + " "))
    return wall, json.loads(line[len(tag) + 1:])


def run_cli(cli_args: list[str], cache: str, layers: str = "auto") -> tuple[float, dict]:
    """``qasr-jax ARGS`` in a fresh process with the compilation cache in ``cache`` and $QASR_JAX_LAYERS set to
    ``layers`` -> (wall s, its programs)."""
    env = {**os.environ, "QASR_JAX_COMPILATION_CACHE": cache, "QASR_JAX_LAYERS": layers}
    return run_probe(_PROBE, cli_args, "PROGRAMS", env)


def checkpoint_folder(args) -> str:
    """A random-weight checkpoint of ``--preset`` with the real tokenizer (saved once to ``--checkpoint``)."""
    from bench_slots import random_transcriber

    folder = args.checkpoint or tempfile.mkdtemp(prefix="bench_compile_")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        random_transcriber(args.preset, folder)  # saves the folder (and loads it once: not needed here)
    return folder


def section_cli(args) -> None:
    folder = checkpoint_folder(args)
    clip = os.path.join(tempfile.mkdtemp(), "five.wav")
    sf.write(clip, synthetic(5.0, 1), 16000)
    cache = tempfile.mkdtemp(prefix="xla_")
    print(f"\n### CLI cold and warm: {args.preset}, one 5 s clip, 32 new tokens, layers={args.layers}\n")
    print("| run | wall s | programs | compiled | compile s |")
    print("|---|---:|---:|---:|---:|")
    for run in ("cold (empty cache)", "warm (cache filled)"):
        wall, c = run_cli(["transcribe", clip, "--model", folder, "--max-new-tokens", "32", "--dtype", args.dtype],
                          cache, args.layers)
        print(f"| {run} | {wall:.1f} | {c['count']} | {c['compiled']} | {c['seconds']:.1f} |", flush=True)


def by_name(names: list[str]) -> str:
    return ", ".join(f"{n} x{k}" if k > 1 else n for n, k in collections.Counter(names).most_common())


def section_programs(args) -> None:
    folder = checkpoint_folder(args)
    job = tempfile.mkdtemp(prefix="job_")
    files = []
    for i, s in enumerate(JOB_SECONDS):
        files.append(os.path.join(job, f"clip{i:02d}.wav"))
        sf.write(files[-1], synthetic(s, i), 16000)
    cache = tempfile.mkdtemp(prefix="xla_")
    cli = ["transcribe", *files, "--model", folder, "--batch-size", "8", "--output-dir", os.path.join(job, "out"),
           "--dtype", args.dtype]
    _, first = run_cli(cli, cache)
    _, again = run_cli(cli + ["--output-dir", os.path.join(job, "again")], cache)
    print(f"\n### Programs: one CLI job of {len(files)} files ({min(JOB_SECONDS)}-{max(JOB_SECONDS)} s), --batch-size 8,"
          f" {args.preset}\n")
    print(f"first run: {first['count']} programs ({first['seconds']:.1f} s): {by_name(first['names'])}")
    print(f"second run, same cache: {again['count']} programs, {again['compiled']} compiled")
    asr = Transcriber(Model(preset(args.preset), random_params(preset(args.preset), args.dtype), args.dtype),
                      Tokenizer.from_dir(folder))
    with count_compilations() as c:
        stream = asr.stream()
        for i in range(0, 10 * 16000, 8000):
            stream.feed(synthetic(0.5, i))
        stream.finish()
    print(f"one stream of 10 s (2 s chunks): {c.count} programs ({c.seconds:.1f} s): {by_name(c.names)}")


_STREAM_PROBE = """
import json, sys, time
from qasr_jax.decoding.compiles import count_compilations, enable_compilation_cache
enable_compilation_cache(sys.argv[2])
from qasr_jax.testing import synthetic
from qasr_jax.transcribe import Transcriber
asr = Transcriber.from_pretrained(sys.argv[1], dtype=sys.argv[3])
audio, chunk, out = synthetic(float(sys.argv[4]), 7), 32000, {"chunks": [], "programs": []}
with count_compilations() as c:
    start = time.perf_counter()
    stream = asr.stream()
    out["open"] = time.perf_counter() - start
    for k in range(0, audio.shape[0], chunk):
        before, t = c.count, time.perf_counter()
        stream.feed(audio[k:k + chunk])
        out["chunks"].append(time.perf_counter() - t)
        out["programs"].append(c.count - before)
    stream.finish()
print("STREAM", json.dumps(out), file=sys.stderr)
"""


def section_stream(args) -> None:
    """A new stream in a fresh process (2 s chunks of 20 s of audio, the default 32 new tokens): the time from
    ``asr.stream()`` to its first partial, cold (empty compilation cache) and warm (the cache the cold run filled),
    against a steady chunk (the median of chunks 6 on)."""
    folder = checkpoint_folder(args)
    cache = tempfile.mkdtemp(prefix="xla_")
    print(f"\n### A new stream: {args.preset} {args.dtype}, 2 s chunks, open to first partial\n")
    print("| cache | open s | first chunk s | open to first partial s | steady chunk s (median) | ratio | "
          "programs in chunks 0-5 |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for run in ("cold (empty)", "warm (filled by the cold run)"):
        _, r = run_probe(_STREAM_PROBE, [folder, cache, args.dtype, "20"], "STREAM")
        first, steady = r["open"] + r["chunks"][0], float(np.median(r["chunks"][6:]))
        print(f"| {run} | {r['open']:.1f} | {r['chunks'][0]:.1f} | {first:.1f} | {steady:.2f} | "
              f"{first / steady:.1f}x | {r['programs'][:6]} |", flush=True)


def section_buckets(args) -> None:
    from bench_throughput import clip_set
    from qasr_jax.testing.tokenizer_files import write_tokenizer

    cfg = preset(args.preset)
    params = random_params(cfg, args.dtype)
    folder = tempfile.mkdtemp(prefix="tok_")
    write_tokenizer(folder, "official")
    tok = Tokenizer.from_dir(folder)
    print(f"\n### Compile per new batch bucket: {args.preset} {args.dtype}, clips of 10 s, 32 new tokens "
          f"({jax.devices()[0].device_kind})\n")
    print("| mode | batch | programs | compile s | wall s of the first pass |")
    print("|---|---:|---:|---:|---:|")
    for mode in MODES:
        asr = Transcriber(Model(cfg, params, args.dtype, layers=mode), tok)
        for batch in (1, 32, 256):
            waves = clip_set(batch, 10.0)
            start = time.perf_counter()
            with count_compilations() as c:
                asr.transcribe(waves, max_new_tokens=32, batch_size=batch, suppress_eos=True)
            print(f"| {mode} | {batch} | {c.count} | {c.seconds:.1f} | {time.perf_counter() - start:.1f} |",
                  flush=True)
        del asr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", default="layers,programs")
    ap.add_argument("--preset", default=None, help="default: asr-0.6b (programs: tiny)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--layers", default="auto", choices=("auto",) + MODES, help="the cli section's --layers")
    ap.add_argument("--checkpoint", default=None, help="a random checkpoint folder (built there if empty)")
    args = ap.parse_args()
    sections = args.sections.split(",")
    print(f"jax {jax.__version__}, {jax.default_backend()}: {jax.devices()[0].device_kind}")
    for name in sections:
        args.preset = args.preset or ("tiny" if name == "programs" else "asr-0.6b")
        {"layers": section_layers, "step": section_step, "cli": section_cli, "programs": section_programs,
         "stream": section_stream, "buckets": section_buckets}[name](args)


if __name__ == "__main__":
    main()
