"""Long audio: cut at the quietest point near each boundary, so no piece is longer than the limit."""

from __future__ import annotations

import dataclasses

import numpy as np

from qasr_jax.io.audio import SAMPLE_RATE
from qasr_jax.modeling.config import MAX_AUDIO_SECONDS

FRAME = 1600  # 100 ms energy frames


@dataclasses.dataclass(frozen=True)
class Piece:
    """A piece of a longer waveform and where it starts in it."""

    samples: np.ndarray
    offset: float  # seconds from the start of the whole audio

    @property
    def duration(self) -> float:
        return self.samples.shape[0] / SAMPLE_RATE


def split_long_audio(wave: np.ndarray, max_seconds: float = MAX_AUDIO_SECONDS,
                     search_seconds: float = 10.0) -> list[Piece]:
    """Cut ``wave`` into pieces of at most ``max_seconds``, each cut at the quietest 100 ms in the last
    ``search_seconds`` before the limit; audio within the limit comes back as one piece."""
    if max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    limit = int(max_seconds * SAMPLE_RATE)
    search = max(FRAME, min(int(search_seconds * SAMPLE_RATE), limit // 2))
    pieces, start, n = [], 0, wave.shape[0]
    while n - start > limit:
        lo = start + limit - search  # the cut lands in [lo, start + limit]
        region = wave[lo : start + limit]
        frames = region[: region.shape[0] // FRAME * FRAME].reshape(-1, FRAME)  # (frames, 1600)
        energy = np.square(frames.astype(np.float64)).mean(axis=1)
        cut = lo + int(np.argmin(energy)) * FRAME + FRAME // 2  # middle of the quietest frame
        pieces.append(Piece(wave[start:cut], start / SAMPLE_RATE))
        start = cut
    pieces.append(Piece(wave[start:], start / SAMPLE_RATE))
    return pieces
