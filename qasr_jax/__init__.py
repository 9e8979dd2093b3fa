"""qasr-jax: Qwen3-ASR and Qwen3-ForcedAligner in JAX/Flax."""

from qasr_jax.config import ModelConfig, load_config, preset

__all__ = ["ModelConfig", "load_config", "preset"]
__version__ = "0.1.0"
