"""Windowed attention as a Pallas GPU kernel (Triton lowering), forward and backward.

Grid: forward over (batch, heads, windows, query blocks), backward over (batch, heads, windows); cross-window
pairs are never computed because each grid step only sees its own window (see ``_window_layout``). Inside a
window the kernel skips key and query blocks that lie wholly past the item's length, so the last, partial window
costs what it holds and windows wholly past the end cost a store of zeros.

Forward: flash-attention style online softmax over key blocks in float32; it also saves the per-row
log-sum-exp (batch, heads, windows, padded_window) for the backward pass.

Backward: a Pallas kernel (not the reference's VJP). One program per (item, head, window) first accumulates dK
and dV over the window's query blocks, then dQ over its key blocks, with delta = rowsum(O * dO) recomputed per
query block from the saved output. No atomics: each program owns its window's gradients.

Triton needs power-of-two tiles: block sizes are powers of two (>= 16) and head_dim is zero-padded to the next
power of two (exact: padded features add nothing to q.k and produce output columns that are dropped).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qasr_jax.kernels._window_layout import (
    MASK_VALUE,
    attention_cost,
    window_major_attention,
    window_valid_len,
)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two, >= 16) and Triton launch parameters; defaults suit window 104, head_dim 64.

    Blocks larger than the window (rounded up to a power of two) are clamped to it, so window 104 runs as
    2 x 2 tiles of 64 inside a 128-row padded window.
    """

    block_q: int = 64
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def get_default(cls) -> BlockSizes:
        """The defaults used when ``block_sizes`` is None."""
        return cls()


def _clamp_block(block: int, window: int) -> int:
    if block < 16 or block & (block - 1):
        raise ValueError(f"GPU block sizes must be powers of two >= 16, got {block}")
    return min(block, max(16, pl.next_power_of_2(window)))


