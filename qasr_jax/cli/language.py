"""The ``qasr-jax detect-language`` command: each file's most probable language and its probability, a line a file."""

from __future__ import annotations

import argparse
import json
import sys

from qasr_jax.decoding.language import MAX_SECONDS, TOP, UNCERTAIN
from qasr_jax.loading import DTYPES
from qasr_jax.modeling.config import DEFAULT_MODEL


def _detect(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or not args.max_seconds > 0:
        raise ValueError(f"--batch-size must be >= 1 and --max-seconds > 0, got {args.batch_size} and "
                         f"{args.max_seconds:g}")
    from qasr_jax.io.audio import AudioError, load_audio
    from qasr_jax.cli.options import expand_inputs
    from qasr_jax.transcribe import Transcriber

    files = [path for path, _ in expand_inputs(args.files)]
    waves, good = [], []
    for path in files:  # a file that cannot be read is reported; the others are still detected
        try:
            waves.append(load_audio(path))
            good.append(path)
        except AudioError as e:
            print(f"qasr-jax detect-language: error: {e}", file=sys.stderr)
    if waves:
        asr = Transcriber.from_pretrained(args.model, dtype=args.dtype)
        dists = asr.detect_language(waves, context=args.context, batch_size=args.batch_size,
                                    max_seconds=args.max_seconds)
        for path, dist in zip(good, dists):
            (name, p), *others = dist.items()
            if args.output_format == "json":
                print(json.dumps({"file": path, "language": name, "language_probability": p,
                                  "language_probabilities": dist}, ensure_ascii=False))
            else:
                runners_up = ", ".join(f"{n} {q:.3f}" for n, q in others[: TOP - 1])
                print(f"{path}\t{name}\t{p:.3f}\t{runners_up}")
    return 1 if len(good) < len(files) else 0


def add_command(sub) -> None:
    """Add the ``detect-language`` subcommand to the CLI's subparsers."""
    dl = sub.add_parser("detect-language", help="the spoken language of each file and its probability (no "
                        "transcript is decoded)", description="Prints FILE, language, probability and the next "
                        f"{TOP - 1} languages, tab-separated, one line a file; a top probability under {UNCERTAIN} "
                        "means the model hesitates (code-switched speech, a clip too short, or no speech).")
    dl.add_argument("files", nargs="+", help="audio files, folders of them, or manifests (.txt/.lst, a path a line)")
    dl.add_argument("--model", default=DEFAULT_MODEL,
                    help="checkpoint folder, hub id, or tiny-en (the bundled model)")
    dl.add_argument("--context", default="", help="context text, as for transcribe")
    dl.add_argument("--max-seconds", type=float, default=MAX_SECONDS,
                    help=f"audio read from the start of each file (default {MAX_SECONDS:g})")
    dl.add_argument("--batch-size", type=int, default=8)
    dl.add_argument("--dtype", default="float32", choices=DTYPES)
    dl.add_argument("--output-format", default="txt", choices=["txt", "json"],
                    help="txt (default) or json: one object a line with every language's probability")
    dl.set_defaults(func=_detect)
