"""The ``qasr-jax`` command line: convert checkpoints (and, as they land, transcribe and align audio)."""

from __future__ import annotations

import argparse
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qasr-jax`` command."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"qasr-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
