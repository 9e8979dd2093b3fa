"""Windowed attention as a Pallas TPU kernel (Mosaic), forward and backward.

Grid: forward over (batch, heads, windows, query blocks), backward over (batch, heads, windows), all "parallel";
cross-window pairs are never computed because each grid step only sees its own window (see ``_window_layout``).
Item lengths arrive by scalar prefetch (SMEM), so every step knows how many of its window's tokens are real:
query blocks wholly past the length only store zeros, and loops stop at the last valid key block.

The whole padded window of K and V (and of Q, O, dO in the backward) sits in VMEM: for the released models that is
128 rows x head_dim, a few tens of KB. Windows of thousands of rows would need a key-block grid axis instead.

Forward: online softmax over key blocks in float32. It saves no softmax statistics: the backward recomputes them
from the resident window, which costs no extra matmul when the window is a single block (the released models:
104 -> 128 rows) and one QK^T pass otherwise, and saves an HBM residual that Mosaic would pad to 128 lanes.

Backward: a Pallas kernel (not the reference's VJP). Per query block: the log-sum-exp over the window's key
blocks, then for each key block P, dS, with dQ kept in registers and dK, dV accumulated in float32 VMEM scratch.

Compiled, Mosaic wants block sizes that are multiples of 128 (the lane width; the default); the interpreter
(``interpret=True``, which runs ``pltpu.InterpretParams``) accepts any multiple of 8, which the tests use to
exercise several blocks per window.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qasr_jax.kernels._window_layout import (
    MASK_VALUE,
    attention_cost,
    round_up,
    window_major_attention,
    window_valid_len,
)

NT_DIMS = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T without materialising b.T


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (multiples of 128 when compiled, of 8 in interpret mode); clamped to the window rounded to 128.

    With the defaults, window 104 runs as one 128 x 128 tile per (item, head, window).
    """

    block_q: int = 128
    block_k: int = 128
    block_q_bwd: int = 128
    block_k_bwd: int = 128

    @classmethod
    def get_default(cls) -> BlockSizes:
        """The defaults used when ``block_sizes`` is None."""
        return cls()


def _clamp_block(block: int, window: int) -> int:
    if block < 8 or block % 8:
        raise ValueError(f"TPU block sizes must be multiples of 8 (128 when compiled), got {block}")
    return min(block, round_up(window, 128))


def _scores(q, k, j, valid, scale, block_k):
    # q (block_q, head_dim), k (block_k, head_dim) -> masked scaled scores (block_q, block_k) in float32
    s = lax.dot_general(q, k, NT_DIMS, preferred_element_type=jnp.float32) * scale
    cols = j * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    return jnp.where(cols < valid, s, MASK_VALUE)


def _forward_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, *, window, block_q, block_k, scale):
    # len_ref (batch,) SMEM; q_ref, o_ref (block_q, head_dim); k_ref, v_ref (padded_window, head_dim)
    b, w, qi = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    valid = window_valid_len(len_ref[b], w, window)
    live = qi * block_q < valid

    @pl.when(live)
    def _attend():
        q = q_ref[...]

        def over_key_block(j, carry):
            acc, m, l = carry
            start = pl.multiple_of(j * block_k, block_k)
            v = v_ref[pl.ds(start, block_k), :]
            s = _scores(q, k_ref[pl.ds(start, block_k), :], j, valid, scale, block_k)
            m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))  # (block_q, 1)
            rescale = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new)
            l = rescale * l + jnp.sum(p, axis=1, keepdims=True)
            acc = rescale * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            return acc, m_new, l

        init = (
            jnp.zeros(q.shape, jnp.float32),
            jnp.full((block_q, 1), -jnp.inf, jnp.float32),
            jnp.zeros((block_q, 1), jnp.float32),
        )
        acc, _, l = lax.fori_loop(0, lax.div(valid + block_k - 1, block_k), over_key_block, init)
        rows = qi * block_q + lax.broadcasted_iota(jnp.int32, acc.shape, 0)
        o_ref[...] = jnp.where(rows < valid, acc / l, 0.0).astype(o_ref.dtype)  # l >= 1: key 0 is valid

    @pl.when(jnp.logical_not(live))
    def _past_the_end():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)


