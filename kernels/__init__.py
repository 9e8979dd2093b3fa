"""Attention kernels for the AuT encoder: windowed (block-diagonal) attention with a pure-JAX reference."""

from qasr_jax.kernels.windowed_attention import windowed_attention, windowed_attention_reference

__all__ = ["windowed_attention", "windowed_attention_reference"]
