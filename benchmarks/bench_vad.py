"""Voice activity detection: Silero VAD v6 frames per second in JAX against Silero's ONNX model under onnxruntime,
and what ``transcribe(vad=True)`` saves end to end on a long recording with pauses and noise.

1. Frames per second (32 ms each) on one stream and on ``--streams`` streams in one program: ours is one call of
   ``qasr_jax.vad.network.speech_probabilities_batch`` over ``--vad-seconds`` of audio per stream; onnxruntime runs Silero's
   ``silero_vad.onnx`` frame by frame with its state, as ``get_speech_timestamps`` does (the streams as one batch).
   The probabilities of both are compared (max difference printed).
2. ``--minutes`` of the stored espeak-ng clips (tests/data) with ``--pause-fraction`` of the time in 1-5 s pauses of
   low noise and louder noise bursts, transcribed without VAD (cut at energy minima into ``--piece-seconds``
   pieces) and with ``vad=True`` (pieces of at most ``--piece-seconds``), on a random-weight ``--preset``
   checkpoint (random weights decode each piece to its token budget, so the time follows the audio decoded) or
   on ``--checkpoint`` (the trained tiny model stops each piece at its end token).

    python benchmarks/bench_vad.py [--streams 64] [--vad-seconds 60] [--minutes 20] [--preset asr-0.6b]
    python benchmarks/bench_vad.py --minutes 1 --preset tiny --vad-seconds 10   # smoke run
    python benchmarks/bench_vad.py --skip-frames --minutes 5 --tokens-per-second 3 --checkpoint DIR  # random 0.6B
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import time

import jax
import numpy as np

from qasr_jax.testing import DATA
from qasr_jax.vad.network import FRAME_SAMPLES, initial_state, speech_probabilities_batch, vad_params
from bench_slots import cpu_name, random_transcriber

SR = 16000


def clips() -> list[np.ndarray]:
    """Every stored espeak-ng clip of tests/data (16 kHz)."""
    import soundfile as sf

    paths = sorted(glob.glob(os.path.join(DATA, "*.wav")) + glob.glob(os.path.join(DATA, "newwords", "*.wav")))
    return [sf.read(p, dtype="float32")[0] for p in paths]


def long_recording(minutes: float, pause_fraction: float, seed: int = 0) -> tuple[np.ndarray, float]:
    """Clips in random order separated by 0.3 s gaps or 1-5 s pauses (low noise, a third with a louder burst) until
    ``minutes``, pauses taking about ``pause_fraction`` of the time; returns the audio and its speech seconds."""
    rng, pool = np.random.default_rng(seed), clips()
    parts, total, spoken = [], 0, 0
    while total < minutes * 60 * SR:
        clip = pool[rng.integers(len(pool))]
        parts.append(clip)
        spoken += clip.shape[0]
        total += clip.shape[0]
        owed = pause_fraction / (1 - pause_fraction) * spoken - (total - spoken)  # pause samples still due
        gap = (0.003 * rng.standard_normal(int(rng.uniform(1.0, 5.0) * SR if owed >= SR else 0.3 * SR)))
        if gap.shape[0] >= SR and rng.uniform() < 1 / 3:  # a burst of louder noise in a third of the pauses
            gap[gap.shape[0] // 4 : gap.shape[0] // 2] *= 16
        parts.append(gap.astype(np.float32))
        total += gap.shape[0]
    limit = int(minutes * 60 * SR)
    is_speech = np.concatenate([np.full(p.shape[0], i % 2 == 0) for i, p in enumerate(parts)])[:limit]
    return np.concatenate(parts)[:limit], float(is_speech.sum()) / SR


def ours_fps(audio: np.ndarray, repeats: int) -> tuple[float, np.ndarray]:
    """Frames per second of one batched JAX call over (streams, samples) audio, and its probabilities."""
    streams, n = audio.shape
    frames = n // FRAME_SAMPLES
    counts = np.full(streams, frames, np.int32)
    params, state = vad_params(), initial_state(streams)
    probs = jax.block_until_ready(speech_probabilities_batch(params, audio, counts, state)[0])  # compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(speech_probabilities_batch(params, audio, counts, state))
        times.append(time.perf_counter() - start)
    return streams * frames / statistics.median(times), np.asarray(probs)


def onnx_fps(audio: np.ndarray) -> tuple[float, np.ndarray]:
    """Frames per second of Silero's ONNX model under onnxruntime (one thread, as Silero sets it), frame by frame
    with the streams as one batch, and its probabilities."""
    import onnxruntime as ort

    from qasr_jax.testing.silero import silero_file

    opts = ort.SessionOptions()
    opts.inter_op_num_threads = opts.intra_op_num_threads = 1
    session = ort.InferenceSession(silero_file("silero_vad.onnx"), sess_options=opts,
                                   providers=["CPUExecutionProvider"])
    streams, n = audio.shape
    frames = n // FRAME_SAMPLES
    state = np.zeros((2, streams, 128), np.float32)
    context = np.zeros((streams, 64), np.float32)
    rate = np.array(SR, np.int64)
    out = np.zeros((streams, frames), np.float32)
    start = time.perf_counter()
    for t in range(frames):
        x = np.concatenate([context, audio[:, t * FRAME_SAMPLES : (t + 1) * FRAME_SAMPLES]], axis=1)
        prob, state = session.run(None, {"input": x, "state": state, "sr": rate})
        out[:, t] = prob[:, 0]
        context = x[:, -64:]
    return streams * frames / (time.perf_counter() - start), out


def frames_per_second(streams: int, seconds: float, repeats: int) -> None:
    recording, _ = long_recording(max(seconds, 1) / 60 * streams, 0.3, seed=1)
    n = int(seconds * SR) // FRAME_SAMPLES * FRAME_SAMPLES
    for rows in (1, streams):
        audio = np.stack([recording[r * n : (r + 1) * n] for r in range(rows)])
        ours, ours_probs = ours_fps(audio, repeats)
        theirs, onnx_probs = onnx_fps(audio)
        print(f"VAD, {rows} stream(s) x {seconds:g} s: qasr-jax {ours:,.0f} frames/s, onnxruntime {theirs:,.0f} "
              f"frames/s ({ours / theirs:.2f}x); max |p - p_onnx| = {np.abs(ours_probs - onnx_probs).max():.1e}",
              flush=True)


def end_to_end(args) -> None:
    if args.tokens_per_second:  # random weights never stop on their own: give each piece what real speech needs
        from qasr_jax.decoding import pipeline

        pipeline.TOKENS_PER_SECOND = args.tokens_per_second
    wave, spoken = long_recording(args.minutes, args.pause_fraction)
    asr = random_transcriber(args.preset, args.checkpoint)
    runs = {"no VAD": {"max_audio_seconds": args.piece_seconds},
            "--vad": {"vad": True, "vad_max_seconds": args.piece_seconds}}
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    result = {}
    for rep in range(args.repeats + 1):  # the first round compiles
        for name, options in runs.items():
            start = time.perf_counter()
            result[name] = asr.transcribe(wave, batch_size=args.batch, **options)[0]
            if rep:
                seconds[name].append(time.perf_counter() - start)
            print(f"round {rep}, {name}: {time.perf_counter() - start:.1f} s", flush=True)
    audio_s = wave.shape[0] / SR
    plain, vad = (statistics.median(seconds[k]) for k in runs)
    print(f"{args.checkpoint or args.preset}, {audio_s / 60:.1f} min ({spoken / audio_s:.0%} speech), "
          f"pieces <= {args.piece_seconds:g} s, batch {args.batch}: no VAD {plain:.1f} s (RTFx {audio_s / plain:.1f}, "
          f"{len(result['no VAD'].segments)} segments), --vad {vad:.1f} s (RTFx {audio_s / vad:.1f}, "
          f"{len(result['--vad'].segments)} segments); speed-up {plain / vad:.2f}x; budgets "
          f"{args.tokens_per_second or 'the default'} tokens per audio second", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--vad-seconds", type=float, default=60.0, help="audio per stream for frames per second")
    parser.add_argument("--minutes", type=float, default=20.0, help="length of the end-to-end recording")
    parser.add_argument("--pause-fraction", type=float, default=0.3)
    parser.add_argument("--piece-seconds", type=float, default=30.0)
    parser.add_argument("--preset", default="asr-0.6b")
    parser.add_argument("--checkpoint", default=None, help="a checkpoint folder: a random --preset one is built there "
                        "if absent; an existing one (qasr_jax/data/tiny-en/model-hf: the trained model) is used")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument("--skip-frames", action="store_true", help="only the end-to-end part")
    parser.add_argument("--tokens-per-second", type=float, help="each piece's token budget per audio second (default "
                        "the library's 10; 3 is what speech needs, for random weights, which decode every budget)")
    args = parser.parse_args()
    print(f"{cpu_name()}; jax {jax.__version__} on {jax.default_backend()}", flush=True)
    if not args.skip_frames:
        frames_per_second(args.streams, args.vad_seconds, max(args.repeats, 1))
    if not args.skip_end_to_end:
        end_to_end(args)


if __name__ == "__main__":
    main()
