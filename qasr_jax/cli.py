"""The ``qasr-jax`` command line: transcribe audio, align text to audio, convert checkpoints."""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys


def _convert(args: argparse.Namespace) -> int:
    from qasr_jax.config import load_config
    from qasr_jax.convert.checkpoint import load_hf_params
    from qasr_jax.convert.orbax_io import save_orbax

    cfg = load_config(args.src)
    params = load_hf_params(args.src, cfg, args.dtype)
    save_orbax(args.dst, params, cfg, copy_from=args.src)
    kind = "forced aligner" if cfg.is_aligner else "ASR"
    print(f"converted {kind} checkpoint {args.src} -> {args.dst} ({args.dtype}, Orbax)")
    return 0


FORMATS = ("txt", "json", "srt", "vtt", "tsv")


def _render(result, fmt: str) -> str:
    """One result in an output format; with word timestamps, subtitles have one cue per word."""
    from qasr_jax import formats

    if fmt == "json":
        return json.dumps(result.to_dict(), ensure_ascii=False)
    if fmt == "txt":
        return result.text
    cues = result.words if result.words is not None else result.segments
    return {"srt": formats.to_srt, "vtt": formats.to_vtt, "tsv": formats.to_tsv}[fmt](cues)


AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".aiff", ".aif", ".wma", ".webm", ".mp4")
MANIFEST_SUFFIXES = (".txt", ".lst")


def expand_inputs(args: list[str]) -> list[tuple[str, str]]:
    """Command-line inputs -> (audio path, output name without suffix): a folder gives its audio files (recursively,
    sorted), a manifest (.txt / .lst) the paths it lists one per line (relative to the manifest; # comments),
    anything else is an audio file. Names keep the path below a folder or manifest, so they do not collide."""
    out: list[tuple[str, str]] = []

    def stem(path: str, root: str | None) -> str:
        rel = os.path.relpath(path, root) if root else os.path.basename(path)
        if rel.startswith(os.pardir):
            rel = os.path.basename(path)
        return os.path.splitext(rel)[0] or "audio"

    for arg in args:
        if os.path.isdir(arg):
            found = sorted(
                os.path.join(d, f) for d, _, files in os.walk(arg) for f in files if f.lower().endswith(AUDIO_SUFFIXES)
            )
            if not found:
                raise ValueError(f"{arg}: folder holds no audio files ({', '.join(AUDIO_SUFFIXES)})")
            out.extend((f, stem(f, arg)) for f in found)
        elif arg.lower().endswith(MANIFEST_SUFFIXES):
            root = os.path.dirname(os.path.abspath(arg))
            with open(arg, encoding="utf-8") as f:
                lines = [line.strip() for line in f]
            paths = [os.path.join(root, line) for line in lines if line and not line.startswith("#")]
            out.extend((path, stem(path, root)) for path in paths)
        else:
            out.append((arg, stem(arg, None)))
    return out


def _mesh_arg(spec: str | None):
    """--mesh, or all local devices on the data axis when there are several (None: one device, no mesh)."""
    if spec is not None:
        return spec
    import jax

    return "data=-1" if jax.local_device_count() > 1 else None


