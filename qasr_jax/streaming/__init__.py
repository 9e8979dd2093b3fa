"""Streaming: live transcription of audio fed in chunks.

``driver`` runs streams (``Stream``, each ``feed`` re-decoding the audio so far in the engine's slots, with
fixed and unfixed text); ``audio`` keeps the encoder's finished windows so each chunk encodes only what is new;
``prompts`` holds the rollback rules (how many chunks and tokens stay unfixed, the previous segments' context).
"""

from qasr_jax.streaming.driver import Partial, Stream, StreamDriver, shared_driver

__all__ = ["Partial", "Stream", "StreamDriver", "shared_driver"]
