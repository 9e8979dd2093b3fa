"""The ``qasr-jax`` command line: transcribe audio, align text to audio, convert checkpoints."""

from __future__ import annotations

import argparse
import collections
import functools
import math
import os
import sys
import uuid

from qasr_jax import __version__
from qasr_jax.aligner import Aligner
from qasr_jax.aligner import MAX_SECONDS as ALIGN_MAX_SECONDS
from qasr_jax.cli.options import (add_hotword_flags, add_layers_flag, add_quantize_flag, check_model_args,
                                  expand_inputs, hotword_problems, mesh_arg, read_hotwords)
from qasr_jax.cli.options import (add_guard_flags, add_subtitle_flags, guard_options, guard_problems, subtitle_options,
                                  subtitle_problems)
from qasr_jax.cli.serve import add_command as add_serve
from qasr_jax.io import formats, progress
from qasr_jax.loading import DTYPES
from qasr_jax.modeling.config import DEFAULT_ALIGNER, DEFAULT_MODEL, MAX_AUDIO_SECONDS

FORMATS = tuple(formats.FORMATS)


def _warn(command: str, message: str) -> None:
    progress.write(f"qasr-jax {command}: warning: {message}\n", file=sys.stderr)


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: a hidden temporary file beside it, synced, then renamed."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it (a preempted VM loses neither)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------------------------------------------
# convert


def _convert(args: argparse.Namespace) -> int:
    if os.path.isfile(args.dst):
        raise ValueError(f"{args.dst}: is a file; pass a folder to write the export into")
    if os.path.isdir(args.dst) and os.listdir(args.dst) and not args.force:
        raise ValueError(f"{args.dst}: folder is not empty; pass --force to write the export into it (files of the "
                         "same names are replaced), or choose a new folder")
    from qasr_jax.modeling.config import load_config
    from qasr_jax.convert.checkpoint import load_hf_params
    from qasr_jax.convert.orbax_io import save_orbax

    cfg = load_config(args.src)
    params = load_hf_params(args.src, cfg, args.dtype)
    save_orbax(args.dst, params, cfg, copy_from=args.src)
    kind = "forced aligner" if cfg.is_aligner else "ASR"
    print(f"converted {kind} checkpoint {args.src} -> {args.dst} ({args.dtype}, Orbax)")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# transcribe