def _transcribe(args: argparse.Namespace) -> int:
    if args.distributed:
        from qasr_jax.sharding import initialize_distributed

        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    from qasr_jax.sharding import host_share
    from qasr_jax.transcribe import Transcriber

    inputs = expand_inputs(args.files)
    if args.distributed:
        inputs = host_share(inputs)  # each process transcribes and writes its own share
    if args.output_dir:
        clashes = sorted(n for n, k in collections.Counter(name for _, name in inputs).items() if k > 1)
        if clashes:
            raise ValueError(f"several inputs would write the same output file: {clashes[:5]}; rename them or "
                             "give their folder instead of the files")
    out_name = dict(inputs)
    files = [path for path, _ in inputs]
    if not files:  # more processes than inputs
        return 0
    asr = Transcriber.from_pretrained(args.model, dtype=args.dtype, aligner=args.aligner,
                                      mesh=_mesh_arg(args.mesh), sharding=args.sharding)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    failed = 0
    results = asr.transcribe_iter(
        files, language=args.language, context=args.context, beam_size=args.beam_size,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, return_timestamps=args.timestamps,
        max_audio_seconds=args.max_audio_seconds, errors="collect", progress=sys.stderr.isatty(),
    )
    for _, result in results:
        if result.error is not None:
            failed += 1
            print(f"qasr-jax transcribe: error: {result.error}", file=sys.stderr)
            if result.text == "":
                continue
        text = _render(result, args.output_format)
        if args.output_dir:
            target = os.path.join(args.output_dir, f"{out_name[result.source]}.{args.output_format}")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w", encoding="utf-8") as f:
                f.write(text if text.endswith("\n") else text + "\n")
        else:
            print(text, flush=True)
    if failed:
        print(f"qasr-jax transcribe: {failed} of {len(files)} inputs failed", file=sys.stderr)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="qasr-jax", description="Qwen3-ASR in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser(
        "convert", help="convert a PyTorch/HF safetensors checkpoint (official or -hf layout) to an Orbax export"
    )
    conv.add_argument("src", help="checkpoint folder: config.json + *.safetensors (sharded or not)")
    conv.add_argument("dst", help="output folder (reload it with qasr_jax.load, no torch needed)")
    conv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="stored parameter dtype")
    conv.set_defaults(func=_convert)

    tr = sub.add_parser("transcribe", help="transcribe audio files (any format librosa reads)")
    tr.add_argument("files", nargs="+", help="audio files, folders of them, or manifests (.txt/.lst, a path a line)")
    tr.add_argument("--model", default="Qwen/Qwen3-ASR-0.6B", help="checkpoint folder or hub id")
    tr.add_argument("--language", default=None, help="force a language (name or ISO code); default: detect")
    tr.add_argument("--context", default="", help="context text: names, hotwords, domain terms")
    tr.add_argument("--beam-size", type=int, default=1, help="1 = greedy")
    tr.add_argument("--batch-size", type=int, default=8)
    tr.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    tr.add_argument("--max-new-tokens", type=int, default=448)
    tr.add_argument("--max-audio-seconds", type=float, default=1200.0, help="longer audio is cut into pieces")
    tr.add_argument("--output-format", default="txt", choices=FORMATS)
    tr.add_argument("--output-dir", default=None, help="write FILE_STEM.FORMAT here instead of printing")
    tr.add_argument("--aligner", default=None, help="ForcedAligner folder or hub id, for --timestamps")
    tr.add_argument("--timestamps", action="store_true", help="word timestamps (needs --aligner)")
    tr.add_argument("--mesh", default=None, help="device mesh, e.g. data=8,model=1 (default: all local devices "
                    "on data)")
    tr.add_argument("--sharding", default=None, choices=["data", "tensor", "fsdp"],
                    help="parameter sharding preset (default: tensor when model > 1, else data)")
    tr.add_argument("--distributed", action="store_true", help="many hosts: join with jax.distributed.initialize(); "
                    "each process transcribes and writes its own share of the inputs")
    tr.add_argument("--coordinator", default=None, help="with --distributed: host:port of process 0 (found "
                    "automatically on TPU pods and SLURM)")
    tr.add_argument("--num-processes", type=int, default=None, help="with --distributed: process count")
    tr.add_argument("--process-id", type=int, default=None, help="with --distributed: this process's index")
    tr.set_defaults(func=_transcribe)

    from qasr_jax.aligner import add_align_arguments, align_command

    al = sub.add_parser("align", help="word timestamps for a known transcript (Qwen3-ForcedAligner)")
    add_align_arguments(al).set_defaults(func=align_command)
    from qasr_jax.cli_train import add_commands

    add_commands(sub)  # finetune, evaluate
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qasr-jax`` command."""
    args = build_parser().parse_args(argv)
    if args.command != "convert":
        from qasr_jax.compiles import enable_compilation_cache

        enable_compilation_cache()  # later runs with the same shapes skip compiling (see QASR_JAX_COMPILATION_CACHE)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"qasr-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
