"""bfloat16 and int8 against float32: the matmul forms themselves, the quantized parameter tree, prompt logits,
greedy ids and compile counts on the tiny random-weight models.

Tolerances (max |x - float32| / max |float32 logits|): bfloat16 2e-2 (as against the reference in test_parity);
int8 5e-2 on these tiny models, whose 48-wide hidden states make one scale per token coarse (measured 2.1-3.9e-2).
What users see is judged on the trained tiny-en model instead (tests/test_tiny_model.py: bfloat16 and int8 word
error rates within a point of float32), which replaced the random ASR-0.6B's logit noise floor (5.6-7.2%).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qasr_jax
from qasr_jax.decoding.compiles import count_compilations
from qasr_jax.io.prompts import build_prompt_ids
from qasr_jax.modeling import quant
from qasr_jax.modeling.config import audio_token_count
from qasr_jax.testing import DATA, speech, synthetic
from qasr_jax.transcribe import Transcriber
from qasr_jax.testing.parity import prompt, rel
from qasr_jax.testing.tokenizer_files import with_tokenizer

MODES = {"bfloat16": ("bfloat16", None), "int8": ("float32", "int8"), "bfloat16+int8": ("bfloat16", "int8")}
TOL = {"bfloat16": 2e-2, "int8": 5e-2, "bfloat16+int8": 5e-2}


def _bf16(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.bfloat16)


@pytest.mark.parametrize("rows", [1, 3])
def test_bfloat16_matmul_accumulates_in_float32(rows):
    """bf16 operands, float32 sums: equal to the exact product of the same bf16 values to float32 rounding (a bf16
    result or bf16 accumulation would be off by ~1e-2); one row (padded to two on CPU) and several, both kernel
    axes, several feature axes."""
    x = _bf16((rows, 1, 96), 0)
    w = _bf16((96, 3, 40), 1)
    exact = np.einsum("bsi,ifo->bsfo", np.asarray(x, np.float64), np.asarray(w, np.float64))
    out = quant.matmul(x, w, 0, out_dtype=jnp.float32)
    assert out.dtype == jnp.float32 and out.shape == (rows, 1, 3, 40)
    assert rel(out, exact) <= 1e-6
    table = _bf16((50, 96), 2)  # a tied head's (vocab, hidden) table, contracted over its last axis
    out = quant.matmul(x, table, 1, out_dtype=jnp.float32)
    assert rel(out, np.asarray(x, np.float64) @ np.asarray(table, np.float64).T) <= 1e-6
    assert quant.matmul(x, w).dtype == jnp.bfloat16


@pytest.mark.parametrize("rows", [1, 4])
def test_int8_matmul_is_the_per_token_quantized_product(rows):
    """int8 kernel with per-feature scales: each activation row quantized with its own scale (max |x| / 127),
    integer product, rescaled; a zero row stays zero; and the whole is within 2% of the float product."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, 64)).astype(np.float32) * np.linspace(0.1, 3, rows)[:, None]
    if rows > 1:
        x[1] = 0.0
    w = rng.standard_normal((64, 2, 24)).astype(np.float32)
    values, scale = quant.quantize(jnp.asarray(w), 0)
    assert values.dtype == jnp.int8 and scale.shape == (2, 24) and scale.dtype == jnp.float32
    assert np.abs(np.asarray(values, np.float32) * np.asarray(scale) - w).max() <= np.asarray(scale).max() / 2 + 1e-6
    out = np.asarray(quant.matmul(jnp.asarray(x), values, 0, scale))
    x_scale = np.abs(x).max(-1, keepdims=True) / 127
    xq = np.round(x / np.where(x_scale > 0, x_scale, 1)).astype(np.int64)
    want = np.einsum("mi,ifo->mfo", xq, np.asarray(values, np.int64)) * x_scale[:, :, None] * np.asarray(scale)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    assert rel(out, np.einsum("mi,ifo->mfo", x, w)) <= 2e-2
    if rows > 1:
        assert not out[1].any()


