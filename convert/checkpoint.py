"""PyTorch/HF safetensors checkpoints (official and -hf layouts) -> qasr_jax params, read without torch.

Names go through one declarative table: official names are first renamed to the transformers-native (-hf) names,
then each -hf name maps to a path in the Flax tree plus a transform (Linear (out, in) -> Dense (in, out),
Conv2d (out, in, kh, kw) -> (kh, kw, in, out)). Per-layer tensors are stacked on a leading ``layers`` axis, as the
scanned modules expect. Every tensor's shape is checked against ``jax.eval_shape`` of the model's init, and all
missing, unexpected and mis-shaped tensors are reported together in one error.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping

import jax
import numpy as np
from safetensors import safe_open

from qasr_jax.config import ModelConfig
from qasr_jax.model import param_shapes


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not fit the model: lists every problem at once."""


def _linear(w: np.ndarray) -> np.ndarray:
    return w.T


def _conv2d(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 1, 0)


def _same(w: np.ndarray) -> np.ndarray:
    return w


# Official layout -> -hf layout, applied in order to the start of each name.
OFFICIAL_PREFIXES: tuple[tuple[str, str], ...] = (
    ("thinker.audio_tower.proj1.", "model.multi_modal_projector.linear_1."),
    ("thinker.audio_tower.proj2.", "model.multi_modal_projector.linear_2."),
    ("thinker.audio_tower.", "model.audio_tower."),
    ("thinker.model.", "model.language_model."),
    ("thinker.lm_head.", "lm_head."),  # the aligner's class head is renamed to score. below
)

# Buffers some exports carry that are not parameters (recomputed here).
IGNORED = (re.compile(r".*positional_embedding$"), re.compile(r".*rotary_emb\.inv_freq$"))

_A = r"model\.audio_tower\."
_T = r"model\.language_model\."
_L = r"layers\.(\d+)\."

# (-hf name pattern, Flax path ('{}' = the layer axis), transform). A pattern with a layer group is stacked.
RULES: tuple[tuple[str, tuple[str, ...], Callable], ...] = (
    (_A + r"conv2d(\d)\.weight", ("audio_tower", "conv2d{}", "kernel"), _conv2d),
    (_A + r"conv2d(\d)\.bias", ("audio_tower", "conv2d{}", "bias"), _same),
    (_A + r"conv_out\.weight", ("audio_tower", "conv_out", "kernel"), _linear),
    (_A + r"ln_post\.weight", ("audio_tower", "ln_post", "scale"), _same),
    (_A + r"ln_post\.bias", ("audio_tower", "ln_post", "bias"), _same),
    *(
        (_A + _L + src + r"\.weight", ("audio_tower", "layers", dst, "kernel"), _linear)
        for src, dst in [
            (r"self_attn\.q_proj", "q"), (r"self_attn\.k_proj", "k"), (r"self_attn\.v_proj", "v"),
            (r"self_attn\.out_proj", "o"), ("fc1", "fc1"), ("fc2", "fc2"),
        ]
    ),
    *(
        (_A + _L + src + r"\.bias", ("audio_tower", "layers", dst, "bias"), _same)
        for src, dst in [
            (r"self_attn\.q_proj", "q"), (r"self_attn\.k_proj", "k"), (r"self_attn\.v_proj", "v"),
            (r"self_attn\.out_proj", "o"), ("fc1", "fc1"), ("fc2", "fc2"),
            ("self_attn_layer_norm", "attn_norm"), ("final_layer_norm", "mlp_norm"),
        ]
    ),
    (_A + _L + r"self_attn_layer_norm\.weight", ("audio_tower", "layers", "attn_norm", "scale"), _same),
    (_A + _L + r"final_layer_norm\.weight", ("audio_tower", "layers", "mlp_norm", "scale"), _same),
    (r"model\.multi_modal_projector\.linear_([12])\.weight", ("projector", "proj{}", "kernel"), _linear),
    (r"model\.multi_modal_projector\.linear_([12])\.bias", ("projector", "proj{}", "bias"), _same),
    (_T + r"embed_tokens\.weight", ("decoder", "embed", "embedding"), _same),
    (_T + r"norm\.weight", ("decoder", "norm", "scale"), _same),
    *(
        (_T + _L + src + r"\.weight", ("decoder", "layers", dst, "kernel"), _linear)
        for src, dst in [
            (r"self_attn\.q_proj", "q"), (r"self_attn\.k_proj", "k"), (r"self_attn\.v_proj", "v"),
            (r"self_attn\.o_proj", "o"), (r"mlp\.gate_proj", "gate"), (r"mlp\.up_proj", "up"),
            (r"mlp\.down_proj", "down"),
        ]
    ),
    *(
        (_T + _L + src + r"\.weight", ("decoder", "layers", dst, "scale"), _same)
        for src, dst in [
            (r"self_attn\.q_norm", "q_norm"), (r"self_attn\.k_norm", "k_norm"),
            ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm"),
        ]
    ),
    (r"lm_head\.weight", ("lm_head", "kernel"), _linear),
    (r"score\.weight", ("score", "kernel"), _linear),
)
_COMPILED = tuple((re.compile(p), path, fn) for p, path, fn in RULES)


