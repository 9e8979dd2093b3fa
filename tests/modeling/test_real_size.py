"""The released model sizes: presets checked against transformers, shapes abstractly, parity and a 20-minute encode.

The presets are checked against what transformers itself runs: ``Qwen3ASRConfig()``'s defaults are documented as
Qwen/Qwen3-ASR-1.7B-hf (the only released size transformers ships defaults for), and for every preset the
reference model transformers builds from it (on the meta device: shapes, no memory) has the parameters of
qasr_jax's model, group by group. The decoders' non-embedding parameter counts match the Qwen3-0.6B / Qwen3-1.7B
model cards. A forward pass traced with ``jax.eval_shape`` (a 20-minute encode, prompt logits, a prefill and a
decode step) gives the right output shapes without allocating anything, and both config.json schemas written for
each preset parse back to it.

Marked ``slow`` (about a minute each on 2 cores; CI runs them, ``-m "not slow"`` leaves them out): float32 parity
with the PyTorch reference at the real ASR-0.6B size (about 9 GB of RAM at peak), and one encoder call on 20
minutes of audio in a child process whose peak RSS is measured. Run with ``-s`` to see the figures, which are
recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen3ASRConfig, Qwen3ASRForConditionalGeneration, Qwen3ASRForTokenClassification

from qasr_jax.decoding.compiles import jit_with_encoder
from qasr_jax.modeling.config import audio_token_count, config_from_hf_dict, load_config, preset
from qasr_jax.modeling.model import KVCache, Qwen3ASRModule, param_shapes
from qasr_jax.testing.reference import hf_config

RELEASED = ["asr-0.6b", "asr-1.7b", "aligner-0.6b"]
# Non-embedding parameters of the Qwen3 decoders, as published on the Qwen3-0.6B / Qwen3-1.7B model cards.
DECODER_NON_EMBEDDING = {"asr-0.6b": 0.44e9, "asr-1.7b": 1.4e9, "aligner-0.6b": 0.44e9}
TWENTY_MINUTES_FRAMES = 20 * 60 * 100  # 100 log-mel frames per second
TWENTY_MINUTES_TOKENS = 20 * 60 * 13  # 13 encoder tokens per 1 s chunk


def test_asr_1_7b_preset_is_transformers_default_config():
    """transformers' Qwen3ASRConfig() describes Qwen/Qwen3-ASR-1.7B-hf: every size it sets equals the preset."""
    ref = Qwen3ASRConfig()
    a, t = ref.audio_config, ref.text_config
    cfg = preset("asr-1.7b")
    assert (cfg.audio.d_model, cfg.audio.layers, cfg.audio.heads, cfg.audio.ffn_dim) == (
        a.d_model, a.encoder_layers, a.encoder_attention_heads, a.encoder_ffn_dim)
    assert (cfg.audio.num_mel_bins, cfg.audio.n_window, cfg.audio.n_window_infer, cfg.audio.downsample_hidden_size) == (
        a.num_mel_bins, a.n_window, a.n_window_infer, a.downsample_hidden_size)
    assert (cfg.text.hidden_size, cfg.text.intermediate_size, cfg.text.layers, cfg.text.heads, cfg.text.kv_heads,
            cfg.text.head_dim) == (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
                                   t.num_key_value_heads, t.head_dim)
    assert (cfg.text.vocab_size, cfg.text.tie_word_embeddings, cfg.text.rms_norm_eps,
            cfg.text.max_position_embeddings) == (t.vocab_size, ref.tie_word_embeddings, t.rms_norm_eps,
                                                  t.max_position_embeddings)
    assert cfg.audio_token_id == ref.audio_token_id
    assert preset("aligner-0.6b").timestamp_token_id == ref.timestamp_token_id  # ASR names no <timestamp>
    # The default audio output_dim (3584) is Qwen3-Omni's; the projector's output replaces token embeddings, so in
    # a working model it is the text hidden size.
    assert cfg.audio.output_dim == t.hidden_size


def _group(path: str) -> str:
    """Parameter group of a transformers (-hf) name or a qasr_jax path: encoder, projector, decoder or head."""
    first = path.split("/")[0] if "/" in path else path.removeprefix("model.").split(".")[0]
    return {"audio_tower": "encoder", "multi_modal_projector": "projector", "projector": "projector",
            "language_model": "decoder", "decoder": "decoder"}.get(first, "head")


