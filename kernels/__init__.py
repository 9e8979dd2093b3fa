"""Attention kernels for the AuT encoder: windowed (block-diagonal) attention, its pure-JAX reference, the Pallas
GPU (Triton) and TPU (Mosaic) kernels, and the dispatch between them."""

from qasr_jax.kernels.gpu_attention import windowed_attention_gpu
from qasr_jax.kernels.tpu_attention import windowed_attention_tpu
from qasr_jax.kernels.windowed_attention import windowed_attention, windowed_attention_reference

__all__ = ["windowed_attention", "windowed_attention_gpu", "windowed_attention_reference", "windowed_attention_tpu"]