def _backward_kernel(
    len_ref, q_ref, k_ref, v_ref, o_ref, do_ref, dq_ref, dk_ref, dv_ref, dk_acc, dv_acc,
    *, window, block_q, block_k, scale,
):
    # len_ref (batch,) SMEM; q, k, v, o, do, dq, dk, dv refs (padded_window, head_dim); dk_acc, dv_acc f32 scratch
    b, w = pl.program_id(0), pl.program_id(2)
    valid = window_valid_len(len_ref[b], w, window)
    n_key_blocks = lax.div(valid + block_k - 1, block_k)
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)
    dq_ref[...] = jnp.zeros(dq_ref.shape, dq_ref.dtype)

    n_blocks_static = q_ref.shape[0] // block_q * (k_ref.shape[0] // block_k)

    def tile_grads(q, do, delta, lse, s, cols, k, v):
        # one (query block, key block) tile: accumulate dK, dV into scratch, return this tile's dQ term
        p = jnp.exp(s - lse)  # (block_q, block_k); exactly 0 at masked keys
        dv_acc[cols, :] += jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = lax.dot_general(do, v, NT_DIMS, preferred_element_type=jnp.float32)
        ds = p * (dp - delta) * scale
        dk_acc[cols, :] += jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)
        return jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    def query_block(i, carry):
        rows = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
        q = q_ref[rows, :]
        row_ok = i * block_q + lax.broadcasted_iota(jnp.int32, q.shape, 0) < valid
        # The output is constant zero at rows past the length, so their incoming gradient must not flow back.
        do = jnp.where(row_ok, do_ref[rows, :], 0.0).astype(do_ref.dtype)
        delta = jnp.sum(o_ref[rows, :].astype(jnp.float32) * do.astype(jnp.float32), axis=1, keepdims=True)

        def key_tiles(j):
            cols = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
            return cols, k_ref[cols, :], v_ref[cols, :]

        if n_blocks_static == 1:  # one tile per window: the statistics come from the same scores, no recompute
            cols, k, v = key_tiles(0)
            s = _scores(q, k, 0, valid, scale, block_k)
            m = jnp.max(s, axis=1, keepdims=True)
            lse = m + jnp.log(jnp.sum(jnp.exp(s - m), axis=1, keepdims=True))
            dq = tile_grads(q, do, delta, lse, s, cols, k, v)
        else:
            def stats(j, carry):
                m, l = carry
                _, k, _ = key_tiles(j)
                s = _scores(q, k, j, valid, scale, block_k)
                m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
                return m_new, jnp.exp(m - m_new) * l + jnp.sum(jnp.exp(s - m_new), axis=1, keepdims=True)

            init = (jnp.full((block_q, 1), -jnp.inf, jnp.float32), jnp.zeros((block_q, 1), jnp.float32))
            m, l = lax.fori_loop(0, n_key_blocks, stats, init)
            lse = m + jnp.log(l)  # l >= 1: key 0 is valid whenever this loop runs

            def grads(j, dq):
                cols, k, v = key_tiles(j)
                return dq + tile_grads(q, do, delta, lse, _scores(q, k, j, valid, scale, block_k), cols, k, v)

            dq = lax.fori_loop(0, n_key_blocks, grads, jnp.zeros(q.shape, jnp.float32))
        dq_ref[rows, :] = dq.astype(dq_ref.dtype)
        return carry

    lax.fori_loop(0, lax.div(valid + block_q - 1, block_q), query_block, 0)
    dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _grid_spec(grid, in_specs, out_specs, scratch_shapes=()):
    return pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=grid, in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch_shapes
    )


def _window_spec(padded_window, head_dim):
    return pl.BlockSpec((None, None, None, padded_window, head_dim), lambda b, h, w, *_: (b, h, w, 0, 0))


def _interpret_mode(interpret: bool):
    return pltpu.InterpretParams() if interpret else False