@pytest.mark.parametrize("name", RELEASED)
def test_params_equal_the_reference_models_group_by_group(name):
    """The reference model transformers builds from the preset (meta device) and ours hold the same parameters:
    the same number in each group (encoder, projector, decoder, head); a tied head is not a tensor of its own."""
    cfg = preset(name)
    cls = Qwen3ASRForTokenClassification if cfg.is_aligner else Qwen3ASRForConditionalGeneration
    with torch.device("meta"):
        ref = cls(hf_config(cfg))

    def tally(items):
        out: dict[str, list[int]] = {}  # group -> sizes of its tensors
        for path, size in items:
            out.setdefault(_group(path), []).append(size)
        return out

    theirs = tally((n, p.numel()) for n, p in ref.named_parameters())  # tied weights are listed once
    flat = jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]
    ours = tally(("/".join(k.key for k in path), int(np.prod(x.shape))) for path, x in flat)
    assert {g: sum(v) for g, v in ours.items()} == {g: sum(v) for g, v in theirs.items()}
    assert ("head" in ours) == (cfg.is_aligner or not cfg.text.tie_word_embeddings)
    non_embedding = sum(theirs["decoder"]) - cfg.text.vocab_size * cfg.text.hidden_size
    assert abs(non_embedding - DECODER_NON_EMBEDDING[name]) / DECODER_NON_EMBEDDING[name] < 0.02


