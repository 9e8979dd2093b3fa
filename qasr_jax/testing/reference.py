"""Reference checkpoints for parity tests: transformers' Qwen3-ASR with random weights, saved like real ones.

Weights are drawn so that every bias and norm weight matters (the default 0.02 init hides mistakes): matrices
with unit-variance outputs, biases and norm weights far from 0 and 1. The same weights are written in the
-hf layout (``save_pretrained``, optionally sharded) and in the official layout (``thinker.*`` names, official
config.json schema), so both loaders are checked against one reference forward pass.
"""

from __future__ import annotations

import copy
import json
import os

import torch
from safetensors.torch import save_file
from transformers import Qwen3ASRConfig, Qwen3ASRForConditionalGeneration, Qwen3ASRForTokenClassification

from qasr_jax.modeling.config import ModelConfig

# -hf name prefix -> official name prefix (the inverse of convert/checkpoint.py's table, written out on its own
# so that a mistake in one is not repeated in the other).
HF_TO_OFFICIAL = (
    ("model.multi_modal_projector.linear_1.", "thinker.audio_tower.proj1."),
    ("model.multi_modal_projector.linear_2.", "thinker.audio_tower.proj2."),
    ("model.audio_tower.", "thinker.audio_tower."),
    ("model.language_model.", "thinker.model."),
    ("lm_head.", "thinker.lm_head."),
    ("score.", "thinker.lm_head."),
)


def hf_config(cfg: ModelConfig, tok=None) -> Qwen3ASRConfig:
    """The transformers config for a qasr_jax ModelConfig; generation stops at ``tok``'s ``<|endoftext|>`` and
    ``<|im_end|>`` and pads with ``<|im_end|>`` (None: transformers' defaults, the Qwen tokenizer's ids)."""
    a, t = cfg.audio, cfg.text
    extra = {}
    if cfg.is_aligner:
        extra = {"num_labels": cfg.num_labels, "timestamp_token_id": cfg.timestamp_token_id}
    if tok is not None:
        extra.update(eos_token_id=[tok.endoftext_id, tok.im_end_id], pad_token_id=tok.im_end_id)
    return Qwen3ASRConfig(
        audio_config=dict(
            d_model=a.d_model, encoder_layers=a.layers, encoder_attention_heads=a.heads, encoder_ffn_dim=a.ffn_dim,
            output_dim=a.output_dim, num_mel_bins=a.num_mel_bins, n_window=a.n_window,
            n_window_infer=a.n_window_infer, downsample_hidden_size=a.downsample_hidden_size,
        ),
        text_config=dict(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_hidden_layers=t.layers, num_attention_heads=t.heads, num_key_value_heads=t.kv_heads,
            head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps, tie_word_embeddings=t.tie_word_embeddings,
            rope_parameters={"rope_theta": t.rope_theta, "rope_type": "default"},
            max_position_embeddings=t.max_position_embeddings,
        ),
        tie_word_embeddings=t.tie_word_embeddings and not cfg.is_aligner,
        audio_token_id=cfg.audio_token_id,
        **extra,
    )


def official_config(cfg: ModelConfig) -> dict:
    """A config.json dict in the official (``thinker_config``) schema."""
    a, t = cfg.audio, cfg.text
    thinker = {
        "audio_config": {
            "d_model": a.d_model, "encoder_layers": a.layers, "encoder_attention_heads": a.heads,
            "encoder_ffn_dim": a.ffn_dim, "output_dim": a.output_dim, "num_mel_bins": a.num_mel_bins,
            "n_window": a.n_window, "n_window_infer": a.n_window_infer, "conv_chunksize": 500,
            "downsample_hidden_size": a.downsample_hidden_size, "max_source_positions": 1500,
            "activation_function": "gelu", "model_type": "qwen3_asr_audio_encoder",
        },
        "text_config": {
            "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.layers, "num_attention_heads": t.heads, "num_key_value_heads": t.kv_heads,
            "head_dim": t.head_dim, "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_theta,
            "rope_scaling": {"interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
            "tie_word_embeddings": t.tie_word_embeddings, "max_position_embeddings": t.max_position_embeddings,
            "model_type": "qwen3_asr_text",
        },
        "audio_token_id": cfg.audio_token_id,
        "model_type": "qwen3_asr_thinker",
    }
    out = {"architectures": ["Qwen3ASRForConditionalGeneration"], "thinker_config": thinker,
           "model_type": "qwen3_asr", "support_languages": list(cfg.support_languages)}
    if cfg.is_aligner:
        thinker["classify_num"] = cfg.num_labels
        out.update(model_type="qwen3_forced_aligner", timestamp_token_id=cfg.timestamp_token_id,
                   timestamp_segment_time=cfg.timestamp_segment_ms)
    return out


def build_reference(cfg: ModelConfig, seed: int = 0, tok=None) -> torch.nn.Module:
    """A float32 reference model with random weights that make every parameter matter (``tok``: see hf_config)."""
    cls = Qwen3ASRForTokenClassification if cfg.is_aligner else Qwen3ASRForConditionalGeneration
    model = cls(hf_config(cfg, tok)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "ln_post" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:  # (out, in[, kh, kw]): unit-variance outputs for unit-variance inputs
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    if not cfg.is_aligner and cfg.text.tie_word_embeddings:
        model.tie_weights()
    return model


def to_official_name(name: str) -> str:
    for old, new in HF_TO_OFFICIAL:
        if name.startswith(old):
            return new + name[len(old):]
    raise KeyError(name)


def save_hf(model: torch.nn.Module, path: str, dtype: torch.dtype = torch.float32, max_shard_size=None) -> str:
    """``save_pretrained`` in the -hf layout (sharded when max_shard_size is given)."""
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    # A copy: casting the shared reference to bf16 and back would round its weights for every later test.
    copy.deepcopy(model).to(dtype).save_pretrained(path, **kwargs)
    return path


def save_official(model: torch.nn.Module, cfg: ModelConfig, path: str, dtype: torch.dtype = torch.float32,
                  shards: int = 1) -> str:
    """The same weights in the official layout: ``thinker.*`` names, official config.json, optional shards."""
    os.makedirs(path, exist_ok=True)
    state = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and not cfg.is_aligner and cfg.text.tie_word_embeddings:
            continue  # tied: the official files omit the head
        state[to_official_name(name)] = t.detach().to(dtype).contiguous().clone()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(official_config(cfg), f, indent=1)
    names = sorted(state)
    if shards == 1:
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return path
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[i * per:(i + 1) * per]}
        save_file(part, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    return path
