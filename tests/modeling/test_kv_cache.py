"""The KV cache's layout: one buffer per layer in unrolled mode, one stacked buffer per k and v in scan mode (the
row axis of each leaf from ``KVCache.row_axes``, as beam search widens and gathers rows), written in place: the
scatter of new tokens (bf16 as uint16; one token per kv head at batch 1) lands the same values, and neither a
decode step's write and attention nor the scanned step copies a whole cache buffer."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qasr_jax.decoding import search as S
from qasr_jax.decoding.engine import Engine
from qasr_jax.modeling.config import preset
from qasr_jax.modeling.model import KVCache, _scatter, param_shapes


def _bf16(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.bfloat16)


@pytest.mark.parametrize("stacked", [False, True])  # a stacked buffer holds its rows on its second axis
def test_beam_helpers_on_kv_cache(stacked):
    cfg = preset("tiny").text
    cache = KVCache.init(cfg, 2, 5, stacked=stacked)
    axes = cache.row_axes()
    assert axes.lengths == 0 and axes.k == axes.v == (int(stacked),) * (1 if stacked else cfg.layers)
    cache = cache.replace(k=tuple(t.at[..., 1, :, :, :].set(1) for t in cache.k), lengths=cache.lengths.at[1].set(3))

    def rows(c):  # each k buffer's rows: 1 where copied from row 1, else 0
        return {tuple(np.moveaxis(np.asarray(t), -4, 0).reshape(c.slots, -1).mean(1).tolist()) for t in c.k}

    wide = S.add_beam_dim(cache, axes, 3)
    assert {t.shape for t in wide.v} == {(cfg.layers,) * stacked + (6, cfg.kv_heads, 5, cfg.head_dim)}
    assert rows(wide) == {(0, 0, 0, 1, 1, 1)} and wide.lengths.tolist() == [0, 0, 0, 3, 3, 3]
    picked = S.gather_rows(wide, axes, jnp.asarray([5, 0]))
    assert rows(picked) == {(1, 0)} and picked.lengths.tolist() == [3, 0]


def test_scan_step_carries_one_stacked_cache():
    """In scan mode the cache is one (layers, slots, ...) buffer per k and v, carried through the scan as it is:
    the compiled step neither stacks per-layer buffers into it nor splits it again, which would copy the whole
    cache twice in every call."""
    cfg = preset("tiny")
    eng = Engine(cfg, param_shapes(cfg), layers="scan")
    text = cfg.text
    whole = (text.layers, 2, text.kv_heads, 64, text.head_dim)
    cache = jax.eval_shape(lambda: eng.init_cache(2, 64))
    assert [x.shape for x in cache.k + cache.v] == [whole, whole]
    rows = jax.ShapeDtypeStruct((2,), jnp.int32), jax.ShapeDtypeStruct((2,), bool)
    hlo = eng._step.lower(eng._params, *rows, cache).compile().as_text()
    assert not re.findall(rf"= f32\[{','.join(map(str, whole))}\]\S* (concatenate|slice)\(", hlo)


def test_bf16_cache_scatter_writes_the_same_bits():
    """The bf16 KV cache is scattered as uint16 (XLA:CPU converts a bf16 scatter's whole operand to float32): the
    same values land at the same places, positions past the end are dropped, everything else is untouched."""
    cache = _bf16((3, 2, 6, 4), 3)  # one layer's buffer: (slots, kv_heads, max_len, head_dim)
    new = _bf16((2, 2, 2, 4), 4)  # (rows, seq, kv_heads, head_dim)
    rows, positions = jnp.array([2, 0]), jnp.array([[1, 2], [5, 6]])  # row 0's second token lands past the end
    idx = (rows[:, None], slice(None), positions, slice(None))
    out = _scatter(cache, idx, new)
    want = cache.astype(jnp.float32).at[idx].set(new.astype(jnp.float32), mode="drop")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("position", [3, 6])  # 6: past the end, dropped
def test_one_token_scatter_writes_the_same_values(dtype, position):
    """A single token (batch 1, seq 1) is scattered one kv head at a time: the same values land at the same place."""
    cache = _bf16((1, 2, 6, 4), 5).astype(dtype)
    new = _bf16((1, 1, 2, 4), 6).astype(dtype)
    idx = (jnp.array([0])[:, None], slice(None), jnp.array([[position]]), slice(None))
    want = cache.astype(jnp.float32).at[idx].set(new.astype(jnp.float32), mode="drop")
    np.testing.assert_array_equal(np.asarray(_scatter(cache, idx, new), np.float32), np.asarray(want))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("batch", [1, 4])
def test_cache_write_and_attention_compile_without_cache_copies(batch, dtype):
    """One decode step's write into a layer's (donated) cache buffers and the attention over them are compiled in
    place: at batch 1 a one-update scatter became a dynamic-update-slice that XLA:CPU fused twice (into the
    returned buffer and into the attention dot's operand), and copied each buffer four times (f32) or twice
    (bf16) so both writes could happen, in every layer of every step."""
    heads, groups, max_len, dim = 8, 2, 418, 128  # the 0.6B's layer: small buffers did not show the copies

    def attend(kv, x, lengths):
        q = jnp.tanh(x)[:, :, None, None].repeat(heads, 2).repeat(groups, 3)  # (batch, 1, heads, groups, dim)
        new = [f(x)[:, :, None].repeat(heads, 2).astype(dtype) for f in (jnp.sin, jnp.cos)]  # (batch, 1, heads, dim)
        idx = (jnp.arange(batch)[:, None], slice(None), lengths[:, None], slice(None))
        k, v = (_scatter(c, idx, t) for c, t in zip(kv, new))
        scores = jnp.einsum("bqhgd,bhkd->bhgqk", q, k.astype(jnp.float32))
        probs = jax.nn.softmax(jnp.where(jnp.arange(max_len) <= lengths[:, None, None, None, None], scores, -1e9))
        return jnp.einsum("bhgqk,bhkd->bhgqd", probs, v.astype(jnp.float32)), (k, v)

    kv = tuple(jnp.zeros((batch, heads, max_len, dim), dtype) for _ in range(2))
    args = kv, jnp.ones((batch, 1, dim)), jnp.zeros((batch,), jnp.int32)
    hlo = jax.jit(attend, donate_argnums=0).lower(*args).compile().as_text()
    copies = re.findall(rf"^\s+%copy[.0-9]* = \w+\[{batch},{heads},{max_len},{dim}\]", hlo, re.M)
    assert not copies
