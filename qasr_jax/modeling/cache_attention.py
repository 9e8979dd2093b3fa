"""The decoder's grouped-query attention over its keys: the whole key axis, or only the filled part of a KV cache.

A decode step's queries attend over a cache row of ``max_len`` positions of which only the first ``lengths[r]``
hold keys; the masked rest still costs its reads, and at batch 8 on CPU the random ASR-0.6B's int8 step took 127 ms
over a 256-position cache against 174 ms over 512 with the same 162 keys per row (benchmarks/RESULTS.md). With a
``block``, a single-query call walks the cache ``block`` positions at a time up to the last key any row may see (a
loop with a run-time trip count, softmax accumulated online), so a step costs what the rows hold, not the width
its cache was made with. Prompts (several queries a row) attend over the whole axis either way: their work is in
the matmuls, and blocks made a 162-token prefill no faster.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASKED = -1e30  # a masked key's score: exp() is exactly 0; a row with no key left stays finite


def attend(q, k, v, mask, dtype, block: int | None = None) -> jax.Array:
    """q (batch, seq, kv_heads, groups, head_dim); k, v (batch, kv_heads, keys, head_dim); mask (batch, seq, keys)
    bool -> (batch, seq, kv_heads * groups * head_dim) in ``dtype`` (scores and softmax in float32).

    ``block``: with one query a row (a decode step) and more keys than one block, visit only the blocks up to the
    last key the mask lets any row see; None: every key."""
    batch, seq = q.shape[:2]
    if block is None or seq != 1 or k.shape[2] <= block:
        out = _whole(q, k, v, mask, dtype)
    else:
        out = _filled(q, k, v, mask, dtype, block)
    # Batch axes leading in the products' outputs: with (b, q, h, g, d) out XLA transposed every layer's V (b = 1) or
    # ran 64 tiny products (b = 8); the transpose of the small result after is cheap.
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, -1)


def _scores(q, k, mask):
    scores = jnp.einsum("bqhgd,bhkd->bhgqk", q, k, preferred_element_type=jnp.float32)
    return jnp.where(mask[:, None, None], scores * q.shape[-1] ** -0.5, MASKED)


def _values(probs, v, dtype):
    return jnp.einsum("bhgqk,bhkd->bhgqd", probs.astype(dtype), v, preferred_element_type=jnp.float32)


def _whole(q, k, v, mask, dtype):
    return _values(jax.nn.softmax(_scores(q, k, mask), axis=-1), v, dtype).astype(dtype)


def _filled(q, k, v, mask, dtype, block):
    keys = k.shape[2]
    last = jnp.max(jnp.where(mask, jnp.arange(keys), -1))  # the last key any row sees
    n_blocks = jnp.maximum(1, (last + block) // block)  # no key at all: one block, uniform as over every key

    def visit(i, carry):
        top, total, acc = carry  # running max score, sum of exp(score - top), exp-weighted sum of values
        start = jnp.minimum(i * block, keys - block)  # the last block ends at the cache's end, overlapping the one
        seen = jnp.arange(block) + start >= i * block  # before it: its keys below i * block were counted there
        ok = jax.lax.dynamic_slice_in_dim(mask, start, block, axis=2) & seen
        kb, vb = (jax.lax.dynamic_slice_in_dim(t, start, block, axis=2) for t in (k, v))
        scores = _scores(q, kb, ok)
        new_top = jnp.maximum(top, scores.max(-1, keepdims=True))
        probs, scale = jnp.exp(scores - new_top), jnp.exp(top - new_top)
        return new_top, total * scale + probs.sum(-1, keepdims=True), acc * scale + _values(probs, vb, dtype)

    batch, seq, heads, groups, dim = q.shape
    top = jnp.full((batch, heads, groups, seq, 1), MASKED, jnp.float32)
    acc = jnp.zeros((batch, heads, groups, seq, dim), jnp.float32)
    _, total, acc = jax.lax.fori_loop(0, n_blocks, visit, (top, jnp.zeros_like(top), acc))
    return (acc / total).astype(dtype)
