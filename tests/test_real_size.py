"""The released model sizes: shapes checked abstractly (fast), numeric parity and a 20-minute encode (slow).

Fast (CI): for every released preset, the parameter tree from ``jax.eval_shape`` of init matches the numbers of
DESIGN.md's table (written out here, not derived from the presets), a forward pass traced with ``jax.eval_shape``
(a 20-minute encode, prompt logits, a prefill and a decode step) gives the right output shapes without allocating
anything, and both config.json schemas written for each preset parse back to it.

Slow (``python -m pytest -m slow tests/test_real_size.py``; minutes, up to ~10 GB of RAM, run one at a time):
float32 parity with the PyTorch reference at the real ASR-0.6B size, and one encoder call on 20 minutes of audio
in a child process whose peak RSS is measured. Measured figures are recorded in benchmarks/RESULTS.md; run with
``-s`` to see them.
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

from qasr_jax.compiles import jit_with_encoder
from qasr_jax.config import audio_token_count, config_from_hf_dict, load_config, preset
from qasr_jax.model import KVCache, Qwen3ASRModule, param_shapes

# DESIGN.md's table, by preset: encoder (d_model, layers, heads, ffn), projector output,
# decoder (layers, heads, kv heads, head_dim, intermediate), vocab, tied, head classes (None: LM head).
TABLE = {
    "asr-0.6b": dict(enc=(896, 18, 14, 3584), proj=1024, dec=(28, 16, 8, 128, 3072), vocab=151936, tied=True,
                     classes=None),
    "asr-1.7b": dict(enc=(1024, 24, 16, 4096), proj=2048, dec=(28, 16, 8, 128, 6144), vocab=151936, tied=True,
                     classes=None),
    "aligner-0.6b": dict(enc=(1024, 24, 16, 4096), proj=1024, dec=(28, 16, 8, 128, 3072), vocab=152064,
                         tied=False, classes=5000),
}
# Non-embedding parameters of the Qwen3 decoders, as published on the Qwen3-0.6B / Qwen3-1.7B model cards.
DECODER_NON_EMBEDDING = {"asr-0.6b": 0.44e9, "asr-1.7b": 1.4e9, "aligner-0.6b": 0.44e9}
MELS, DOWNSAMPLE, FREQ_AFTER_CONV = 128, 480, 16
TWENTY_MINUTES_FRAMES = 20 * 60 * 100  # 100 log-mel frames per second
TWENTY_MINUTES_TOKENS = 20 * 60 * 13  # 13 encoder tokens per 1 s chunk


def shapes(tree) -> dict[str, tuple[int, ...]]:
    """'a/b/c' -> shape for every leaf."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(k.key for k in path): tuple(x.shape) for path, x in flat}


