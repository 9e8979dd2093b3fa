"""Voice activity detection: Silero VAD v6 in JAX (``network``: speech probabilities per 512-sample frame, batched
over streams, and a streaming form) and the rules that turn probabilities into speech segments, decoding pieces
and realtime turns (``rules``).
"""

from qasr_jax.vad.network import (
    FRAME_SAMPLES, FRAME_SECONDS, VadState, initial_state, speech_probabilities, speech_probabilities_batch,
    stream_probabilities,
)
from qasr_jax.vad.rules import TurnDetector, TurnEvent, speech_pieces, speech_segments

__all__ = [
    "FRAME_SAMPLES", "FRAME_SECONDS", "TurnDetector", "TurnEvent", "VadState", "initial_state", "speech_pieces",
    "speech_probabilities", "speech_probabilities_batch", "speech_segments", "stream_probabilities",
]
