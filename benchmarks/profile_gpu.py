"""Where the time of one batch goes (issue 27): each stage of a batch job timed on its own, as a table, a JSON file
and a stacked bar PNG, with an optional ``jax.profiler`` trace whose device time per program is read back here.

One job: ``--batch`` clips of ``--seconds`` (written as 16-bit WAV files and decoded, as a user's files would be),
``--new-tokens`` tokens each with EOS suppressed, random weights. The stages run one after another, each waited
for (``block_until_ready``) before the next starts, so each figure is that stage alone:

* audio decode (host), padding (host), transfer (host to device), log-mel, encoder, projector, prompts (host),
  embed, cache allocation, prefill (the insert of every row at once), decode steps (one on-device loop), results
  (device to host);
* then the pipeline's own path, as transcription runs it: ``encode_batch`` (padding, log-mel, encoder and
  projector in one program, prompts, embed) and the end-to-end ``Transcriber.transcribe`` of the same clips; the
  gap between its wall time and the sum of its device stages is host work between device calls (it starts from
  decoded arrays: file decoding is the first stage's figure).

Every stage compiles in an untimed first pass. ``--trace DIR`` records the end-to-end run with ``jax.profiler``
and prints the device time per compiled program from the trace (``perfetto_trace.json.gz``), without TensorBoard.

    python benchmarks/profile_gpu.py --preset asr-0.6b --batch 256 --out prof/   # GPU, bf16 (~2 min on an H200)
    python benchmarks/profile_gpu.py --preset tiny --batch 8 --dtype float32 --out prof/   # host side, on CPU
    python benchmarks/profile_gpu.py --plot prof/profile.json                    # the PNG again, from the JSON
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import numpy as np
import soundfile as sf

from bench_slots import random_transcriber  # noqa: E402
from bench_throughput import clip_set  # noqa: E402
from qasr_jax.decoding.buckets import frame_bucket, output_buffer  # noqa: E402
from qasr_jax.decoding.pipeline import DecodeOptions, Pipeline, Work  # noqa: E402
from qasr_jax.io.audio import frames_of, load_audio, log_mel_padded, n_frames, pad_waves  # noqa: E402

HOST = "(host)"


def write_wavs(waves: list[np.ndarray], folder: str) -> list[str]:
    """16-bit mono 16 kHz WAV files of ``waves``, as a user's files would be."""
    paths = [os.path.join(folder, f"clip{i}.wav") for i in range(len(waves))]
    for path, w in zip(paths, waves):
        sf.write(path, w, 16000, subtype="PCM_16")
    return paths


