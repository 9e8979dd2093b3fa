"""qasr-jax: Qwen3-ASR and Qwen3-ForcedAligner in JAX/Flax."""

from qasr_jax.config import ModelConfig, load_config, preset
from qasr_jax.loading import Model, load

__all__ = ["Model", "ModelConfig", "load", "load_config", "preset"]
__version__ = "0.1.0"