def _abstract(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("name", RELEASED)
def test_forward_shapes_at_real_size_without_memory(name):
    """encode of 20 minutes, prompt logits, prefill and one step under eval_shape: shapes only, nothing allocated."""
    cfg = preset(name)
    hidden, mels = cfg.text.hidden_size, cfg.audio.num_mel_bins
    module = Qwen3ASRModule(cfg, jnp.float32)
    variables = {"params": param_shapes(cfg)}
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    audio, n_tok = jax.eval_shape(
        lambda v, x, n: module.apply(v, x, n, method=Qwen3ASRModule.encode),
        variables, _abstract((1, mels, TWENTY_MINUTES_FRAMES)), _abstract((1,), jnp.int32),
    )
    assert audio.shape == (1, TWENTY_MINUTES_TOKENS, hidden) and audio.dtype == jnp.float32
    assert n_tok.shape == (1,)
    assert audio_token_count(TWENTY_MINUTES_FRAMES, cfg.audio) == TWENTY_MINUTES_TOKENS

    frames = 1200  # 11.3 s padded to whole 1 s chunks
    n_audio = audio_token_count(1130, cfg.audio)
    seq = n_audio + 16
    out_classes = cfg.num_labels or cfg.text.vocab_size
    logits = jax.eval_shape(
        module.apply, variables, _abstract((2, seq), jnp.int32), _abstract((2, mels, frames)),
        _abstract((2,), jnp.int32),
    )
    assert logits.shape == (2, seq, out_classes) and logits.dtype == jnp.float32

    max_len = seq + 32
    cache = jax.eval_shape(lambda: KVCache.init(cfg.text, 2, max_len))
    dec_layers, kv_heads, head_dim = cfg.text.layers, cfg.text.kv_heads, cfg.text.head_dim
    assert len(cache.k) == len(cache.v) == dec_layers
    assert {t.shape for t in cache.k + cache.v} == {(2, kv_heads, max_len, head_dim)}
    next_logits, cache = jax.eval_shape(
        lambda v, e, n, c: module.apply(v, e, n, c, method=Qwen3ASRModule.extend),
        variables, _abstract((2, seq, hidden)), _abstract((2,), jnp.int32), cache,
    )
    assert next_logits.shape == (2, out_classes)
    step_logits, cache = jax.eval_shape(
        lambda v, tok, a, c: module.apply(v, tok, a, c, method=Qwen3ASRModule.step),
        variables, _abstract((2,), jnp.int32), _abstract((2,), jnp.bool_), cache,
    )
    assert step_logits.shape == (2, out_classes) and cache.max_len == max_len
    # Real buffers for the 20-minute encode alone would be several GB; tracing must not have touched them.
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mb < 500, f"eval_shape grew peak RSS by {grown_mb:.0f} MB"


@pytest.mark.parametrize("name", RELEASED)
def test_config_json_schemas_parse_back_to_preset(name, tmp_path):
    """The -hf config.json as save_pretrained writes it, and the official schema, both give back the preset."""
    import transformers

    from qasr_jax.testing.reference import hf_config, official_config

    cfg = preset(name)
    hf = hf_config(cfg)
    # save_pretrained records the model class; the loader tells the aligner apart by it.
    hf.architectures = [
        "Qwen3ASRForTokenClassification" if cfg.is_aligner else "Qwen3ASRForConditionalGeneration"
    ]
    assert hasattr(transformers, hf.architectures[0])
    hf.save_pretrained(tmp_path / "hf")
    assert load_config(tmp_path / "hf") == cfg
    assert config_from_hf_dict(json.loads(json.dumps(official_config(cfg)))) == cfg


# ----------------------------------------------------------------------------------------------------------------
# Slow: real numbers at the real size
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_parity_at_real_asr_0_6b_size(tmp_path):
    """Random-weight ASR-0.6B (float32): encoder, projector and prompt logits on the 10 s clip within 1e-4, both
    sides fed the reference extractor's log-mel.

    The checkpoint is saved in bfloat16 and both sides load it as float32, so they hold identical values. The
    reference is run and freed before qasr_jax loads, to keep the peak low.
    """
    import qasr_jax
    from qasr_jax.testing import speech
    from qasr_jax.testing.reference import build_reference, save_hf
    from qasr_jax.testing.parity import prompt, reference_inputs, rel

    cfg = preset("asr-0.6b")
    wave = speech("long_en.wav")
    feats, mask = reference_inputs(wave)
    ids = prompt(audio_token_count(int(mask.sum()), cfg.audio))
    ref_model = build_reference(cfg, seed=6)
    folder = save_hf(ref_model, str(tmp_path / "asr-0.6b"), dtype=torch.bfloat16)
    # save_hf's round trip through bfloat16 also rounds the non-persistent buffers (the encoder's sinusoids, RoPE
    # inv_freq) of the model in memory; the reference is therefore the checkpoint loaded back, as a user would.
    del ref_model
    gc.collect()
    ref_model = Qwen3ASRForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        enc = ref_model.model.get_audio_features(feats, mask)
        ref_hidden = enc.last_hidden_state.numpy().copy()
        ref_audio = enc.pooler_output.numpy().copy()
        ref_logits = ref_model(input_ids=torch.tensor([ids]), input_features=feats,
                               input_features_mask=mask).logits[0].numpy().copy()
    del ref_model, enc
    gc.collect()

    model = qasr_jax.load(folder)  # float32
    # Both sides get the same features (the reference extractor's): the model is compared on its own. Features are
    # compared in test_audio; here their tiny float32 difference is also pushed through the whole model, for the
    # record (random weights at this depth amplify input differences; see the figures printed).
    ref_feats = feats[0, :, : int(mask.sum())].numpy()
    hidden, n_tok = model.module.apply(
        {"params": model.params}, *model._pad_feats(ref_feats), method=lambda m, x, n: m.audio_tower(x, n)
    )
    audio = model.encode(ref_feats)
    logits = model.logits(ids, ref_feats)
    cache = model.engine.init_cache(1, len(ids) + 8)
    embeds = model.engine.embed(jnp.asarray([ids], jnp.int32), jnp.asarray(audio)[None])
    next_logits, _ = model.engine.extend(cache, embeds, np.array([len(ids)], np.int32))
    figures = {
        "encoder (ln_post)": rel(np.asarray(hidden[0, : int(n_tok[0])]), ref_hidden),
        "projector output": rel(audio, ref_audio),
        "prompt logits": rel(logits, ref_logits),
        "prefill next-token logits": rel(np.asarray(next_logits[0]), ref_logits[-1]),
    }
    our_feats = model.log_mel(wave)
    from_wave = {
        "log-mel": rel(our_feats, ref_feats),
        "projector output": rel(model.encode(our_feats), ref_audio),
        "prompt logits": rel(model.logits(ids, our_feats), ref_logits),
    }
    print("\nreal-size ASR-0.6B parity, max|diff|/max|ref|, same features:", json.dumps(figures))
    print("from the waveform (our log-mel vs the reference extractor's):", json.dumps(from_wave))
    assert audio.shape == ref_audio.shape and logits.shape == ref_logits.shape
    assert all(v <= 1e-4 for v in figures.values()), figures
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).all()


