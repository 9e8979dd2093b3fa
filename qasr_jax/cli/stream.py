"""``qasr-jax stream``: live transcription of a file (as fast as possible, or paced with ``--realtime``) or of raw
16 kHz mono s16le samples on standard input (``-``: a pipe from ffmpeg, arecord or sox; a WAV stream there is
recognised by its RIFF header and read at its own rate and channel count).

On a terminal the transcript being written is one line rewritten in place, and each committed segment stays on a
line of its own; otherwise (a pipe or a file) each update prints the whole transcript so far as one line, and the
last line is the final transcript.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from collections.abc import Iterator

import numpy as np
import soxr

from qasr_jax.io.audio import SAMPLE_RATE
from qasr_jax.loading import DTYPES
from qasr_jax.modeling.config import DEFAULT_MODEL


def add_command(sub) -> None:
    """Add the ``stream`` subcommand to the CLI's subparsers."""
    st = sub.add_parser("stream", help="live transcription of a file, or of raw 16 kHz s16le audio on stdin (-)")
    st.add_argument("source", help="audio file, or - for raw 16 kHz mono signed 16-bit little-endian samples on "
                                   "stdin (e.g. ffmpeg -i in.mp3 -f s16le -ac 1 -ar 16000 -) or a WAV stream")
    st.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint folder, hub id, or tiny-en (the bundled model)")
    st.add_argument("--language", default=None, help="force a language (name or ISO code); default: detect")
    st.add_argument("--context", default="", help="context text: names, hotwords, domain terms")
    st.add_argument("--chunk-seconds", type=float, default=2.0, help="audio decoded at a time (default 2.0)")
    st.add_argument("--unfixed-chunks", type=int, default=None,
                    help="first chunks decoded without a text prefix (default: 2, and at least 4 s of audio)")
    st.add_argument("--unfixed-tokens", type=int, default=5, help="tokens of the last output each chunk rewrites")
    st.add_argument("--max-new-tokens", type=int, default=32, help="new tokens per chunk at most (default 32)")
    st.add_argument("--segment-seconds", type=float, default=None,
                    help="commit the text at the first pause after this much audio (default 20)")
    st.add_argument("--vad", action="store_true",
                    help="end segments at pauses Silero VAD finds (noise without speech too), not at a quiet tail")
    st.add_argument("--realtime", action="store_true", help="feed a file no faster than it plays")
    st.add_argument("--dtype", default="float32", choices=DTYPES)
    from qasr_jax.cli.options import add_hotword_flags, add_layers_flag, add_quantize_flag

    add_quantize_flag(st)
    add_layers_flag(st)
    add_hotword_flags(st)
    st.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    """Raise a ValueError naming every bad ``stream`` flag before anything is loaded."""
    problems = []
    for flag, value in (("--chunk-seconds", args.chunk_seconds), ("--segment-seconds", args.segment_seconds)):
        if value is not None and not (math.isfinite(value) and value > 0):
            problems.append(f"{flag} must be a positive number of seconds, got {value:g}")
    for flag, value, least in (("--unfixed-chunks", args.unfixed_chunks, 0),
                               ("--unfixed-tokens", args.unfixed_tokens, 0),
                               ("--max-new-tokens", args.max_new_tokens, 1)):
        if value is not None and value < least:
            problems.append(f"{flag} must be >= {least}, got {value}")
    from qasr_jax.cli.options import hotword_problems

    problems += hotword_problems(args)
    if args.realtime and args.source == "-":
        problems.append("--realtime paces a file; audio on stdin arrives at its own pace: drop --realtime")
    if problems:
        raise ValueError("; ".join(problems))


def _file_blocks(path: str, block: int, realtime: bool) -> Iterator[np.ndarray]:
    from qasr_jax.io.audio import load_audio

    wave = load_audio(path)
    start = time.monotonic()
    for at in range(0, wave.shape[0], block):
        if realtime:  # a block is fed once the audio up to its end would have played
            time.sleep(max(0.0, start + (at + block) / SAMPLE_RATE - time.monotonic()))
        yield wave[at : at + block]


