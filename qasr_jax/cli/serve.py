"""``qasr-jax serve``: the OpenAI-compatible transcription server (needs the ``serve`` extra)."""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys

from qasr_jax.loading import DTYPES
from qasr_jax.modeling.config import DEFAULT_MODEL, MAX_AUDIO_SECONDS


def add_command(subparsers) -> None:
    """Add ``serve`` to the ``qasr-jax`` command's subparsers."""
    sv = subparsers.add_parser("serve", help="serve the OpenAI transcription API (pip install '.[serve]')")
    sv.add_argument("--model", default=DEFAULT_MODEL,
                    help="checkpoint folder, hub id, or tiny-en (the bundled model)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--dtype", default="float32", choices=DTYPES)
    from qasr_jax.cli.options import add_layers_flag, add_quantize_flag

    add_quantize_flag(sv)
    add_layers_flag(sv)
    sv.add_argument("--mesh", default=None, help="device mesh, e.g. data=8,model=1 (default: all local devices "
                    "on data)")
    sv.add_argument("--aligner", default=None, help="ForcedAligner folder or hub id: word timestamps "
                    "(timestamp_granularities[]=word)")
    sv.add_argument("--max-slots", type=int, default=32, help="requests decoded at once (continuous batching)")
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    sv.add_argument("--max-upload-mb", type=float, default=25.0, help="larger uploads get a 413")
    sv.add_argument("--max-audio-seconds", type=float, default=MAX_AUDIO_SECONDS,
                    help="longer audio gets a 400")
    sv.add_argument("--piece-seconds", type=float, default=30.0, help="longer uploads decode as pieces of at most "
                    "this length, cut at quiet points (Transcriber.transcribe's max_audio_seconds); memory grows "
                    "with it")
    sv.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV cache memory (GiB) all the requests "
                    "decoding at once share; fewer than --max-slots slots fit when requests are long")
    sv.add_argument("--max-queue", type=int, default=256, help="requests in flight at most; more get a 503 with "
                    "Retry-After")
    sv.add_argument("--realtime-slots", type=int, default=8, help="realtime utterances transcribed at once "
                    "(WS /v1/realtime; 0 turns the endpoint's streams off)")
    sv.add_argument("--served-model-name", default=None, help="the model id /v1/models lists (default: --model); "
                    "requests naming any model (e.g. whisper-1) are answered by this one")
    sv.add_argument("--strict-model-name", action="store_true", help="answer only requests whose model is "
                    "--served-model-name (others get a 404)")
    sv.set_defaults(func=serve)


def check_serve_args(args: argparse.Namespace) -> None:
    """Raise a ValueError naming every bad ``serve`` flag before anything is loaded."""
    problems = []
    if not 0 <= args.port <= 65535:
        problems.append(f"--port must be in 0..65535, got {args.port}")
    for flag, value in (("--max-slots", args.max_slots), ("--max-queue", args.max_queue)):
        if value < 1:
            problems.append(f"{flag} must be >= 1, got {value}")
    if args.realtime_slots < 0:
        problems.append(f"--realtime-slots must be >= 0, got {args.realtime_slots}")
    for flag, value in (("--max-upload-mb", args.max_upload_mb), ("--max-audio-seconds", args.max_audio_seconds),
                        ("--piece-seconds", args.piece_seconds), ("--kv-cache-gb", args.kv_cache_gb)):
        if not (math.isfinite(value) and value > 0):
            problems.append(f"{flag} must be a positive number, got {value:g}")
    if args.api_key is not None and not args.api_key.strip():
        problems.append("--api-key must not be empty")
    if problems:
        raise ValueError("; ".join(problems))


def serve(args: argparse.Namespace) -> int:
    """Load the model, then serve until SIGINT/SIGTERM (which finish the requests in flight first)."""
    check_serve_args(args)
    try:
        import uvicorn

        from qasr_jax.server.app import Server, ServerConfig, build_app
    except ImportError as e:
        raise ImportError(f"{e}; the server needs the serve extra: pip install '.[serve]' in a checkout of "
                          "qasr-jax") from None
    from qasr_jax.cli.options import mesh_arg
    from qasr_jax.server import heap
    from qasr_jax.transcribe import Transcriber

    heap.limit_arenas()  # before the model loads and the threads start (qasr_jax.server.heap)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asr = Transcriber.from_pretrained(args.model, dtype=args.dtype, aligner=args.aligner, mesh=mesh_arg(args.mesh),
                                      quantize=args.quantize, layers=args.layers)
    config = ServerConfig(args.served_model_name or args.model, args.max_slots, args.api_key, args.max_upload_mb,
                          args.max_audio_seconds, args.max_queue, args.realtime_slots, args.piece_seconds,
                          args.kv_cache_gb, args.strict_model_name)
    print(f"qasr-jax serve: {config.model_id} loaded; warming up, then serving on http://{args.host}:{args.port}",
          file=sys.stderr, flush=True)
    # uvicorn finishes the requests in flight on SIGTERM/SIGINT, then raises the signal again for the handler
    # that was there before it: this one, so that a graceful stop exits with 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server = Server(asr, config)
    uvicorn.run(build_app(server), host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=None)
    if server.failed:
        print(f"qasr-jax serve: error: the engine failed: {server.failed}", file=sys.stderr)
        return 1
    print("qasr-jax serve: stopped", file=sys.stderr)
    return 0
