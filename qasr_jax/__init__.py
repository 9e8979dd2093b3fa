"""qasr-jax: Qwen3-ASR and Qwen3-ForcedAligner in JAX/Flax.

The public API is here (``load``, ``Transcriber``, ``Aligner``, ``Result``, ...). The library's layers, each in
its own subpackage: ``io`` (audio, tokenizer, prompts, formats), ``modeling`` (the Flax modules and their config),
``decoding`` (the engine, search and slots), ``streaming``, ``training``, ``vad``, ``server`` and ``cli``, with
``transcribe``, ``aligner`` and ``loading`` on top of decoding.
"""

from qasr_jax import _moved
from qasr_jax.aligner import Aligner, Word
from qasr_jax.loading import Model, load
from qasr_jax.modeling.config import ModelConfig, load_config, preset
from qasr_jax.transcribe import Result, Segment, Transcriber, detect_language

_moved.install()

__all__ = [
    "Aligner", "Model", "ModelConfig", "Result", "Segment", "Transcriber", "Word", "detect_language", "load",
    "load_config", "preset",
]
__version__ = "0.2.0"
