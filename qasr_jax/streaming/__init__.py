"""Streaming: live transcription of audio fed in chunks.

``driver`` runs streams (``Stream``, each ``feed`` re-decoding the audio so far in the engine's slots, with
fixed and unfixed text); ``state`` is one stream's state (its request and options, open and committed segments,
the pause rule); ``audio`` keeps the encoder's finished windows so each chunk encodes only what is new;
``prompts`` holds the rollback rules (how many chunks and tokens stay unfixed, the previous segments' context).
"""

from qasr_jax.streaming.driver import Stream, StreamDriver, shared_driver
from qasr_jax.streaming.state import Partial

__all__ = ["Partial", "Stream", "StreamDriver", "shared_driver"]
