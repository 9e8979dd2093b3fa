"""Every shape-bucket rule, and the constants they read.

A compiled program is reused for every input whose padded shapes are the same, so each variable size is rounded
up to a bucket: the batch rows, the feature frames (and so the audio tokens), the prompt width, the output buffer
and the KV cache, the engine's slots, the aligner's tokens and timestamp positions. A new input length inside a
bucket compiles nothing; a bucket never pads more than a small fraction of its content.
"""

from __future__ import annotations

from qasr_jax.modeling.config import AudioConfig

PROMPT_STEP = 32  # prompt widths round up to this
TARGET_STEP = 16  # training batches: target positions per row round up to this
OUTPUT_STEP = 64  # output buffers (new tokens) round up to this
BUCKETS_PER_OCTAVE = 8  # aligner token and slot counts: at most 1/8 more than needed


def round_up(n: int, step: int) -> int:
    """n rounded up to a multiple of step (at least one step)."""
    return max(step, -(-n // step) * step)


def frame_bucket(n_frames: int, audio: AudioConfig) -> int:
    """Feature frames padded for the encoder: whole 1 s chunks, exact up to 8 chunks, then 8 steps per octave.

    Shapes inside a bucket share one compilation, and no bucket pads more than about 1/8 of its audio.
    """
    chunks = max(1, -(-n_frames // audio.chunk_frames))
    step = max(1, (1 << (chunks - 1).bit_length()) // 8)
    return -(-chunks // step) * step * audio.chunk_frames


def bucket_seconds(max_seconds: float, audio: AudioConfig) -> list[float]:
    """Clip lengths that reach every encoder frame bucket up to ``max_seconds``: both ends of each bucket (the ends
    also span the KV cache groups a length in that bucket can fall into). What a warm-up compiles."""
    out, lo = [], 0
    while lo < max_seconds * 100:  # frames (100 per second)
        hi = frame_bucket(lo + 1, audio)
        out += [(lo + 1) / 100, min(hi / 100, max_seconds)]
        lo = hi
    return sorted(set(out))


def batch_rows(n: int, cap: int, data_size: int = 1) -> int:
    """Rows for a transcription batch of n items: the next power of two (at most ``cap``, at least n), rounded up to
    a multiple of the mesh's data axis so every device gets the same rows."""
    rows = max(min(1 << (n - 1).bit_length(), cap), n)
    return round_up(rows, data_size)


def aligner_rows(n: int) -> int:
    """Rows of an aligner batch of n: 1, 2, 3, 4, 6, 8, 12, 16, ... (powers of two and 3/4 of them), so that a
    batch of six pads to six rows, not eight (the aligner's cost is all in the rows)."""
    power = 1 << max(0, (n - 1).bit_length())
    return power * 3 // 4 if power >= 4 and n <= power * 3 // 4 else power


def length_bucket(n: int) -> int:
    """n rounded up on a ladder of 8 steps per power of two (at least 16): 16, 32, 48, 64, 72, 80, ..., 128, 144."""
    step = max(16, (1 << max(0, (n - 1).bit_length())) // BUCKETS_PER_OCTAVE)
    return round_up(n, step)


def prompt_width(n: int) -> int:
    """Padded width of a prompt batch whose longest prompt has n tokens."""
    return round_up(n, PROMPT_STEP)


def target_width(n: int) -> int:
    """Padded count of target positions per row of a training batch whose longest target has n tokens."""
    return round_up(n, TARGET_STEP)


def output_buffer(max_new_tokens: int) -> int:
    """Static room for new tokens: max_new_tokens rounded up, so nearby values reuse a program."""
    return round_up(max_new_tokens, OUTPUT_STEP)


def cache_length(prompt: int, max_new_tokens: int) -> int:
    """KV cache positions for prompts of up to ``prompt`` tokens and up to ``max_new_tokens`` new ones."""
    return prompt_width(prompt) + output_buffer(max_new_tokens)


def slot_count(n: int, beam_size: int = 1, data_size: int = 1) -> int:
    """Decode slots for n concurrent requests: each takes ``beam_size`` slots; a multiple of the data axis."""
    return round_up(n * beam_size, data_size * beam_size)


# -- streams (qasr_jax.streaming.driver) ------------------------------------------------------------------------------

STREAM_TEXT_PER_SECOND = 8  # transcript tokens a stream's cache holds room for per second of audio (2x fast speech)


def stream_window_frames(n_frames: int, audio: AudioConfig) -> int:
    """Feature frames for re-encoding a stream's windows of at most ``n_frames`` frames: 1, 2, 4 or 8 whole chunks
    (four encoder programs per row count; a partial window pads at most to twice its chunks)."""
    chunks = max(1, -(-n_frames // audio.chunk_frames))
    return min(1 << (chunks - 1).bit_length(), audio.chunks_per_window) * audio.chunk_frames


def stream_mel_frames(n_frames: int, audio: AudioConfig) -> int:
    """Frames of a stream's log-mel refresh (the open windows plus a little context): whole 4 s steps."""
    return round_up(n_frames, 4 * audio.chunk_frames)


def stream_prompt_width(n: int, cap: int) -> int:
    """Width of the prompt tails a stream step inserts: four steps per power of two (32, 64, 96, 128, 160, 192, 224,
    256, 320, ...), at most ``cap`` (the cache room left for the prompt)."""
    step = max(PROMPT_STEP, (1 << max(0, (n - 1).bit_length())) // 4)
    return min(round_up(n, step), cap)


def stream_cache_length(segment_seconds: float, context_tokens: int, out_len: int, audio: AudioConfig) -> int:
    """KV cache positions of a stream slot: the system prompt (``context_tokens``), 1.5x ``segment_seconds`` of audio
    tokens and of transcript (``STREAM_TEXT_PER_SECOND``), and the output buffer, in whole 128s."""
    seconds = 1.5 * segment_seconds
    per_second = audio.tokens_per_chunk * 100 / audio.chunk_frames + STREAM_TEXT_PER_SECOND
    return round_up(int(context_tokens + seconds * per_second + out_len), 128)


def next_pow2(n: int, least: int = 1) -> int:
    """The smallest power of two >= n, and >= ``least``."""
    return max(least, 1 << max(0, (n - 1).bit_length()))


def pow2_rows(n: int, data_size: int = 1) -> int:
    """Rows of a stream step's batched call over n items: the next power of two, a multiple of the data axis."""
    return round_up(next_pow2(n), data_size)


# -- prefill ------------------------------------------------------------------------------------------------------

PREFILL_CHUNK = 512  # a wider prompt is prefilled this many tokens at a time: attention memory linear in its length
