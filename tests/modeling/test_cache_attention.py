"""A decode step that reads only its cache's filled blocks (``qasr_jax.modeling.cache_attention``) gives what the
attention over the whole cache gives, never reads a block past the last key any row sees, and leaves prompts (many
queries a row) to the whole-cache attention."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import qasr_jax
from qasr_jax.decoding.engine import Engine
from qasr_jax.loading import default_kv_block
from qasr_jax.modeling.cache_attention import attend


def _inputs(lengths, keys=200, seq=1, seed=0):
    rng = np.random.default_rng(seed)
    batch, heads, groups, dim = len(lengths), 2, 3, 16
    q = rng.standard_normal((batch, seq, heads, groups, dim)).astype(np.float32)
    k, v = (rng.standard_normal((batch, heads, keys, dim)).astype(np.float32) for _ in range(2))
    mask = np.arange(keys)[None, None, :] < np.asarray(lengths)[:, None, None] + np.arange(seq)[None, :, None]
    return q, k, v, mask


@pytest.mark.parametrize("block", [16, 64, 96])  # 96: 200 keys end in a block that overlaps the one before it
def test_blocks_equal_the_whole_cache(block):
    q, k, v, mask = _inputs([1, 37, 64, 65, 150, 200])
    whole = np.asarray(attend(q, k, v, mask, jnp.float32))
    blocked = np.asarray(attend(q, k, v, mask, jnp.float32, block))
    np.testing.assert_allclose(blocked, whole, rtol=0, atol=1e-6 * np.abs(whole).max())


def test_blocks_past_the_last_key_are_not_read():
    """NaN in every position past the longest row's keys: the whole-cache product reads them (0 x NaN), the blocks
    do not, and where the longest row ends inside a block, that block's masked tail counts for nothing."""
    q, k, v, mask = _inputs([10, 70])
    clean = np.asarray(attend(q, k, v, mask, jnp.float32))
    k[:, :, 128:], v[:, :, 128:] = np.nan, np.nan
    k[:, :, 70:128] *= 1e3  # masked keys in the last visited block: huge scores, which the mask must drop
    assert np.isnan(np.asarray(attend(q, k, v, mask, jnp.float32))).all()
    blocked = np.asarray(attend(q, k, v, mask, jnp.float32, 64))
    np.testing.assert_allclose(blocked, clean, rtol=0, atol=1e-6 * np.abs(clean).max())


def test_prompts_and_a_cache_of_one_block_attend_over_every_key():
    q, k, v, mask = _inputs([3, 40], keys=64, seq=5)
    v[:, :, 60:] = np.nan  # every value is read: what blocks would skip is read here
    assert np.isnan(np.asarray(attend(q, k, v, mask, jnp.float32, 16))).all()  # five queries a row
    q1, k1, v1, mask1 = _inputs([3, 40], keys=64)
    v1[:, :, 60:] = np.nan
    assert np.isnan(np.asarray(attend(q1, k1, v1, mask1, jnp.float32, 64))).all()  # one block is the whole cache


@pytest.mark.parametrize("layers", ["unrolled", "scan"])
def test_engine_steps_in_blocks_match_the_whole_cache(layers, asr_dir):
    """The tiny model's prefill and decode steps over a 192-position cache with rows of different lengths: the same
    logits with and without blocks (float32), in both layer modes."""
    model = qasr_jax.load(asr_dir)
    cfg = model.config
    params = model.engine.params
    engines = [Engine(cfg, params, layers=layers, kv_block=b) for b in (None, 32)]
    rng = np.random.default_rng(1)
    embeds = 0.02 * rng.standard_normal((3, 70, cfg.text.hidden_size)).astype(np.float32)
    n_new = np.array([5, 70, 33], np.int32)
    outs = []
    for eng in engines:
        logits, cache = eng.extend(eng.init_cache(3, 192), embeds, n_new)
        steps = [np.asarray(logits)]
        tokens = np.argmax(steps[0], -1).astype(np.int32)
        for _ in range(4):
            logits, cache = eng.step(cache, tokens, np.array([True, True, False]))
            steps.append(np.asarray(logits))
            tokens = np.argmax(steps[-1], -1).astype(np.int32)
        outs.append(np.stack(steps))
    whole, blocked = outs
    np.testing.assert_allclose(blocked, whole, rtol=0, atol=1e-5 * np.abs(whole).max())


def test_the_default_reads_blocks_on_cpu_and_the_whole_cache_elsewhere(monkeypatch):
    monkeypatch.delenv("QASR_JAX_KV_BLOCK", raising=False)
    assert default_kv_block("cpu") == 64 and default_kv_block("gpu") is None and default_kv_block("tpu") is None
    monkeypatch.setenv("QASR_JAX_KV_BLOCK", "0")
    assert default_kv_block("cpu") is None
    monkeypatch.setenv("QASR_JAX_KV_BLOCK", "128")
    assert default_kv_block("gpu") == 128
    monkeypatch.setenv("QASR_JAX_KV_BLOCK", "many")
    with pytest.raises(ValueError, match="QASR_JAX_KV_BLOCK"):
        default_kv_block()
