"""qasr_jax params -> a released-style checkpoint folder: safetensors in the official (``thinker.*``) or
transformers-native (``-hf``) layout, its config.json, and the tokenizer and front-end files beside it.

The tensors come from the same table the loader reads (``checkpoint.params_to_hf``), so an exported folder loads
back into qasr_jax, into transformers (``-hf``) and into the official toolkit and vLLM (official).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from safetensors.numpy import save_file

from qasr_jax.convert.checkpoint import params_to_hf, to_official_name, tree_to_numpy
from qasr_jax.convert.orbax_io import SIDE_FILES
from qasr_jax.io.tokenizer import Tokenizer
from qasr_jax.modeling.config import ModelConfig

LAYOUTS = ("hf", "official")
SHARD_BYTES = 4 << 30  # safetensors files are split above this size, with an index


def _audio_fields(cfg: ModelConfig) -> dict:
    a = cfg.audio
    return {"d_model": a.d_model, "encoder_layers": a.layers, "encoder_attention_heads": a.heads,
            "encoder_ffn_dim": a.ffn_dim, "output_dim": a.output_dim, "num_mel_bins": a.num_mel_bins,
            "n_window": a.n_window, "n_window_infer": a.n_window_infer,
            "downsample_hidden_size": a.downsample_hidden_size, "activation_function": "gelu"}


def _text_fields(cfg: ModelConfig) -> dict:
    t = cfg.text
    return {"vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.layers, "num_attention_heads": t.heads, "num_key_value_heads": t.kv_heads,
            "head_dim": t.head_dim, "rms_norm_eps": t.rms_norm_eps, "tie_word_embeddings": t.tie_word_embeddings,
            "max_position_embeddings": t.max_position_embeddings, "hidden_act": "silu"}


def hf_config(cfg: ModelConfig, dtype: str, tok: Tokenizer) -> dict:
    """config.json of the transformers-native layout (``Qwen3ASRForConditionalGeneration``); generation stops at
    ``tok``'s ``<|endoftext|>`` and ``<|im_end|>`` and pads with ``<|im_end|>``, as the released configs do."""
    t = cfg.text
    text = {**_text_fields(cfg), "model_type": "qwen3",
            "rope_parameters": {"rope_theta": t.rope_theta, "rope_type": "default"}}
    return {"architectures": ["Qwen3ASRForConditionalGeneration"], "model_type": "qwen3_asr",
            "audio_config": {**_audio_fields(cfg), "model_type": "qwen3_asr_encoder"}, "text_config": text,
            "audio_token_id": cfg.audio_token_id, "tie_word_embeddings": t.tie_word_embeddings,
            "eos_token_id": [tok.endoftext_id, tok.im_end_id], "pad_token_id": tok.im_end_id, "dtype": dtype,
            "support_languages": list(cfg.support_languages)}


def official_config(cfg: ModelConfig, dtype: str) -> dict:
    """config.json of the official layout (``thinker_config``), as ``Qwen/Qwen3-ASR-*`` ship it."""
    t = cfg.text
    text = {**_text_fields(cfg), "model_type": "qwen3_asr_text", "rope_theta": t.rope_theta,
            "rope_scaling": {"interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"}}
    audio = {**_audio_fields(cfg), "model_type": "qwen3_asr_audio_encoder", "conv_chunksize": 500,
             "max_source_positions": 1500}
    thinker = {"audio_config": audio, "text_config": text, "audio_token_id": cfg.audio_token_id,
               "model_type": "qwen3_asr_thinker", "dtype": dtype}
    return {"architectures": ["Qwen3ASRForConditionalGeneration"], "model_type": "qwen3_asr",
            "thinker_config": thinker, "support_languages": list(cfg.support_languages)}


def _save_tensors(tensors: dict[str, np.ndarray], dst: str) -> None:
    names = sorted(tensors)
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        n = tensors[name].nbytes
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    if len(shards) == 1:
        save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, part in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in part}, os.path.join(dst, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    total = sum(t.nbytes for t in tensors.values())
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)


def export_checkpoint(params, cfg: ModelConfig, dst: str, layout: str, dtype: str, copy_from: str) -> str:
    """Write ``params`` as a checkpoint folder ``dst`` in ``layout`` ("hf" or "official"), weights in ``dtype``;
    tokenizer, preprocessor and generation files are copied from the folder ``copy_from``, whose tokenizer gives
    the config's token ids. Returns ``dst``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if copy_from is None:
        raise ValueError("export needs copy_from, the source checkpoint folder: its tokenizer gives the exported ids")
    tok = Tokenizer.from_dir(copy_from)
    if cfg.is_aligner:
        raise ValueError("export writes ASR checkpoints; this config is a forced aligner")
    import ml_dtypes

    targets = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
    if dtype not in targets:
        raise ValueError(f"dtype must be one of {tuple(targets)}, got {dtype!r}")
    target = targets[dtype]
    tensors = {name: np.ascontiguousarray(np.asarray(t).astype(target))
               for name, t in params_to_hf(tree_to_numpy(params), cfg).items()}
    if layout == "official":
        tensors = {to_official_name(name, cfg): t for name, t in tensors.items()}
    os.makedirs(dst, exist_ok=True)
    for old in os.listdir(dst):  # a stale shard from an earlier export would be read as part of this one
        if old.endswith(".safetensors") or old == "model.safetensors.index.json":
            os.remove(os.path.join(dst, old))
    _save_tensors(tensors, dst)
    config = hf_config(cfg, dtype, tok) if layout == "hf" else official_config(cfg, dtype)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    for name in SIDE_FILES:
        src = os.path.join(copy_from, name)
        if os.path.isfile(src) and os.path.abspath(src) != os.path.abspath(os.path.join(dst, name)):
            shutil.copy2(src, os.path.join(dst, name))
    return dst