def _forward_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, window, block_q, block_k, scale):
    # len_ref (); q_ref, o_ref (block_q, head_dim); k_ref, v_ref (padded_window, head_dim); lse_ref (block_q,)
    w, qi = pl.program_id(2), pl.program_id(3)
    valid = window_valid_len(len_ref[()], w, window)
    q = q_ref[...]
    rows = qi * block_q + jnp.arange(block_q)

    def over_key_block(j, carry):
        acc, m, l = carry
        k = k_ref[pl.ds(j * block_k, block_k), :]
        v = v_ref[pl.ds(j * block_k, block_k), :]
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale  # (block_q, block_k)
        cols = j * block_k + jnp.arange(block_k)
        s = jnp.where(cols[None, :] < valid, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        rescale = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = rescale * l + jnp.sum(p, axis=1)
        acc = rescale[:, None] * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc, m_new, l

    # Query blocks wholly past the length skip the loop; the last one stops at the last valid key block.
    n_key_blocks = jnp.where(qi * block_q < valid, lax.div(valid + block_k - 1, block_k), 0)
    init = (
        jnp.zeros((block_q, q.shape[-1]), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(0, n_key_blocks, over_key_block, init)
    seen = l > 0.0  # False only for rows that saw no key (window or block past the length)
    l_safe = jnp.where(seen, l, 1.0)
    out = jnp.where((rows < valid)[:, None], acc / l_safe[:, None], 0.0)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), 0.0)


def _backward_kernel(
    len_ref, q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, dq_ref, dk_ref, dv_ref, *, window, block_q, block_k, scale
):
    # len_ref (); q, k, v, o, do, dq, dk, dv refs (padded_window, head_dim); lse_ref (padded_window,)
    w = pl.program_id(2)
    padded_window, head_dim = q_ref.shape
    valid = window_valid_len(len_ref[()], w, window)
    n_query_blocks = lax.div(valid + block_q - 1, block_q)
    n_key_blocks = lax.div(valid + block_k - 1, block_k)

    def query_side(i):
        rows = pl.ds(i * block_q, block_q)
        row_ok = (i * block_q + jnp.arange(block_q) < valid)[:, None]
        # The output is constant zero at rows past the length, so their incoming gradient must not flow back.
        do = jnp.where(row_ok, do_ref[rows, :], 0.0).astype(do_ref.dtype)
        delta = jnp.sum(o_ref[rows, :].astype(jnp.float32) * do.astype(jnp.float32), axis=1)
        return q_ref[rows, :], do, lse_ref[rows], delta

    def probs_and_score_grads(i, j, q, do, lse, delta, k, v):
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale  # (block_q, block_k)
        cols = j * block_k + jnp.arange(block_k)
        s = jnp.where(cols[None, :] < valid, s, MASK_VALUE)
        p = jnp.exp(s - lse[:, None])
        dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None]) * scale
        return p, ds

    def key_block(j, carry):
        cols = pl.ds(j * block_k, block_k)
        k, v = k_ref[cols, :], v_ref[cols, :]

        def over_query_block(i, grads):
            dk, dv = grads
            q, do, lse, delta = query_side(i)
            p, ds = probs_and_score_grads(i, j, q, do, lse, delta, k, v)
            dv = dv + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
            dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32)
            return dk, dv

        zeros = jnp.zeros((block_k, head_dim), jnp.float32)
        dk, dv = lax.fori_loop(0, n_query_blocks, over_query_block, (zeros, zeros))
        dk_ref[cols, :] = dk.astype(dk_ref.dtype)
        dv_ref[cols, :] = dv.astype(dv_ref.dtype)
        return carry

    def query_block(i, carry):
        q, do, lse, delta = query_side(i)

        def over_key_block(j, dq):
            cols = pl.ds(j * block_k, block_k)
            k = k_ref[cols, :]
            _, ds = probs_and_score_grads(i, j, q, do, lse, delta, k, v_ref[cols, :])
            return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

        dq = lax.fori_loop(0, n_key_blocks, over_key_block, jnp.zeros((block_q, head_dim), jnp.float32))
        dq_ref[pl.ds(i * block_q, block_q), :] = dq.astype(dq_ref.dtype)
        return carry

    def zero_fill(ref, block):
        def store_zeros(i, carry):
            ref[pl.ds(i * block, block), :] = jnp.zeros((block, head_dim), ref.dtype)
            return carry

        return store_zeros

    lax.fori_loop(0, n_key_blocks, key_block, 0)
    lax.fori_loop(0, n_query_blocks, query_block, 0)
    # Blocks past the length get exact zeros (their keys were masked out, their queries produce no output).
    lax.fori_loop(n_key_blocks, padded_window // block_k, zero_fill(dk_ref, block_k), 0)
    lax.fori_loop(n_key_blocks, padded_window // block_k, zero_fill(dv_ref, block_k), 0)
    lax.fori_loop(n_query_blocks, padded_window // block_q, zero_fill(dq_ref, block_q), 0)


def _window_spec(padded_window, head_dim):
    return pl.BlockSpec((None, None, None, padded_window, head_dim), lambda b, h, w, *_: (b, h, w, 0, 0))


def _length_spec():
    return pl.BlockSpec((None,), lambda b, *_: (b,))


def _forward(qw, kw, vw, lengths, window, blocks: BlockSizes, interpret: bool, scale: float):
    # qw, kw, vw (batch, heads, windows, padded_window, head_dim) -> out like qw, lse (batch, heads, windows, padded)
    batch, heads, n_windows, padded_window, head_dim = qw.shape
    block_q, block_k = _clamp_block(blocks.block_q, window), _clamp_block(blocks.block_k, window)
    flops, transcendentals, nbytes = attention_cost(
        batch, heads, n_windows, padded_window, head_dim, qw.dtype.itemsize, backward=False
    )
    kernel = functools.partial(_forward_kernel, window=window, block_q=block_q, block_k=block_k, scale=scale)
    q_spec = pl.BlockSpec((None, None, None, block_q, head_dim), lambda b, h, w, i: (b, h, w, i, 0))
    return pl.pallas_call(
        kernel,
        grid=(batch, heads, n_windows, padded_window // block_q),
        in_specs=[_length_spec(), q_spec, _window_spec(padded_window, head_dim), _window_spec(padded_window, head_dim)],
        out_specs=[q_spec, pl.BlockSpec((None, None, None, block_q), lambda b, h, w, i: (b, h, w, i))],
        out_shape=[
            jax.ShapeDtypeStruct(qw.shape, qw.dtype),
            jax.ShapeDtypeStruct(qw.shape[:-1], jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=transcendentals, bytes_accessed=nbytes),
        interpret=interpret,
        name="windowed_attention_fwd",
    )(lengths, qw, kw, vw)


def _backward(qw, kw, vw, ow, dow, lse, lengths, window, blocks: BlockSizes, interpret: bool, scale: float):
    # all (batch, heads, windows, padded_window, head_dim) but lse (batch, heads, windows, padded_window)
    batch, heads, n_windows, padded_window, head_dim = qw.shape
    block_q, block_k = _clamp_block(blocks.block_q_bwd, window), _clamp_block(blocks.block_k_bwd, window)
    flops, transcendentals, nbytes = attention_cost(
        batch, heads, n_windows, padded_window, head_dim, qw.dtype.itemsize, backward=True
    )
    kernel = functools.partial(_backward_kernel, window=window, block_q=block_q, block_k=block_k, scale=scale)
    tile = _window_spec(padded_window, head_dim)
    return pl.pallas_call(
        kernel,
        grid=(batch, heads, n_windows),
        in_specs=[_length_spec(), tile, tile, tile, tile, tile,
                  pl.BlockSpec((None, None, None, padded_window), lambda b, h, w: (b, h, w, 0))],
        out_specs=[tile, tile, tile],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (qw, kw, vw)],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=transcendentals, bytes_accessed=nbytes),
        interpret=interpret,
        name="windowed_attention_bwd",
    )(lengths, qw, kw, vw, ow, dow, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attend(qw, kw, vw, lengths, window, blocks, interpret, scale):
    return _forward(qw, kw, vw, lengths, window, blocks, interpret, scale)[0]


def _attend_fwd(qw, kw, vw, lengths, window, blocks, interpret, scale):
    out, lse = _forward(qw, kw, vw, lengths, window, blocks, interpret, scale)
    return out, (qw, kw, vw, out, lse, lengths)


def _attend_bwd(window, blocks, interpret, scale, residuals, dout):
    qw, kw, vw, out, lse, lengths = residuals
    dq, dk, dv = _backward(qw, kw, vw, out, dout, lse, lengths, window, blocks, interpret, scale)
    return dq, dk, dv, None


_attend.defvjp(_attend_fwd, _attend_bwd)


@functools.partial(jax.jit, static_argnames=("window", "block_sizes", "interpret"))
def windowed_attention_gpu(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, window: int, *,
                           block_sizes: BlockSizes | None = None, interpret: bool = False) -> jax.Array:
    """Pallas/Triton windowed attention: q, k, v (batch, seq, heads, head_dim), lengths (batch,) -> like q.

    Same semantics as ``windowed_attention_reference``; differentiable (Pallas backward). ``interpret=True`` runs
    the kernel in the Pallas interpreter (any backend, for tests).
    """
    head_dim_padded = max(16, pl.next_power_of_2(q.shape[3]))
    return window_major_attention(_attend, q, k, v, lengths, window, block_sizes or BlockSizes.get_default(),
                                  interpret, _clamp_block, head_dim_padded)