@pytest.mark.parametrize("name", list(TABLE))
def test_param_shapes_match_design_table(name):
    t = TABLE[name]
    d, layers, heads, ffn = t["enc"]
    dec_layers, q_heads, kv_heads, head_dim, inter = t["dec"]
    hidden = t["proj"]
    cfg = preset(name)
    assert (cfg.audio.d_model, cfg.audio.layers, cfg.audio.heads, cfg.audio.ffn_dim) == t["enc"]
    assert (cfg.text.layers, cfg.text.heads, cfg.text.kv_heads, cfg.text.head_dim) == t["dec"][:4]
    assert cfg.text.tie_word_embeddings is t["tied"] and cfg.num_labels == t["classes"]
    got = shapes(param_shapes(cfg))
    want = {
        "audio_tower/conv2d1/kernel": (3, 3, 1, DOWNSAMPLE),
        "audio_tower/conv2d2/kernel": (3, 3, DOWNSAMPLE, DOWNSAMPLE),
        "audio_tower/conv2d3/kernel": (3, 3, DOWNSAMPLE, DOWNSAMPLE),
        **{f"audio_tower/conv2d{i}/bias": (DOWNSAMPLE,) for i in (1, 2, 3)},
        "audio_tower/conv_out/kernel": (DOWNSAMPLE * FREQ_AFTER_CONV, d),
        **{f"audio_tower/layers_{i}/{p}/kernel": (d, d) for p in "qkvo" for i in range(layers)},
        **{f"audio_tower/layers_{i}/{p}/bias": (d,) for p in "qkvo" for i in range(layers)},
        **{f"audio_tower/layers_{i}/fc1/kernel": (d, ffn) for i in range(layers)},
        **{f"audio_tower/layers_{i}/fc1/bias": (ffn,) for i in range(layers)},
        **{f"audio_tower/layers_{i}/fc2/kernel": (ffn, d) for i in range(layers)},
        **{f"audio_tower/layers_{i}/fc2/bias": (d,) for i in range(layers)},
        **{f"audio_tower/layers_{i}/{n}/{w}": (d,) for n in ("attn_norm", "mlp_norm") for w in ("scale", "bias")
           for i in range(layers)},
        "audio_tower/ln_post/scale": (d,),
        "audio_tower/ln_post/bias": (d,),
        "projector/proj1/kernel": (d, d),
        "projector/proj1/bias": (d,),
        "projector/proj2/kernel": (d, hidden),
        "projector/proj2/bias": (hidden,),
        "decoder/embed/embedding": (t["vocab"], hidden),
        # q|k|v grouped by kv head: (hidden, kv_heads, q heads per kv head + k + v, head_dim); gate|up.
        **{f"decoder/layers_{i}/qkv/kernel": (hidden, kv_heads, q_heads // kv_heads + 2, head_dim)
           for i in range(dec_layers)},
        **{f"decoder/layers_{i}/o/kernel": (q_heads * head_dim, hidden) for i in range(dec_layers)},
        **{f"decoder/layers_{i}/{n}_norm/scale": (head_dim,) for n in "qk" for i in range(dec_layers)},
        **{f"decoder/layers_{i}/gate_up/kernel": (hidden, 2, inter) for i in range(dec_layers)},
        **{f"decoder/layers_{i}/down/kernel": (inter, hidden) for i in range(dec_layers)},
        **{f"decoder/layers_{i}/{n}_norm/scale": (hidden,) for n in ("attn", "mlp") for i in range(dec_layers)},
        "decoder/norm/scale": (hidden,),
    }
    if t["classes"] is not None:
        want["score/kernel"] = (hidden, t["classes"])  # the aligner's class head; no LM head
    elif not t["tied"]:
        want["lm_head/kernel"] = (hidden, t["vocab"])
    # Tied ASR models: the embedding is the head, so neither lm_head nor score exists.
    assert got == want
    non_embedding = sum(int(np.prod(s)) for k, s in got.items() if k.startswith("decoder/") and "embed" not in k)
    assert abs(non_embedding - DECODER_NON_EMBEDDING[name]) / DECODER_NON_EMBEDDING[name] < 0.02


def _abstract(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("name", list(TABLE))
def test_forward_shapes_at_real_size_without_memory(name):
    """encode of 20 minutes, prompt logits, prefill and one step under eval_shape: shapes only, nothing allocated."""
    t = TABLE[name]
    cfg = preset(name)
    module = Qwen3ASRModule(cfg, jnp.float32)
    variables = {"params": param_shapes(cfg)}
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    audio, n_tok = jax.eval_shape(
        lambda v, x, n: module.apply(v, x, n, method=Qwen3ASRModule.encode),
        variables, _abstract((1, MELS, TWENTY_MINUTES_FRAMES)), _abstract((1,), jnp.int32),
    )
    assert audio.shape == (1, TWENTY_MINUTES_TOKENS, t["proj"]) and audio.dtype == jnp.float32
    assert n_tok.shape == (1,)
    assert audio_token_count(TWENTY_MINUTES_FRAMES, cfg.audio) == TWENTY_MINUTES_TOKENS

    frames = 1200  # 11.3 s padded to whole 1 s chunks
    n_audio = audio_token_count(1130, cfg.audio)
    seq = n_audio + 16
    out_classes = t["classes"] or t["vocab"]
    logits = jax.eval_shape(
        module.apply, variables, _abstract((2, seq), jnp.int32), _abstract((2, MELS, frames)),
        _abstract((2,), jnp.int32),
    )
    assert logits.shape == (2, seq, out_classes) and logits.dtype == jnp.float32

    max_len = seq + 32
    cache = jax.eval_shape(lambda: KVCache.init(cfg.text, 2, max_len))
    dec_layers, _, kv_heads, head_dim, _ = t["dec"]
    assert cache.k.shape == cache.v.shape == (dec_layers, 2, kv_heads, max_len, head_dim)
    next_logits, cache = jax.eval_shape(
        lambda v, e, n, c: module.apply(v, e, n, c, method=Qwen3ASRModule.extend),
        variables, _abstract((2, seq, t["proj"])), _abstract((2,), jnp.int32), cache,
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


@pytest.mark.parametrize("name", list(TABLE))
def test_config_json_schemas_parse_back_to_preset(name, tmp_path):
    """The -hf config.json as save_pretrained writes it, and the official schema, both give back the preset."""
    import transformers

    from tests.reference import hf_config, official_config

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
    import torch
    from transformers import Qwen3ASRForConditionalGeneration

    import qasr_jax
    from tests.conftest import speech
    from tests.reference import build_reference, save_hf
    from tests.test_parity import prompt, reference_inputs, rel

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
    cache = model.init_cache(1, len(ids) + 8)
    embeds = model.embed(jnp.asarray([ids], jnp.int32), jnp.asarray(audio)[None])
    next_logits, _ = model.prefill(embeds, jnp.ones((1, len(ids)), bool), cache)
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

    from tests.conftest import speech

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
    from qasr_jax.audio import log_mel

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
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "from tests.test_real_size import _encode_twenty_minutes as f; f()"
    cap = int(0.8 * _meminfo_mb("MemAvailable") * 2**20)
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=3600,
                          preexec_fn=_cap_address_space(cap))
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    total = _meminfo_mb("MemTotal")
    print("\n20-minute encode:", json.dumps(lines), f"(cap {cap / 2**20:.0f} MB, MemTotal {total:.0f} MB)")
    assert proc.returncode == 0, (
        f"the 20-minute encode did not run within {cap / 2**20:.0f} MB (exit {proc.returncode}; XLA's estimate "
        f"{lines[0]['xla_need_mb'] if lines else '?'} MB): {proc.stderr[-2000:]}"
    )
    result = lines[-1]
    assert result["shape"] == [1, TWENTY_MINUTES_TOKENS, 1024] and result["n_tokens"] == TWENTY_MINUTES_TOKENS
    assert result["finite"]
    assert result["peak_rss_mb"] < total