def output_dir_problems(folder: str) -> list[str]:
    """What stops ``--output-dir folder`` from being made or written (a file on its path, no write access)."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):  # the nearest part of the path that exists is where the folders are made
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        return [f"--output-dir {folder}: {path} is a file, not a folder; choose another output folder"]
    if not os.access(path, os.W_OK | os.X_OK):
        return [f"--output-dir {folder}: cannot write in {path} (permission denied); choose another output folder"]
    return []


def check_transcribe_args(args: argparse.Namespace) -> None:
    """Raise a ValueError naming every bad ``transcribe`` flag (by its flag name) before anything is loaded."""
    problems = []
    for flag, value in (("--beam-size", args.beam_size), ("--batch-size", args.batch_size),
                        ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            problems.append(f"{flag} must be >= 1, got {value}")
    if not (math.isfinite(args.max_audio_seconds) and args.max_audio_seconds > 0):
        problems.append(f"--max-audio-seconds must be a positive number of seconds, got {args.max_audio_seconds:g}")
    if not (math.isfinite(args.vad_max_seconds) and args.vad_max_seconds >= 1):
        problems.append(f"--vad-max-seconds must be at least 1 second, got {args.vad_max_seconds:g}")
    problems += hotword_problems(args) + subtitle_problems(args) + guard_problems(args)
    if args.timestamps and not args.aligner:
        problems.append(f"--timestamps needs a forced aligner: add --aligner {DEFAULT_ALIGNER} (or a local aligner "
                        "folder)")
    if args.skip_existing and not args.output_dir:
        problems.append("--skip-existing needs --output-dir (it skips the inputs whose output file is there)")
    if args.output_dir:
        problems += output_dir_problems(args.output_dir)
    cluster = {"--coordinator": args.coordinator, "--num-processes": args.num_processes,
               "--process-id": args.process_id}
    given = [flag for flag, v in cluster.items() if v is not None]
    if given and not args.distributed:
        problems.append(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --distributed (several hosts); "
                        "add it, or drop them")
    if args.num_processes is not None and args.num_processes < 1:
        problems.append(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.process_id is not None and not 0 <= args.process_id < (args.num_processes or args.process_id + 1):
        problems.append(f"--process-id must be in 0..{'N-1' if args.num_processes is None else args.num_processes - 1}"
                        f" (N = --num-processes), got {args.process_id}")
    if problems:
        raise ValueError("; ".join(problems))


class InOrderPrinter:
    """Prints outputs to stdout in input order as they come in (in any order), each under a ``==> path <==``
    header when ``labels`` is set; an input with no output (``None``) is passed over."""

    def __init__(self, sources: list[str], labels: bool):
        self._sources = sources
        self._labels = labels
        self._ready: dict[int, str | None] = {}
        self._next = 0
        self._printed = 0

    def add(self, index: int, text: str | None) -> None:
        """Hand over input ``index``'s output; everything now next in line is printed."""
        self._ready[index] = text
        while self._next in self._ready:
            out = self._ready.pop(self._next)
            if out is not None:
                out = out if out.endswith("\n") else out + "\n"
                if self._labels:  # as head and tail label several files: a blank line, then the header
                    out = ("\n" if self._printed else "") + f"==> {self._sources[self._next]} <==\n" + out
                progress.write(out)
                self._printed += 1
            self._next += 1


def report_result(result, args: argparse.Namespace) -> bool:
    """Print a result's error and warnings on stderr; True when the result failed."""
    if result.error is not None:
        progress.write(f"qasr-jax transcribe: error: {result.error}\n", file=sys.stderr)
    if result.truncated:
        limit = ("its duration's default budget" if args.max_new_tokens is None
                 else f"--max-new-tokens {args.max_new_tokens}")
        _warn("transcribe", f"{result.source}: the transcript stopped at {limit} before the model ended it; raise "
                            "--max-new-tokens (or lower --max-audio-seconds) for the rest")
    return result.error is not None


