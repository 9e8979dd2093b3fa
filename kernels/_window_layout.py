"""The window-major layout shared by the Pallas windowed-attention kernels.

The kernels never see cross-window pairs: the wrapper cuts each item into windows of ``window`` tokens, pads every
window to ``padded_window`` rows (a multiple of the kernel's block sizes, e.g. 104 -> 128) and puts heads before
windows, so one grid step owns one (item, head, window) and loads contiguous (rows, head_dim) tiles:

    (batch, seq, heads, head_dim) -> (batch, heads, windows, padded_window, head_dim_padded)

Pad, reshape and transpose fuse into one XLA copy on the way in and one on the way out; their VJPs are the inverse
copies, so the kernels' custom VJPs are defined on the window-major arrays only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# Finite "minus infinity" for masked scores: exp(MASK_VALUE - m) is exactly 0 and never produces inf - inf = NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= n."""
    return -(-n // multiple) * multiple


def padded_window_len(window: int, *blocks: int) -> int:
    """Rows per window in the kernel layout: ``window`` rounded up so every block size divides it."""
    return round_up(window, math.lcm(*blocks))


def to_window_major(x: jax.Array, window: int, padded_window: int, head_dim_padded: int) -> jax.Array:
    """(batch, seq, heads, head_dim) -> (batch, heads, windows, padded_window, head_dim_padded), zero padded."""
    batch, seq, heads, head_dim = x.shape
    n_windows = -(-seq // window)
    x = jnp.pad(x, ((0, 0), (0, n_windows * window - seq), (0, 0), (0, 0)))
    x = x.reshape(batch, n_windows, window, heads, head_dim)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, padded_window - window), (0, 0), (0, head_dim_padded - head_dim)))
    return x.transpose(0, 3, 1, 2, 4)


def from_window_major(x: jax.Array, seq: int, window: int, head_dim: int) -> jax.Array:
    """Inverse of :func:`to_window_major`: drops the row and head_dim padding, back to (batch, seq, heads, head_dim)."""
    batch, heads, n_windows = x.shape[:3]
    x = x.transpose(0, 2, 3, 1, 4)[:, :, :window, :, :head_dim]  # (batch, windows, window, heads, head_dim)
    return x.reshape(batch, n_windows * window, heads, head_dim)[:, :seq]


def window_major_attention(attend, q, k, v, lengths, window: int, blocks, interpret: bool, clamp,
                           head_dim_padded: int) -> jax.Array:
    """The kernels' shared entry: q, k, v (batch, seq, heads, head_dim) into the window-major layout (each window
    padded to a multiple of every block size of ``blocks``, clamped by ``clamp(block, window)``), ``attend`` there
    (the kernel's custom-VJP function) and back to the input's layout."""
    seq, head_dim = q.shape[1], q.shape[3]
    if seq == 0:
        return jnp.zeros_like(q)
    sizes = (blocks.block_q, blocks.block_k, blocks.block_q_bwd, blocks.block_k_bwd)
    padded_window = padded_window_len(window, *(clamp(b, window) for b in sizes))
    qw, kw, vw = (to_window_major(x, window, padded_window, head_dim_padded) for x in (q, k, v))
    out = attend(qw, kw, vw, lengths.astype(jnp.int32), window, blocks, interpret, head_dim**-0.5)
    return from_window_major(out, seq, window, head_dim)


def window_valid_len(length: jax.Array, window_index: jax.Array, window: int) -> jax.Array:
    """Tokens of window ``window_index`` that lie before ``length`` (0 for a window wholly past the end)."""
    return jnp.minimum(jnp.maximum(length - window_index * window, 0), window)


def attention_cost(
    batch: int, heads: int, n_windows: int, padded_window: int, head_dim: int, itemsize: int, *, backward: bool
) -> tuple[int, int, int]:
    """(flops, transcendentals, bytes) of the block-diagonal attention as the kernels run it (padding included)."""
    pairs = batch * heads * n_windows * padded_window * padded_window
    tile_bytes = batch * heads * n_windows * padded_window * head_dim * itemsize
    if backward:  # QK^T, dO V^T, dV, dK, dQ; reads q k v o dO, writes dq dk dv
        return 10 * pairs * head_dim, pairs, 8 * tile_bytes
    return 4 * pairs * head_dim, pairs, 4 * tile_bytes  # QK^T and PV; reads q k v, writes o
