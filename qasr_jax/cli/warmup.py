"""``qasr-jax warmup``: fill the persistent compilation cache ahead of time (a container image, a TPU pod job), so
the first transcription of those shapes loads its programs instead of compiling them."""

from __future__ import annotations

import argparse
import sys

from qasr_jax.loading import DTYPES


def add_command(sub) -> None:
    """Add the ``warmup`` subcommand to the CLI's subparsers."""
    from qasr_jax.cli.options import add_guard_toggles, add_layers_flag, add_quantize_flag
    from qasr_jax.modeling.config import DEFAULT_MODEL

    wu = sub.add_parser("warmup", help="compile the programs transcription needs into the compilation cache")
    wu.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint folder, hub id, or tiny-en (the bundled model)")
    wu.add_argument("--batch-sizes", default="1,8",
                    help="comma-separated --batch-size values (decode slots) to compile for (default 1,8)")
    wu.add_argument("--max-seconds", type=float, default=30.0,
                    help="compile every encoder bucket of clips up to this long (default 30)")
    wu.add_argument("--stream-seconds", type=float, default=10.0,
                    help="also compile a lone stream's chunks over this much audio (its first five 2 s chunks each "
                         "need new shapes; 0: none; default 10)")
    wu.add_argument("--dtype", default="float32", choices=DTYPES)
    add_quantize_flag(wu)
    add_layers_flag(wu)
    add_guard_toggles(wu)  # as transcribe's: the fallback's stages are programs of their own
    wu.set_defaults(func=run)


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch-sizes must be comma-separated positive integers (e.g. 1,8), got {text!r}")
    return sizes


def run(args: argparse.Namespace) -> int:
    """Load the model and compile every shape the flags ask for; one line per shape on stderr."""
    sizes = _batch_sizes(args.batch_sizes)
    if not args.max_seconds > 0:
        raise ValueError(f"--max-seconds must be a positive number of seconds, got {args.max_seconds:g}")
    if args.stream_seconds < 0:
        raise ValueError(f"--stream-seconds must be >= 0, got {args.stream_seconds:g}")
    import jax

    from qasr_jax.decoding.buckets import bucket_seconds
    from qasr_jax.decoding.compiles import warm_up
    from qasr_jax.transcribe import Fallback, Transcriber

    asr = Transcriber.from_pretrained(args.model, dtype=args.dtype, quantize=args.quantize, layers=args.layers)
    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    total = warm_up(asr, bucket_seconds(args.max_seconds, asr.model.config.audio), sizes,
                    stream_seconds=args.stream_seconds, log=say, stop_loops=args.stop_loops,
                    fallback=Fallback() if args.fallback else None)
    where = jax.config.jax_compilation_cache_dir or "nowhere (the compilation cache is off)"
    say(f"warm-up done: {total.count} programs, {total.compiled} compiled in {total.seconds:.1f} s, kept in {where}")
    return 0