@pytest.fixture(scope="module")
def loaded(checkpoints):
    """Models loaded once per (kind, mode): mode "float32" or a key of MODES."""
    cache = {}

    def get(kind, mode):
        if (kind, mode) not in cache:
            dtype, q = MODES.get(mode, ("float32", None))
            cache[kind, mode] = qasr_jax.load(checkpoints(kind).official, dtype=dtype, quantize=q)
        return cache[kind, mode]

    return get


@pytest.mark.parametrize("kind", ["asr", "asr-untied", "aligner"])
def test_quantized_tree(checkpoints, loaded, kind):
    """int8: every decoder layer's qkv, o, gate_up and down kernels, every encoder layer's q, k, v, o, fc1 and fc2
    kernels and the LM head (the tied embedding, or lm_head); the encoder's convolutions and conv_out, the projector,
    norms, biases and the aligner's class head unchanged; scales float32 in a bf16 model."""
    ck = checkpoints(kind)
    model = loaded(kind, "bfloat16+int8")
    p = model.params
    stacks = [(p["decoder"], ck.cfg.text.layers, quant.DECODER_KERNELS),
              (p["audio_tower"], ck.cfg.audio.layers, quant.ENCODER_KERNELS)]
    for tree, n, kernels in stacks:
        for i in range(n):
            layer = tree[f"layers_{i}"]
            for k in kernels:
                assert layer[k]["kernel"].dtype == jnp.int8
                assert layer[k]["kernel_scale"].shape == layer[k]["kernel"].shape[1:]
                assert layer[k]["kernel_scale"].dtype == jnp.float32
                assert layer[k].get("bias", jnp.zeros((), jnp.bfloat16)).dtype == jnp.bfloat16
            assert layer["attn_norm"]["scale"].dtype == jnp.bfloat16
            assert {x.dtype for k, v in layer.items() if k not in kernels for x in jax.tree_util.tree_leaves(v)} == {
                jnp.dtype(jnp.bfloat16)}
    embed = p["decoder"]["embed"]
    if kind == "asr":
        assert embed["embedding"].dtype == jnp.int8 and embed["embedding_scale"].shape == (ck.cfg.text.vocab_size,)
    else:
        assert set(embed) == {"embedding"} and embed["embedding"].dtype == jnp.bfloat16
    if kind == "asr-untied":
        assert p["lm_head"]["kernel"].dtype == jnp.int8
    if kind == "aligner":
        assert p["score"]["kernel"].dtype == jnp.bfloat16
    rest = {k: v for k, v in p["audio_tower"].items() if not k.startswith("layers_")}
    assert set(rest) >= {"conv2d1", "conv_out", "ln_post"}
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves((rest, p["projector"])))
    with pytest.raises(ValueError, match="quantized already"):
        quant.quantize_params(p, ck.cfg)
    with pytest.raises(ValueError, match="int8"):
        qasr_jax.load(ck.hf, quantize="int4")


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", ["asr", "asr-untied", "aligner"])
def test_prompt_logits_close_to_float32(checkpoints, loaded, kind, mode):
    ck = checkpoints(kind)
    f32, model = loaded(kind, "float32"), loaded(kind, mode)
    for wave in (speech("hello_en.wav"), speech("long_en.wav")):
        feats = f32.log_mel(wave)
        ids = prompt(audio_token_count(feats.shape[1], ck.cfg.audio))
        want = f32.logits(ids, feats)
        out = model.logits(ids, feats)
        assert out.dtype == np.float32
        assert 1e-4 < rel(out, want) <= TOL[mode]  # above float32's noise: the precision really changed


@pytest.fixture(scope="module")
def asr_dir(checkpoints, tmp_path_factory):
    return with_tokenizer(checkpoints("asr").official, tmp_path_factory, "official")


@pytest.fixture(scope="module")
def transcribers(asr_dir):
    """Transcribers of the tiny ASR checkpoint, made once per mode ("float32" or a key of MODES)."""
    cache = {}

    def get(mode):
        if mode not in cache:
            dtype, q = MODES.get(mode, ("float32", None))
            cache[mode] = Transcriber.from_pretrained(asr_dir, dtype=dtype, quantize=q)
        return cache[mode]

    return get