def to_hf_name(name: str, cfg: ModelConfig) -> str:
    """Rename an official-layout tensor name to its -hf name (a -hf name comes back unchanged)."""
    for old, new in OFFICIAL_PREFIXES:
        if name.startswith(old):
            name = new + name[len(old):]
            break
    if cfg.is_aligner and name.startswith("lm_head."):
        name = "score." + name[len("lm_head."):]
    return name


def safetensors_files(folder: str) -> list[str]:
    """The safetensors files of a checkpoint folder: single file, or the shards listed in the index."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise CheckpointError(f"{folder}: shards listed in model.safetensors.index.json are missing: {missing}")
        return [os.path.join(folder, s) for s in shards]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors file found; pass a Qwen3-ASR checkpoint folder")
    return [os.path.join(folder, f) for f in files]


def read_safetensors(folder: str) -> dict[str, np.ndarray]:
    """Every tensor of a (possibly sharded) checkpoint as numpy arrays (bf16 stays bf16 via ml_dtypes)."""
    tensors: dict[str, np.ndarray] = {}
    for file in safetensors_files(folder):
        with safe_open(file, framework="flax") as f:
            for key in f.keys():
                tensors[key] = np.asarray(f.get_tensor(key))
    return tensors


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _flat(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def hf_to_params(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, dtype: str = "float32", source: str = "") -> dict:
    """Map a name -> tensor dict (either layout) onto the qasr_jax param tree, checking every name and shape."""
    expected = _flat(param_shapes(cfg, dtype))
    unexpected: list[str] = []
    layered: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    plain: dict[tuple[str, ...], np.ndarray] = {}
    origin: dict[tuple[str, ...], str] = {}
    for name, value in tensors.items():
        if any(p.match(name) for p in IGNORED):
            continue
        hf = to_hf_name(name, cfg)
        if hf == "lm_head.weight" and not cfg.is_aligner and cfg.text.tie_word_embeddings:
            continue  # tied: some exports also save the head; the embedding is the head
        for pattern, path, fn in _COMPILED:
            m = pattern.fullmatch(hf)
            if m is None:
                continue
            groups = m.groups()
            if "{}" in "".join(path[:-1]) and groups and "layers" not in path:
                path = tuple(p.format(groups[0]) for p in path)
                groups = ()
            if "layers" in path:
                layered.setdefault(path, {})[int(groups[0])] = fn(value)
            else:
                plain[path] = fn(value)
            origin[path] = name
            break
        else:
            unexpected.append(name)
    problems: list[str] = []
    for path, per_layer in layered.items():
        n = expected[path].shape[0] if path in expected else len(per_layer)
        gaps = sorted(set(range(n)) - set(per_layer))
        if gaps:
            problems.append(f"missing layers {gaps} of {origin[path]} (expected {n} layers)")
            continue
        plain[path] = np.stack([per_layer[i] for i in range(n)])
        extra = sorted(set(per_layer) - set(range(n)))
        if extra:
            unexpected.extend(f"{origin[path]} (layer {i})" for i in extra)
    for path, value in plain.items():
        if path not in expected:
            unexpected.append(origin[path])
        elif tuple(value.shape) != tuple(expected[path].shape):
            problems.append(
                f"{origin[path]}: shape {tuple(value.shape)} after conversion, expected {tuple(expected[path].shape)}"
            )
    missing = [("/".join(p)) for p in expected if p not in plain]
    if missing:
        problems.append("missing: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected: " + ", ".join(sorted(unexpected)))
    if problems:
        raise CheckpointError(
            f"checkpoint {source or '<tensors>'} does not fit the config "
            f"({'aligner' if cfg.is_aligner else 'ASR'}, {cfg.text.layers} decoder layers):\n  - "
            + "\n  - ".join(problems)
        )
    params: dict = {}
    for path, value in plain.items():
        _set(params, path, value.astype(expected[path].dtype))
    return params


def load_hf_params(folder: str, cfg: ModelConfig, dtype: str = "float32") -> dict:
    """Read a checkpoint folder's safetensors and convert them (numpy leaves; put them on devices as you like)."""
    return hf_to_params(read_safetensors(folder), cfg, dtype, source=folder)


def tree_to_numpy(params) -> dict:
    """Device arrays -> numpy (for saving or comparing)."""
    return jax.tree_util.tree_map(np.asarray, params)