def _read_exactly(stream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            break
        data += more
    return data


WAV_FORMATS = {(1, 16): "<i2", (1, 32): "<i4", (3, 32): "<f4"}  # (format tag, bits) -> sample dtype
WAV_EXTENSIBLE = 0xFFFE  # the format tag whose real tag is the first two bytes of its sub-format GUID


def read_wav_header(stream) -> tuple[int, int, str, int | None]:
    """Read a RIFF/WAVE header, its first 12 bytes read already, from ``stream`` up to its samples -> (rate,
    channels, sample dtype, data bytes or None when unknown, as a pipe writes it); ValueError when unusable."""
    fmt = None
    while True:
        chunk = _read_exactly(stream, 8)
        if len(chunk) < 8:
            raise ValueError("stdin: the WAV header ends before its data; pass a whole WAV file or raw samples")
        kind, size = chunk[:4], int.from_bytes(chunk[4:], "little")
        if kind == b"data":
            break
        body = _read_exactly(stream, size + size % 2)  # chunks are padded to an even length
        if kind == b"fmt ":
            tag, channels, rate = (int.from_bytes(body[a:b], "little") for a, b in ((0, 2), (2, 4), (4, 8)))
            bits = int.from_bytes(body[14:16], "little")
            if tag == WAV_EXTENSIBLE and len(body) >= 26:
                tag = int.from_bytes(body[24:26], "little")
            fmt = (tag, bits, channels, rate)
    if fmt is None:
        raise ValueError("stdin: the WAV header has no fmt chunk before its data; pass a valid WAV file")
    tag, bits, channels, rate = fmt
    if (tag, bits) not in WAV_FORMATS or channels < 1 or rate < 1:
        raise ValueError(f"stdin: WAV of format tag {tag} with {bits}-bit samples is not read here (16- or 32-bit "
                         "integer PCM, or 32-bit float); convert it first: ffmpeg -i - -f s16le -ac 1 -ar 16000 -")
    return rate, channels, WAV_FORMATS[(tag, bits)], None if size in (0, 0xFFFFFFFF) else size


def _stdin_blocks(block: int) -> Iterator[np.ndarray]:
    """16 kHz mono float32 blocks from stdin: raw 16 kHz s16le, or a WAV stream (its own rate and channels)."""
    stdin = sys.stdin.buffer
    head = _read_exactly(stdin, 12)
    rate, channels, dtype, left = SAMPLE_RATE, 1, "<i2", None
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":  # a header, not samples
        rate, channels, dtype, left = read_wav_header(stdin)
        head = b""
    frame = channels * np.dtype(dtype).itemsize
    resampler = None if rate == SAMPLE_RATE else soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32")
    pending = head
    while True:
        want = block * frame - len(pending) if left is None else min(block * frame - len(pending), left)
        got = _read_exactly(stdin, want) if want > 0 else b""  # a whole block, or less at the end of the input
        left = None if left is None else left - len(got)
        end = len(got) < want or left == 0
        data = pending + got
        usable = len(data) // frame * frame  # a partial frame at the very end cannot be a sample
        pending = data[usable:]
        samples = np.frombuffer(data[:usable], dtype).reshape(-1, channels).mean(axis=1, dtype=np.float32)
        if dtype != "<f4":
            samples /= np.float32(2 ** (8 * np.dtype(dtype).itemsize - 1))
        if resampler is not None:
            samples = resampler.resample_chunk(samples, last=end)
        if samples.shape[0]:
            yield samples
        if end:
            return


def one_line(text: str) -> str:
    """``text`` on one line: line breaks inside it become spaces, ends stripped."""
    return " ".join(text.splitlines()).strip()


class LineDisplay:
    """Prints Partials: a live line rewritten in place on a terminal, else one line per change."""

    def __init__(self, out):
        self.out = out
        self.tty = out.isatty()
        self.fixed = ""  # committed text already printed for good (terminal)
        self.last = ""  # nothing heard yet prints nothing (silence is an empty transcript)

    def update(self, partial) -> None:
        """Show a Partial."""
        if not self.tty:
            if partial.text != self.last:
                print(one_line(partial.text), file=self.out, flush=True)
                self.last = partial.text
            return
        if len(partial.fixed_text) > len(self.fixed):  # a segment was committed: it keeps its own line
            print(f"\r\x1b[K{one_line(partial.fixed_text[len(self.fixed):])}", file=self.out)
            self.fixed = partial.fixed_text
        live = one_line(partial.text[len(self.fixed):])
        width = max(10, shutil.get_terminal_size().columns - 1)
        if len(live) > width:
            live = "…" + live[-(width - 1):]
        self.out.write(f"\r\x1b[K{live}")
        self.out.flush()

    def final(self, text: str) -> None:
        """Show the final transcript."""
        if self.tty:
            self.out.write(f"\r\x1b[K{one_line(text[len(self.fixed):])}\n")
            self.out.flush()
        else:
            print(one_line(text), file=self.out, flush=True)


def run(args: argparse.Namespace) -> int:
    """The ``stream`` command."""
    check_args(args)
    from qasr_jax.cli.options import check_model_args, read_hotwords
    from qasr_jax.decoding import hotwords as hw
    from qasr_jax.decoding.request import prepare
    from qasr_jax.transcribe import Transcriber

    words = read_hotwords(args.hotwords, args.hotwords_file)
    boost = hw.DEFAULT_BOOST if args.hotword_boost is None else args.hotword_boost
    path = check_model_args(args.model, args.language, args.context)
    asr = Transcriber.from_pretrained(path, dtype=args.dtype, quantize=args.quantize, layers=args.layers)
    options = {} if args.segment_seconds is None else {"segment_seconds": args.segment_seconds}
    request = prepare(asr.tokenizer, asr.languages, args.language, args.context, words, boost)
    driver = asr.stream_driver(slots=1, max_new_tokens=max(32, args.max_new_tokens),
                               hotword_edges=request.hotword_edges, **options)
    stream = driver.open(request, args.chunk_seconds, args.unfixed_chunks, args.unfixed_tokens, args.max_new_tokens,
                         args.vad)
    block = max(1, round(args.chunk_seconds * SAMPLE_RATE))
    blocks = _stdin_blocks(block) if args.source == "-" else _file_blocks(args.source, block, args.realtime)
    display = LineDisplay(sys.stdout)
    for samples in blocks:
        display.update(stream.feed(samples))
    display.final(stream.finish().text)
    return 0