def _forward(qw, kw, vw, lengths, window, blocks: BlockSizes, interpret: bool, scale: float):
    # qw, kw, vw (batch, heads, windows, padded_window, head_dim) -> like qw
    batch, heads, n_windows, padded_window, head_dim = qw.shape
    block_q, block_k = _clamp_block(blocks.block_q, window), _clamp_block(blocks.block_k, window)
    flops, transcendentals, nbytes = attention_cost(
        batch, heads, n_windows, padded_window, head_dim, qw.dtype.itemsize, backward=False
    )
    kernel = functools.partial(_forward_kernel, window=window, block_q=block_q, block_k=block_k, scale=scale)
    q_spec = pl.BlockSpec((None, None, None, block_q, head_dim), lambda b, h, w, i, _: (b, h, w, i, 0))
    tile = _window_spec(padded_window, head_dim)
    return pl.pallas_call(
        kernel,
        grid_spec=_grid_spec((batch, heads, n_windows, padded_window // block_q), [q_spec, tile, tile], q_spec),
        out_shape=jax.ShapeDtypeStruct(qw.shape, qw.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 4),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=transcendentals, bytes_accessed=nbytes),
        interpret=_interpret_mode(interpret),
        name="windowed_attention_fwd",
    )(lengths, qw, kw, vw)


def _backward(qw, kw, vw, ow, dow, lengths, window, blocks: BlockSizes, interpret: bool, scale: float):
    # all (batch, heads, windows, padded_window, head_dim) -> dq, dk, dv like qw
    batch, heads, n_windows, padded_window, head_dim = qw.shape
    block_q, block_k = _clamp_block(blocks.block_q_bwd, window), _clamp_block(blocks.block_k_bwd, window)
    flops, transcendentals, nbytes = attention_cost(
        batch, heads, n_windows, padded_window, head_dim, qw.dtype.itemsize, backward=True
    )
    if padded_window > max(block_q, block_k):  # statistics recompute: one more QK^T
        flops += flops // 5
    kernel = functools.partial(_backward_kernel, window=window, block_q=block_q, block_k=block_k, scale=scale)
    tile = _window_spec(padded_window, head_dim)
    accumulator = pltpu.VMEM((padded_window, head_dim), jnp.float32)
    return pl.pallas_call(
        kernel,
        grid_spec=_grid_spec((batch, heads, n_windows), [tile] * 5, [tile] * 3, [accumulator, accumulator]),
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (qw, kw, vw)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 3),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=transcendentals, bytes_accessed=nbytes),
        interpret=_interpret_mode(interpret),
        name="windowed_attention_bwd",
    )(lengths, qw, kw, vw, ow, dow)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attend(qw, kw, vw, lengths, window, blocks, interpret, scale):
    return _forward(qw, kw, vw, lengths, window, blocks, interpret, scale)


def _attend_fwd(qw, kw, vw, lengths, window, blocks, interpret, scale):
    out = _forward(qw, kw, vw, lengths, window, blocks, interpret, scale)
    return out, (qw, kw, vw, out, lengths)


def _attend_bwd(window, blocks, interpret, scale, residuals, dout):
    qw, kw, vw, out, lengths = residuals
    dq, dk, dv = _backward(qw, kw, vw, out, dout, lengths, window, blocks, interpret, scale)
    return dq, dk, dv, None


_attend.defvjp(_attend_fwd, _attend_bwd)


@functools.partial(jax.jit, static_argnames=("window", "block_sizes", "interpret"))
def windowed_attention_tpu(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, window: int, *,
                           block_sizes: BlockSizes | None = None, interpret: bool = False) -> jax.Array:
    """Pallas/Mosaic windowed attention: q, k, v (batch, seq, heads, head_dim), lengths (batch,) -> like q.

    Same semantics as ``windowed_attention_reference``; differentiable (Pallas backward). ``interpret=True`` runs
    the kernel in the TPU interpreter (``pltpu.InterpretParams``) on any backend, for tests.
    """
    return window_major_attention(_attend, q, k, v, lengths, window, block_sizes or BlockSizes.get_default(),
                                  interpret, _clamp_block, q.shape[3])