WAVES = {"hello": lambda: speech("hello_en.wav"), "zh": lambda: speech("zh.wav"),
         "long": lambda: speech("long_en.wav"), "noise": lambda: synthetic(2.5, 3)}
NEW = 12


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_ids_equal_float32_where_float32_is_clear(transcribers, mode):
    """Greedy decoding (prefill, cached steps at batch 1 and batch 4) gives float32's ids at every step until the
    first one where float32's top two logits are closer than the mode's tolerance (there a different but equally
    valid pick is allowed, and the rest of that row is not compared); at least half of all steps are compared."""
    f32_asr, asr = transcribers("float32"), transcribers(mode)
    waves = [f() for f in WAVES.values()]
    want = [r.token_ids for r in f32_asr.transcribe(waves, max_new_tokens=NEW, batch_size=4, suppress_eos=True)]
    batched = asr.transcribe(waves, max_new_tokens=NEW, batch_size=4, suppress_eos=True)
    single = [asr.transcribe(w, max_new_tokens=NEW, suppress_eos=True)[0] for w in waves]
    compared = 0
    for wave, ids, b, s in zip(waves, want, batched, single):
        feats = f32_asr.model.log_mel(wave)
        p = build_prompt_ids(f32_asr.tokenizer, audio_token_count(feats.shape[1], f32_asr.model.config.audio))
        logits = f32_asr.model.logits(p + ids, feats)[len(p) - 1 : -1]  # (NEW, vocab): float32 at every step
        top2 = np.sort(logits, axis=-1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > TOL[mode] * np.abs(logits).max()
        n = int(np.argmin(clear)) if not clear.all() else NEW
        assert b.token_ids[:n] == ids[:n] and s.token_ids[:n] == ids[:n]
        compared += n
    assert compared >= NEW * len(waves) // 2


@pytest.mark.parametrize("mode", ["bfloat16", "int8"])
def test_new_lengths_inside_a_bucket_compile_nothing(transcribers, mode):
    asr = transcribers(mode)
    asr.transcribe([synthetic(2.1, 1), synthetic(3.3, 2)], max_new_tokens=NEW, batch_size=2)
    asr.transcribe(os.path.join(DATA, "hello_en.wav"), max_new_tokens=NEW)
    with count_compilations() as compiles:
        asr.transcribe([synthetic(3.7, 3), synthetic(1.2, 4)], max_new_tokens=NEW - 3, batch_size=2)
        asr.transcribe(synthetic(1.1, 5), max_new_tokens=NEW - 2)
    assert compiles.count == 0


def test_cli_quantize_flag_gives_the_int8_transcript(transcribers, asr_dir, capsys):
    """qasr-jax transcribe --quantize int8 prints what Transcriber(quantize="int8") gives, which is not float32's
    text token for token (the flag reaches the model)."""
    from qasr_jax.cli.core import main

    path = os.path.join(DATA, "long_en.wav")
    want = transcribers("int8").transcribe(path, max_new_tokens=NEW)[0]
    assert main(["transcribe", path, "--model", asr_dir, "--quantize", "int8", "--max-new-tokens", str(NEW),
                 "--output-format", "json", "--no-fallback"]) == 0  # random text fails the fallback's thresholds
    got = json.loads(capsys.readouterr().out)
    assert got["text"] == want.text
    assert got["token_logprobs"] == pytest.approx(want.token_logprobs, abs=1e-6)
    f32 = transcribers("float32").transcribe(path, max_new_tokens=NEW)[0]
    assert f32.token_logprobs != pytest.approx(want.token_logprobs, abs=1e-6)


def test_quantize_needs_one_device(checkpoints):
    with pytest.raises(ValueError, match="one device"):
        qasr_jax.load(checkpoints("asr").hf, quantize="int8", mesh="data=1")
