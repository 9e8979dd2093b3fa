"""Flags and readers that several ``qasr-jax`` commands share (transcribe, stream, serve, finetune)."""

from __future__ import annotations

import argparse
import math
import os

from qasr_jax.modeling.quant import QUANTIZE_MODES


def mesh_arg(spec: str | None):
    """--mesh, or all local devices on the data axis when there are several (None: one device, no mesh)."""
    if spec is not None:
        return spec
    import jax

    return "data=-1" if jax.local_device_count() > 1 else None


def add_hotword_flags(parser: argparse.ArgumentParser) -> None:
    """--hotwords, --hotwords-file and --hotword-boost (read with ``read_hotwords``)."""
    parser.add_argument("--hotwords", default=None, help="comma-separated words and names to bias the search "
                        'towards (e.g. "Qwen,Pallas,JAX"); they are also added to the context')
    parser.add_argument("--hotwords-file", default=None, help="a UTF-8 file of hotwords, one per line (# comments)")
    parser.add_argument("--hotword-boost", type=float, default=None,
                        help="bonus per matched hotword token, in log-probability units (default 2.0)")


def hotword_problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with the hotword flags (see ``add_hotword_flags``)."""
    if args.hotword_boost is not None and not (math.isfinite(args.hotword_boost) and args.hotword_boost >= 0):
        return [f"--hotword-boost must be a non-negative number, got {args.hotword_boost:g}"]
    return []


def add_quantize_flag(parser: argparse.ArgumentParser) -> None:
    """--quantize: int8 layer weights (``qasr_jax.modeling.quant``)."""
    parser.add_argument("--quantize", default=None, choices=QUANTIZE_MODES,
                        help="int8: the decoder's and the audio encoder's layer weights and the LM head as int8 (a "
                             "quarter of float32's bytes, a faster encoder and decode step on CPU; one device only; "
                             "see docs/precision.md)")


def read_hotwords(inline: str | None, path: str | None) -> list[str]:
    """Hotwords from --hotwords "a,b" and --hotwords-file (one a line, # comments), in order, without repeats."""
    words = [w.strip() for w in (inline or "").split(",")]
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                words += [line.split("#", 1)[0].strip() for line in f]
        except OSError as e:
            raise ValueError(f"--hotwords-file {path}: cannot read it ({e.strerror}); pass a UTF-8 text file with "
                             "one hotword per line") from None
    return list(dict.fromkeys(w for w in words if w))


def check_model_args(model: str, language: str | None = None, context: str = "") -> str:
    """Resolve ``--model`` and check it, ``--language`` and ``--context`` before the weights load -> the checkpoint
    folder; a ValueError names each bad flag."""
    import json
    import os

    from qasr_jax.modeling.config import ModelConfig, load_config
    from qasr_jax.convert.orbax_io import CONFIG_FILE, is_orbax_export
    from qasr_jax.io.hub import resolve_model_path
    from qasr_jax.io.prompts import context_problem, normalize_language, supported_languages
    from qasr_jax.io.tokenizer import Tokenizer

    path = resolve_model_path(model)
    if is_orbax_export(path):
        with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
            cfg = ModelConfig.from_dict(json.load(f))
    else:
        cfg = load_config(path)
    if cfg.is_aligner:
        raise ValueError(f"--model {model} is a forced aligner, not an ASR model; pass it as --aligner (with "
                         "--timestamps) and an ASR checkpoint as --model")
    problems = []
    if language is not None and str(language).strip():
        try:
            normalize_language(language, supported_languages(cfg.support_languages))
        except ValueError as e:
            problems.append(f"--language: {e}")
    problem = context_problem(Tokenizer.from_dir(path), context or "", "--context")
    if problem:
        problems.append(problem)
    if problems:
        raise ValueError("; ".join(problems))
    return path


def require_extra(extra: str, modules: tuple[str, ...], command: str) -> None:
    """Raise an ImportError that says how to install the ``extra`` when one of ``modules`` is missing (checked
    before anything is loaded, as ``serve`` does)."""
    import importlib

    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(f"No module named {missing[0]!r}: {command} needs the {extra} extra: "
                          f'pip install ".[{extra}]" in a checkout of qasr-jax (or pip install "SOURCE[{extra}]" '
                          "with the git URL or folder you installed qasr-jax from; it is not on PyPI)")


def add_layers_flag(parser: argparse.ArgumentParser) -> None:
    """--layers: how the decoder's layers run (``qasr_jax.load(..., layers=)``)."""
    parser.add_argument("--layers", default="auto", choices=("auto", "scan", "unrolled"),
                        help="scan: compile one decoder layer, not 28 (the default on GPU and TPU); unrolled: the "
                             "fastest CPU decode step (the default on CPU)")


SUBTITLE_OPTIONS = ("max_line_width", "max_line_count", "max_words_per_line", "max_cue_seconds")


def add_subtitle_flags(parser: argparse.ArgumentParser) -> None:
    """--max-line-width, --max-line-count, --max-words-per-line, --max-cue-seconds: how srt and vtt cues are cut."""
    group = parser.add_argument_group("subtitles (srt, vtt)", "cues break at sentence ends, pauses over 1 s and "
                                      "these limits, never inside a word; word timestamps make better cues")
    group.add_argument("--max-line-width", type=int, default=None,
                       help="characters per line (default 42; 16 for Chinese, Japanese or Korean text)")
    group.add_argument("--max-line-count", type=int, default=None, help="lines per cue (default 2)")
    group.add_argument("--max-words-per-line", type=int, default=None, help="words per line (default: no limit)")
    group.add_argument("--max-cue-seconds", type=float, default=None, help="longest cue on screen (default 7)")


def subtitle_options(args: argparse.Namespace) -> dict:
    """The subtitle flags that were given, as keyword arguments of ``formats.render``."""
    return {name: getattr(args, name) for name in SUBTITLE_OPTIONS if getattr(args, name) is not None}


def subtitle_problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with the subtitle flags (see ``add_subtitle_flags``), by flag name."""
    from qasr_jax.io.formats import CueLimits

    try:
        CueLimits(**subtitle_options(args))
    except ValueError as e:
        message = str(e)
        for name in SUBTITLE_OPTIONS:
            message = message.replace(name, "--" + name.replace("_", "-"))
        return [message]
    return []


def add_guard_toggles(parser) -> None:
    """--stop-loops / --no-stop-loops and --fallback / --no-fallback, both on by default (``transcribe`` and
    ``warmup``, which compiles what they call)."""
    parser.add_argument("--stop-loops", action=argparse.BooleanOptionalAction, default=True,
                        help="stop greedy decoding of a piece whose output ends in a pattern of up to 20 tokens "
                             "repeated 20 times (json: repetition_stopped; default: on)")
    parser.add_argument("--fallback", action=argparse.BooleanOptionalAction, default=True,
                        help="decode a piece that looks hallucinated again, with a repetition penalty, then with 4 "
                             "beams, keeping the first decode that passes the thresholds (default: on)")


def add_guard_flags(parser: argparse.ArgumentParser) -> None:
    """The guard toggles (``add_guard_toggles``) and the fallback's thresholds: guards against repeated and
    hallucinated text."""
    group = parser.add_argument_group("repetition and hallucination guards")
    add_guard_toggles(group)
    group.add_argument("--compression-ratio-threshold", type=float, default=2.4,
                       help="with --fallback: a text compressing (zlib) more than this repeats itself (default 2.4)")
    group.add_argument("--logprob-threshold", type=float, default=-1.0,
                       help="with --fallback: a mean token log-probability under this is unsure (default -1.0)")
    group.add_argument("--no-speech-threshold", type=float, default=0.6,
                       help="with --fallback: an unsure piece whose no-speech probability (1 - Silero VAD's highest "
                            "speech probability in it) is over this is silence, its text dropped (default 0.6; "
                            "1 turns the test off)")


def guard_problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with the guard flags (see ``add_guard_flags``)."""
    if not 0.0 <= args.no_speech_threshold <= 1.0:
        return [f"--no-speech-threshold must be a probability in [0, 1], got {args.no_speech_threshold:g}"]
    return []


def guard_options(args: argparse.Namespace) -> dict:
    """The guard flags as keyword arguments of ``Transcriber.transcribe`` (``stop_loops``, ``fallback``)."""
    from qasr_jax.transcribe import Fallback

    fallback = Fallback(args.compression_ratio_threshold, args.logprob_threshold,
                        args.no_speech_threshold if args.no_speech_threshold < 1.0 else None) if args.fallback else None
    return {"stop_loops": args.stop_loops, "fallback": fallback}


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
