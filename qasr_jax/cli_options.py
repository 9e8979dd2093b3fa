"""Flags and readers that several ``qasr-jax`` commands share (transcribe, stream, serve, finetune)."""

from __future__ import annotations

import argparse
import math

from qasr_jax.quant import QUANTIZE_MODES


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
    """--quantize: int8 decoder weights (``qasr_jax.quant``)."""
    parser.add_argument("--quantize", default=None, choices=QUANTIZE_MODES,
                        help="int8: the decoder's weights and LM head as int8 (a quarter of float32's bytes, a "
                             "faster decode step on CPU; one device only; see the README's Precision section)")


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


def add_layers_flag(parser: argparse.ArgumentParser) -> None:
    """--layers: how the decoder's layers run (``qasr_jax.load(..., layers=)``)."""
    parser.add_argument("--layers", default="auto", choices=("auto", "scan", "unrolled"),
                        help="scan: compile one decoder layer, not 28 (the default on GPU and TPU); unrolled: the "
                             "fastest CPU decode step (the default on CPU)")