class Stages:
    """Named wall times of calls run one at a time, each waited for on the device."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kwargs))
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return out


def split_programs(engine):
    """The encoder and the projector as programs of their own (the engine runs them as one), for the table."""
    mod = engine.runner  # the module the engine's programs run (its params: unrolled or stacked layers)
    tower = jax.jit(lambda p, f, n: mod.apply({"params": p}, f, n, method=lambda m, f, n: m.audio_tower(f, n)))
    proj = jax.jit(lambda p, h: mod.apply({"params": p}, h, method=lambda m, h: m.projector(h)))
    mel = jax.jit(log_mel_padded, static_argnames="frames")
    return mel, tower, proj


def run_stages(asr, paths: list[str], new_tokens: int, programs) -> tuple[dict[str, float], int]:
    """One batch job stage by stage -> (seconds per stage, decode steps)."""
    t, engine = Stages(), asr.model.engine
    mel, tower, proj = programs
    options = DecodeOptions.for_tokenizer(asr.tokenizer, suppress_eos=True)
    pipe = Pipeline(asr.model, asr.tokenizer, options, batch_size=len(paths))
    waves = t(f"audio decode {HOST}", lambda: [load_audio(p) for p in paths])
    frames = frame_bucket(max(n_frames(w.shape[0]) for w in waves), asr.model.config.audio)
    samples, lengths, frames = t(f"padding {HOST}", pad_waves, waves, frames)
    samples, lengths = t("transfer to device", lambda: (engine.put(samples), engine.put(lengths)))
    feats = t("log-mel", mel, samples, lengths, frames=frames)
    hidden, n_tok = t("encoder", tower, engine.params, feats, frames_of(lengths))
    audio = t("projector", proj, engine.params, hidden)
    works = [Work(i, w, new_tokens) for i, w in enumerate(waves)]

    def prompt_ids():
        prompts = [pipe.prompt_ids(w, int(n)) for w, n in zip(works, np.asarray(n_tok))]
        ids = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
        for r, p in enumerate(prompts):
            ids[r, : len(p)] = p
        return engine.put(ids), np.array([len(p) for p in prompts], np.int32)

    ids, prompt_len = t(f"prompts {HOST}", prompt_ids)
    embeds = t("embed", engine.embed, ids, audio)
    out_len = output_buffer(new_tokens)
    state = t("cache allocation", engine.new_state, len(paths), ids.shape[1] + out_len, pipe.cfg, out_len)
    state = t("prefill", engine.insert, state, embeds, prompt_len, np.arange(len(paths)),
              np.full(len(paths), new_tokens), pipe.settings, pipe.cfg)
    state, steps = t("decode steps", engine.advance, state, pipe.settings, pipe.cfg, out_len, until_any_done=False)
    t("results to host", engine.results, state, pipe.cfg, pipe.settings)
    t("pipeline encode_batch (fused)", pipe.encode_batch, works, len(works))
    t("end to end (transcribe)", asr.transcribe, waves, max_new_tokens=new_tokens, batch_size=len(paths),
      suppress_eos=True)
    return t.seconds, steps + 1  # the prefill picks the first token


def device_programs(trace_dir: str) -> dict[str, float]:
    """Device seconds per compiled program in a ``jax.profiler`` trace (its perfetto JSON): the events of the
    device processes ("/device:GPU:0", TPU) summed by XLA module name; {} when the trace has no device process
    (on CPU the programs run on host threads)."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
                   + glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not files:
        return {}
    with gzip.open(files[-1], "rt") as f:
        events = json.load(f)
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    names = {(e.get("pid"), e.get("tid")): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name" and "args" in e}
    procs = {e.get("pid"): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name" and "args" in e}
    device = {p for p, n in procs.items() if re.search(r"device:(GPU|TPU)|/device", str(n))}
    ops = [e for e in events if e.get("ph") == "X" and e.get("pid") in device]
    modules = [e for e in ops if "Module" in names.get((e.get("pid"), e.get("tid")), "")]
    out: dict[str, float] = {}
    for e in modules or ops:  # a trace without a modules line: its kernels by name instead
        name = re.sub(r"^jit_|\(\d+\)$", "", str(e.get("name", "?")))
        out[name] = out.get(name, 0.0) + float(e.get("dur", 0.0)) / 1e6
    if not modules:
        out = dict(sorted(out.items(), key=lambda kv: -kv[1])[:15])
    if ops:  # the share of the traced span in which the device ran anything
        spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in ops)
        busy, end = 0.0, -np.inf
        for a, b in spans:
            busy += max(0.0, b - max(a, end))
            end = max(end, b)
        out["(device busy, any program)"] = busy / 1e6
        out["(traced span)"] = (end - spans[0][0]) / 1e6
    return out


def table(seconds: dict[str, float], audio_s: float, steps: int) -> str:
    """The stage table (markdown): seconds, share of the stage-by-stage sum, audio seconds per second."""
    split = {k: v for k, v in seconds.items() if not k.startswith(("pipeline", "end to end"))}
    total = sum(split.values())
    rows = ["| stage | ms | share | note |", "|---|---:|---:|---|"]
    for name, s in split.items():
        note = f"{steps} steps, {1e3 * s / steps:.2f} ms each" if name == "decode steps" else ""
        rows.append(f"| {name} | {1e3 * s:.1f} | {100 * s / total:.1f}% | {note} |")
    rows.append(f"| **sum of stages** | {1e3 * total:.1f} | 100% | {audio_s / total:.1f} audio-s/s |")
    for name in ("pipeline encode_batch (fused)", "end to end (transcribe)"):
        if name in seconds:
            rows.append(f"| {name} | {1e3 * seconds[name]:.1f} | | {audio_s / seconds[name]:.1f} audio-s/s |")
    e2e = seconds.get("end to end (transcribe)")
    if e2e is not None:
        device = sum(seconds[k] for k in ("pipeline encode_batch (fused)", "cache allocation", "prefill",
                                          "decode steps", "results to host"))
        rows.append(f"| host work between device calls (end to end - its stages) | {1e3 * (e2e - device):.1f} | | |")
    return "\n".join(rows)


def plot(report: dict, path: str) -> None:
    """A stacked bar of the stage times (one bar per run in ``report``) as a PNG; needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = {k: v for k, v in report["seconds"].items() if not k.startswith(("pipeline", "end to end"))}
    fig, ax = plt.subplots(figsize=(7, 6))
    bottom = 0.0
    for i, (name, s) in enumerate(stages.items()):
        ax.bar([report["label"]], [1e3 * s], bottom=bottom, label=name, color=plt.cm.tab20(i),
               hatch="//" if HOST in name else None)
        bottom += 1e3 * s
    e2e = report["seconds"].get("end to end (transcribe)")
    if e2e is not None:
        ax.bar(["end to end"], [1e3 * e2e], color="grey")
    ax.set_ylabel("ms")
    ax.set_title(report["title"], fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="asr-0.6b", choices=["asr-0.6b", "asr-1.7b", "tiny"])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--checkpoint", default=None, help="a saved random checkpoint folder (built if absent)")
    ap.add_argument("--out", default="profile_out", help="folder for profile.json, profile.md and profile.png")
    ap.add_argument("--trace", action="store_true", help="also record the end-to-end run with jax.profiler")
    ap.add_argument("--plot", metavar="JSON", help="only draw the PNG of a saved profile.json")
    args = ap.parse_args()
    if args.plot:
        plot(json.load(open(args.plot)), os.path.splitext(args.plot)[0] + ".png")
        return
    os.makedirs(args.out, exist_ok=True)
    asr = random_transcriber(args.preset, args.checkpoint, dtype=args.dtype)
    clips = clip_set(args.batch, args.seconds)
    paths = write_wavs(clips, tempfile.mkdtemp(prefix="profile_gpu_"))
    programs = split_programs(asr.model.engine)
    start = time.perf_counter()
    run_stages(asr, paths, args.new_tokens, programs)  # compiles every stage
    compile_s = time.perf_counter() - start
    seconds, steps = run_stages(asr, paths, args.new_tokens, programs)
    audio_s = args.batch * args.seconds
    title = (f"{args.preset} {args.dtype}, batch {args.batch} x {args.seconds:g} s, {args.new_tokens} tokens, "
             f"{jax.devices()[0].device_kind} (jax {jax.__version__})")
    report = {"title": title, "label": f"{args.preset} b{args.batch}", "seconds": seconds, "steps": steps,
              "audio_seconds": audio_s, "first_pass_seconds": compile_s}
    if args.trace:
        trace_dir = os.path.join(args.out, "trace")
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            jax.block_until_ready(asr.transcribe(clips, max_new_tokens=args.new_tokens, batch_size=args.batch,
                                                 suppress_eos=True))
        report["device_programs"] = device_programs(trace_dir)
    text = f"{title}; first pass (compiles) {compile_s:.1f} s\n\n{table(seconds, audio_s, steps)}\n"
    if report.get("device_programs"):
        text += "\n| program (from the trace) | device ms |\n|---|---:|\n" + "".join(
            f"| {k} | {1e3 * v:.1f} |\n" for k, v in sorted(report["device_programs"].items(), key=lambda kv: -kv[1]))
    print(text, flush=True)
    with open(os.path.join(args.out, "profile.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "profile.json"), "w") as f:
        json.dump(report, f, indent=1)
    try:
        plot(report, os.path.join(args.out, "profile.png"))
    except ImportError:
        print("matplotlib is not installed (pip install 'qasr-jax[benchmarks]'): "
              f"draw the PNG later with --plot {os.path.join(args.out, 'profile.json')}")


if __name__ == "__main__":
    main()