def _transcribe(args: argparse.Namespace) -> int:
    check_transcribe_args(args)
    if args.aligner and not args.timestamps:
        _warn("transcribe", "--aligner is ignored without --timestamps; add --timestamps for word times")
        args.aligner = None
    if args.distributed:
        from qasr_jax.modeling.sharding import initialize_distributed

        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    from qasr_jax.decoding.pipeline import token_limit
    from qasr_jax.modeling.sharding import host_share
    from qasr_jax.transcribe import Transcriber

    inputs = expand_inputs(args.files)
    if args.distributed:
        inputs = host_share(inputs)  # each process transcribes and writes its own share
    targets: list[str] = []
    if args.output_dir:
        clashes = sorted(n for n, k in collections.Counter(name for _, name in inputs).items() if k > 1)
        if clashes:
            raise ValueError(f"several inputs would write the same output file: {clashes[:5]}; rename them or "
                             "give their folder instead of the files")
        targets = [os.path.join(args.output_dir, f"{name}.{args.output_format}") for _, name in inputs]
        if args.skip_existing:  # outputs are written atomically: one that exists is complete
            keep = [i for i, target in enumerate(targets) if not os.path.exists(target)]
            if len(keep) < len(inputs):
                print(f"qasr-jax transcribe: skipping {len(inputs) - len(keep)} of {len(inputs)} inputs whose "
                      f"output is already in {args.output_dir}", file=sys.stderr)
            inputs, targets = [inputs[i] for i in keep], [targets[i] for i in keep]
    files = [path for path, _ in inputs]
    if not files:  # everything done already, or more processes than inputs
        return 0
    words = read_hotwords(args.hotwords, args.hotwords_file)
    path = check_model_args(args.model, args.language, args.context)
    asr = Transcriber.from_pretrained(path, dtype=args.dtype, aligner=args.aligner,
                                      mesh=mesh_arg(args.mesh), sharding=args.sharding, quantize=args.quantize,
                                      layers=args.layers)
    limit = token_limit(asr.model.config)  # as Transcriber checks it
    if args.max_new_tokens is not None and args.max_new_tokens > limit:
        raise ValueError(f"--max-new-tokens must be at most {limit} for this model (its KV cache), got "
                         f"{args.max_new_tokens}; lower it, or cut the audio shorter with --max-audio-seconds")
    printer = InOrderPrinter(files, labels=len(files) > 1 and args.output_format != "json")
    failed = 0
    boost = {} if args.hotword_boost is None else {"hotword_boost": args.hotword_boost}
    cue_options = subtitle_options(args)
    results = asr.transcribe_iter(
        files, language=args.language, context=args.context, beam_size=args.beam_size,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, return_timestamps=args.timestamps,
        max_audio_seconds=args.max_audio_seconds, errors="collect", progress=sys.stderr.isatty(),
        vad=args.vad, vad_max_seconds=args.vad_max_seconds,
        hotwords=words or None, **boost,
        language_probabilities=args.output_format == "json",  # the detection pass costs a prefill: json only
        **guard_options(args),
    )
    for i, result in results:
        failed += report_result(result, args)
        text = None if result.error is not None and result.text == "" else formats.render(result, args.output_format,
                                                                                         **cue_options)
        if not args.output_dir:
            printer.add(i, text)
        elif text is not None:
            write_atomic(targets[i], text if text.endswith("\n") else text + "\n")
    if failed:
        print(f"qasr-jax transcribe: {failed} of {len(files)} inputs failed", file=sys.stderr)
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------------------------
# align


def _read_transcript(arg: str) -> str:
    if arg == "-":
        return sys.stdin.read()
    if os.path.isfile(arg):
        with open(arg, encoding="utf-8") as f:
            return f.read()
    return arg


@functools.lru_cache(maxsize=2)
def _cli_aligner(model: str, dtype: str) -> Aligner:
    # Cached so that repeated in-process calls (tests, notebooks) reuse the loaded weights and compiled code.
    return Aligner.from_pretrained(model, dtype=dtype)


def _align(args: argparse.Namespace) -> int:
    problems = subtitle_problems(args)
    if problems:
        raise ValueError("; ".join(problems))
    aligner = _cli_aligner(args.model, args.dtype)
    words = aligner.align(args.audio, _read_transcript(args.text), args.language, split=args.split)
    out = formats.render(words, args.output_format, **subtitle_options(args))
    if args.output == "-":
        sys.stdout.write(out)
    else:
        write_atomic(args.output, out)
    return 0


# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="qasr-jax", description="Qwen3-ASR in JAX")
    parser.add_argument("--version", action="version", version=f"qasr-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser(
        "convert", help="convert a PyTorch/HF safetensors checkpoint (official or -hf layout) to an Orbax export"
    )
    conv.add_argument("src", help="checkpoint folder: config.json + *.safetensors (sharded or not)")
    conv.add_argument("dst", help="output folder, new or empty (reload it with qasr_jax.load, no torch needed)")
    conv.add_argument("--dtype", default="float32", choices=DTYPES, help="stored parameter dtype")
    conv.add_argument("--force", action="store_true", help="write into a folder that is not empty")
    conv.set_defaults(func=_convert)

    tr = sub.add_parser("transcribe", help="transcribe audio files (wav, flac, ogg, mp3; others through ffmpeg)")
    tr.add_argument("files", nargs="+", help="audio files, folders of them, or manifests (.txt/.lst, a path a line)")
    tr.add_argument("--model", default=DEFAULT_MODEL,
                    help="checkpoint folder, hub id, or tiny-en (the bundled model)")
    tr.add_argument("--language", default=None, help="force a language (name or ISO code); default: detect")
    tr.add_argument("--context", default="", help="context text: names, hotwords, domain terms")
    add_hotword_flags(tr)
    tr.add_argument("--beam-size", type=int, default=1, help="1 = greedy")
    tr.add_argument("--batch-size", type=int, default=8)
    tr.add_argument("--dtype", default="float32", choices=DTYPES)
    add_quantize_flag(tr)
    add_layers_flag(tr)
    tr.add_argument("--max-new-tokens", type=int, default=None,
                    help="cap on each piece's output tokens (default: 32 + 10 per second of audio)")
    tr.add_argument("--max-audio-seconds", type=float, default=MAX_AUDIO_SECONDS,
                    help="longer audio is cut into pieces")
    tr.add_argument("--vad", action="store_true", help="decode only speech (Silero VAD): skips silence and noise, "
                    "one segment per speech piece; for long recordings with pauses (docs/vad.md)")
    tr.add_argument("--vad-max-seconds", type=float, default=30.0, help="with --vad: longest piece of merged speech")
    add_guard_flags(tr)
    tr.add_argument("--output-format", default="txt", choices=FORMATS)
    add_subtitle_flags(tr)
    tr.add_argument("--output-dir", default=None, help="write FILE_STEM.FORMAT here instead of printing (each file "
                    "whole or not at all)")
    tr.add_argument("--skip-existing", action="store_true", help="with --output-dir: skip the inputs whose output "
                    "file exists, so a stopped job restarts where it stopped")
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

    al = sub.add_parser("align", help="word timestamps for a known transcript (Qwen3-ForcedAligner)")
    al.add_argument("audio", help="audio file (wav, flac, ogg, mp3; others through ffmpeg)")
    al.add_argument("text", help="the transcript; or the path of a UTF-8 text file holding it; or - for stdin")
    al.add_argument("--language", "-l", required=True,
                    help="language of the transcript: Chinese, English, Cantonese, French, German, Italian, "
                         "Japanese, Korean, Portuguese, Russian or Spanish (or its ISO code)")
    al.add_argument("--model", "-m", default=DEFAULT_ALIGNER,
                    help=f"checkpoint folder or hub id (default {DEFAULT_ALIGNER})")
    al.add_argument("--output-format", "-f", choices=FORMATS, default="json",
                    help="json (default), srt or vtt subtitles (one word per cue unless a subtitle flag is given), "
                         "tsv, or txt")
    add_subtitle_flags(al)
    al.add_argument("--output", "-o", default="-", help="output file (default: standard output)")
    al.add_argument("--dtype", choices=DTYPES, default="float32",
                    help="compute dtype (default float32)")
    al.add_argument("--split", action="store_true",
                    help=f"align audio over {ALIGN_MAX_SECONDS / 60:g} min window by window (approximate at joins)")
    al.set_defaults(func=_align)
    from qasr_jax.cli import env as cli_env  # the stream, env and detect-language commands
    from qasr_jax.cli import language as cli_language
    from qasr_jax.cli import stream as cli_stream

    cli_stream.add_command(sub)
    cli_env.add_command(sub)
    cli_language.add_command(sub)
    add_serve(sub)
    from qasr_jax.cli import warmup as cli_warmup

    cli_warmup.add_command(sub)
    from qasr_jax.cli.train import add_commands

    add_commands(sub)  # finetune, evaluate
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qasr-jax`` command."""
    args = build_parser().parse_args(argv)
    if args.command not in ("convert", "env"):  # env reports the cache without making it
        from qasr_jax.decoding.compiles import enable_compilation_cache

        enable_compilation_cache()  # later runs with the same shapes skip compiling (see QASR_JAX_COMPILATION_CACHE)
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError) as e:  # OSError: FileNotFoundError, permissions; ImportError: extras
        print(f"qasr-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