def _encode_twenty_minutes() -> None:
    """Child process body: random ASR-0.6B encoder + projector, one encode of 20 minutes; prints a JSON line."""
    import time

    from qasr_jax.testing import speech

    cfg = preset("asr-0.6b")
    module = Qwen3ASRModule(cfg, jnp.float32)
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        names = "/".join(k.key for k in path)
        if names.endswith("scale"):
            return np.ones(leaf.shape, np.float32)
        if names.endswith("bias"):
            return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
        fan_in = int(np.prod(leaf.shape[:3])) if "conv2d" in names else leaf.shape[-2]  # HWIO or (.., in, out)
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

    full = param_shapes(cfg)
    params = {k: jax.tree_util.tree_map_with_path(draw, full[k]) for k in ("audio_tower", "projector")}
    params = jax.device_put(params)
    rss_params_mb = _rss_mb()
    # Real speech features, tiled: the 10 s clip's log-mel repeated to 20 minutes.
    from qasr_jax.io.audio import log_mel

    clip = np.asarray(log_mel(speech("long_en.wav")))
    reps = -(-TWENTY_MINUTES_FRAMES // clip.shape[1])
    feats = np.tile(clip, (1, reps))[None, :, :TWENTY_MINUTES_FRAMES]
    # Compiled as qasr_jax compiles its encoder programs (on CPU: YNNPACK, whose convolution workspace lies outside
    # XLA's memory plan, off).
    encode = jit_with_encoder(lambda p, x, n: module.apply({"params": p}, x, n, method=Qwen3ASRModule.encode))
    args = (params, jnp.asarray(feats), jnp.array([TWENTY_MINUTES_FRAMES], jnp.int32))
    compiled = encode.lower(*args).compile()
    mem = compiled.memory_analysis()
    need_mb = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes) / 2**20
    result = {"xla_temp_mb": mem.temp_size_in_bytes / 2**20, "xla_need_mb": need_mb, "rss_after_params_mb": rss_params_mb}
    print(json.dumps(result), flush=True)  # XLA's own estimate, before running
    start = time.perf_counter()
    out, n_tok = compiled(*args)
    out = np.asarray(out)
    result.update(encode_s=time.perf_counter() - start, shape=list(out.shape), n_tokens=int(n_tok[0]),
                  finite=bool(np.isfinite(out).all()), peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _meminfo_mb(field: str) -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/meminfo")


def _cap_address_space(limit_bytes: int):
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return cap


@pytest.mark.slow
def test_twenty_minutes_encode_in_one_call():
    """20 minutes of features through the real-size ASR-0.6B encoder in one call: output (15600, 1024), finite.

    It runs in a child process, so that its peak RSS is its own, under an address-space cap of 80% of the memory
    free when it starts: on this shared machine a program that does not fit must fail on its own allocation
    instead of waking the kernel's OOM killer, which may pick another process.
    """
    here = os.path.dirname(os.path.abspath(__file__))  # `-c` puts it first on sys.path: tests/, never the root
    code = "from test_real_size import _encode_twenty_minutes as f; f()"
    cap = int(0.8 * _meminfo_mb("MemAvailable") * 2**20)
    proc = subprocess.run([sys.executable, "-c", code], cwd=here, capture_output=True, text=True, timeout=3600,
                          preexec_fn=_cap_address_space(cap))
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    total = _meminfo_mb("MemTotal")
    print("\n20-minute encode:", json.dumps(lines), f"(cap {cap / 2**20:.0f} MB, MemTotal {total:.0f} MB)")
    assert proc.returncode == 0, (
        f"the 20-minute encode did not run within {cap / 2**20:.0f} MB (exit {proc.returncode}; XLA's estimate "
        f"{lines[0]['xla_need_mb'] if lines else '?'} MB): {proc.stderr[-2000:]}"
    )
    result = lines[-1]
    assert result["shape"] == [1, TWENTY_MINUTES_TOKENS, preset("asr-0.6b").audio.output_dim]
    assert result["n_tokens"] == TWENTY_MINUTES_TOKENS
    assert result["finite"]
    assert result["peak_rss_mb"] < total
