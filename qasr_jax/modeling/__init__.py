"""The model: Flax modules (``encoder``: the AuT audio encoder and projector; ``model``: the Qwen3 decoder, the
aligner head, the KV cache; ``cache_attention``: the decoder's attention, a decode step's over only the filled
blocks of its cache), their configuration (``config``, the one home of special-token ids and size presets), logical
axes (``axes``), int8 weights (``quant``) and device meshes (``sharding``).

Nothing here runs a model: only ``qasr_jax.decoding.engine`` applies it. This layer imports only the text and
audio edges (``qasr_jax.io``) and the kernels.
"""
