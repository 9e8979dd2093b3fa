"""qasr-jax: Qwen3-ASR and Qwen3-ForcedAligner in JAX/Flax."""

from qasr_jax.aligner import Aligner, Word
from qasr_jax.config import ModelConfig, load_config, preset
from qasr_jax.loading import Model, load
from qasr_jax.transcribe import Result, Segment, Transcriber, detect_language

__all__ = [
    "Aligner", "Model", "ModelConfig", "Result", "Segment", "Transcriber", "Word", "detect_language", "load",
    "load_config", "preset",
]
__version__ = "0.1.0"
