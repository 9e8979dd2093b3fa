"""PyTorch/HF safetensors checkpoints (official and -hf layouts) <-> qasr_jax params, read without torch.

One table (:func:`rules`) says, for every parameter of the model, which checkpoint tensors (by -hf name) it is
made of and how: Linear (out, in) -> kernel (in, out), Conv2d (out, in, kh, kw) -> (kh, kw, in, out), a decoder
layer's q, k and v projections -> one ``qkv`` kernel (hidden, kv_heads, groups + 2, head_dim), gate and up -> one
``gate_up`` kernel (hidden, 2, intermediate). The same table runs both ways: checkpoint -> params when loading,
params (or gradients) -> checkpoint tensors when exporting or comparing with PyTorch, and the expected shape of
every checkpoint tensor is that inverse run on the parameter shapes.

Loading reads the (memory-mapped) files tensor by tensor: each parameter is converted, cast, placed on its
device(s) and its host copy dropped before the next, so the peak stays near the size of the loaded parameters.
Every missing, unexpected and mis-shaped tensor is checked before any is read, and reported together.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping

import jax
import numpy as np
from safetensors import SafetensorError, safe_open

from qasr_jax.modeling.config import ModelConfig
from qasr_jax.modeling.model import param_shapes


class CheckpointError(ValueError):
    """A checkpoint whose files or tensors do not fit the model: names every problem and what to do."""


# Official layout <-> -hf layout, applied to the start of each name.
OFFICIAL_PREFIXES: tuple[tuple[str, str], ...] = (
    ("thinker.audio_tower.proj1.", "model.multi_modal_projector.linear_1."),
    ("thinker.audio_tower.proj2.", "model.multi_modal_projector.linear_2."),
    ("thinker.audio_tower.", "model.audio_tower."),
    ("thinker.model.", "model.language_model."),
    ("thinker.lm_head.", "lm_head."),  # the aligner's class head is renamed to score. below
)
# Buffers some exports carry that are not parameters (recomputed here).
IGNORED_SUFFIXES = ("positional_embedding", "rotary_emb.inv_freq")


def to_hf_name(name: str, cfg: ModelConfig) -> str:
    """Rename an official-layout tensor name to its -hf name (a -hf name comes back unchanged)."""
    for old, new in OFFICIAL_PREFIXES:
        if name.startswith(old):
            name = new + name[len(old):]
            break
    if cfg.is_aligner and name.startswith("lm_head."):
        name = "score." + name[len("lm_head."):]
    return name


def to_official_name(name: str, cfg: ModelConfig) -> str:
    """Rename a -hf tensor name to its official-layout name."""
    if cfg.is_aligner and name.startswith("score."):
        name = "lm_head." + name[len("score."):]
    for old, new in OFFICIAL_PREFIXES:
        if name.startswith(new):
            return old + name[len(new):]
    return name


# ----------------------------------------------------------------------------------------------------------------
# The table


@dataclasses.dataclass(frozen=True)
class Rule:
    """One parameter: its path in the tree, the checkpoint tensors (-hf names) it is made of, and the two maps."""

    path: tuple[str, ...]
    names: tuple[str, ...]
    to_param: Callable  # (checkpoint tensors in ``names`` order) -> parameter
    to_tensors: Callable  # parameter -> tuple of checkpoint tensors


def _one(fn, inverse) -> tuple[Callable, Callable]:
    return (lambda w: fn(w)), (lambda p: (inverse(p),))


_SAME = _one(lambda w: w, lambda p: p)
_LINEAR = _one(lambda w: w.T, lambda p: p.T)
_CONV = _one(lambda w: w.transpose(2, 3, 1, 0), lambda p: p.transpose(3, 2, 0, 1))  # OIHW <-> HWIO


def _qkv(cfg: ModelConfig) -> tuple[Callable, Callable]:
    t = cfg.text
    groups = t.heads // t.kv_heads

    def to_param(q, k, v):  # (heads * head_dim, hidden), (kv_heads * head_dim, hidden) x 2
        q = q.T.reshape(-1, t.kv_heads, groups, t.head_dim)
        k, v = (w.T.reshape(-1, t.kv_heads, 1, t.head_dim) for w in (k, v))
        return _xp(q).concatenate([q, k, v], axis=2)

    def to_tensors(p):  # (hidden, kv_heads, groups + 2, head_dim)
        hidden = p.shape[0]
        return (p[:, :, :groups].reshape(hidden, -1).T, p[:, :, groups].reshape(hidden, -1).T,
                p[:, :, groups + 1].reshape(hidden, -1).T)

    return to_param, to_tensors


def _gate_up() -> tuple[Callable, Callable]:
    return (lambda gate, up: _xp(gate).stack([gate.T, up.T], axis=1)), (lambda p: (p[:, 0].T, p[:, 1].T))


def _xp(x):
    return np if isinstance(x, np.ndarray) else jax.numpy


def rules(cfg: ModelConfig) -> list[Rule]:
    """Every parameter of ``cfg``'s model and the -hf checkpoint tensors it is made of."""
    out: list[Rule] = []

    def add(path: str, names, maps):
        out.append(Rule(tuple(path.split("/")), tuple([names] if isinstance(names, str) else names), *maps))

    a, t = "model.audio_tower.", "model.language_model."
    for n in (1, 2, 3):
        add(f"audio_tower/conv2d{n}/kernel", f"{a}conv2d{n}.weight", _CONV)
        add(f"audio_tower/conv2d{n}/bias", f"{a}conv2d{n}.bias", _SAME)
    add("audio_tower/conv_out/kernel", f"{a}conv_out.weight", _LINEAR)
    for i in range(cfg.audio.layers):
        src, dst = f"{a}layers.{i}.", f"audio_tower/layers_{i}"
        for hf, ours in (("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"), ("self_attn.v_proj", "v"),
                         ("self_attn.out_proj", "o"), ("fc1", "fc1"), ("fc2", "fc2")):
            add(f"{dst}/{ours}/kernel", f"{src}{hf}.weight", _LINEAR)
            add(f"{dst}/{ours}/bias", f"{src}{hf}.bias", _SAME)
        for hf, ours in (("self_attn_layer_norm", "attn_norm"), ("final_layer_norm", "mlp_norm")):
            add(f"{dst}/{ours}/scale", f"{src}{hf}.weight", _SAME)
            add(f"{dst}/{ours}/bias", f"{src}{hf}.bias", _SAME)
    add("audio_tower/ln_post/scale", f"{a}ln_post.weight", _SAME)
    add("audio_tower/ln_post/bias", f"{a}ln_post.bias", _SAME)
    for n in (1, 2):
        add(f"projector/proj{n}/kernel", f"model.multi_modal_projector.linear_{n}.weight", _LINEAR)
        add(f"projector/proj{n}/bias", f"model.multi_modal_projector.linear_{n}.bias", _SAME)
    add("decoder/embed/embedding", f"{t}embed_tokens.weight", _SAME)
    for i in range(cfg.text.layers):
        src, dst = f"{t}layers.{i}.", f"decoder/layers_{i}"
        add(f"{dst}/qkv/kernel", [f"{src}self_attn.{p}_proj.weight" for p in "qkv"], _qkv(cfg))
        add(f"{dst}/o/kernel", f"{src}self_attn.o_proj.weight", _LINEAR)
        add(f"{dst}/gate_up/kernel", [f"{src}mlp.gate_proj.weight", f"{src}mlp.up_proj.weight"], _gate_up())
        add(f"{dst}/down/kernel", f"{src}mlp.down_proj.weight", _LINEAR)
        for hf, ours in (("self_attn.q_norm", "q_norm"), ("self_attn.k_norm", "k_norm"),
                         ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm")):
            add(f"{dst}/{ours}/scale", f"{src}{hf}.weight", _SAME)
    add("decoder/norm/scale", f"{t}norm.weight", _SAME)
    if cfg.is_aligner:
        add("score/kernel", "score.weight", _LINEAR)
    elif not cfg.text.tie_word_embeddings:
        add("lm_head/kernel", "lm_head.weight", _LINEAR)
    return out


def _get(tree: Mapping, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def params_to_hf(params: Mapping, cfg: ModelConfig) -> dict:
    """A parameter tree (or gradients, or shapes) -> {-hf checkpoint name: tensor in the checkpoint's shape}."""
    out = {}
    for rule in rules(cfg):
        out.update(zip(rule.names, rule.to_tensors(_get(params, rule.path))))
    return out


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{-hf name: shape} of every tensor a checkpoint for ``cfg`` must hold."""
    shapes = jax.eval_shape(lambda p: params_to_hf(p, cfg), param_shapes(cfg))
    return {name: tuple(s.shape) for name, s in shapes.items()}


# ----------------------------------------------------------------------------------------------------------------
# Files


def safetensors_files(folder: str) -> list[str]:
    """The safetensors files of a checkpoint folder: single file, or the shards listed in the index."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise CheckpointError(f"{folder}: shards listed in model.safetensors.index.json are missing: {missing}; "
                                  "download the checkpoint again")
        return [os.path.join(folder, s) for s in shards]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors file found; pass a Qwen3-ASR checkpoint folder")
    return [os.path.join(folder, f) for f in files]


class _Reader:
    """The tensors of a checkpoint's files, each read on demand from its memory-mapped file."""

    def __init__(self, folder: str):
        self.where: dict[str, str] = {}  # tensor name -> file
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in safetensors_files(folder):
            with self._open(file) as f:
                for key in f.keys():
                    self.where[key] = file
                    self.shapes[key] = tuple(f.get_slice(key).get_shape())

    @staticmethod
    def _open(file: str):
        try:
            return safe_open(file, framework="np")
        except (SafetensorError, OSError) as e:
            size = os.path.getsize(file) if os.path.exists(file) else 0
            raise CheckpointError(
                f"{file}: cannot read this safetensors file ({size} bytes; {e}): it is truncated or corrupt. "
                "Download the checkpoint again (or re-run the conversion that wrote it)"
            ) from None

    def read(self, name: str) -> np.ndarray:
        file = self.where[name]
        try:
            with self._open(file) as f:
                return f.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{file}: tensor {name} cannot be read ({e}): the file is truncated or corrupt. "
                                  "Download the checkpoint again") from None


def read_safetensors(folder: str) -> dict[str, np.ndarray]:
    """Every tensor of a (possibly sharded) checkpoint as numpy arrays (bf16 stays bf16 via ml_dtypes)."""
    reader = _Reader(folder)
    return {name: reader.read(name) for name in reader.where}


def _check(names_on_disk: Mapping[str, tuple[int, ...]], cfg: ModelConfig, source: str) -> dict[str, str]:
    """Compare a checkpoint's tensor names and shapes with what ``cfg`` needs; returns {-hf name: name on disk}."""
    official = any(n.startswith("thinker.") for n in names_on_disk)
    expected = expected_tensors(cfg)
    on_disk: dict[str, str] = {}
    unexpected, problems = [], []
    for name, shape in names_on_disk.items():
        if name.endswith(IGNORED_SUFFIXES):
            continue
        hf = to_hf_name(name, cfg)
        if hf == "lm_head.weight" and not cfg.is_aligner and cfg.text.tie_word_embeddings:
            continue  # tied: some exports also save the head; the embedding is the head
        if hf not in expected:
            unexpected.append(name)
            continue
        on_disk[hf] = name
        if shape != expected[hf]:
            problems.append(f"{name}: shape {shape}, expected {expected[hf]}")
    missing = [to_official_name(n, cfg) if official else n for n in expected if n not in on_disk]
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): " + ", ".join(missing))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): " + ", ".join(sorted(unexpected)))
    if problems:
        raise CheckpointError(
            f"checkpoint {source} does not fit its config.json ({'aligner' if cfg.is_aligner else 'ASR'}, "
            f"{cfg.audio.layers} encoder and {cfg.text.layers} decoder layers):\n  - " + "\n  - ".join(problems)
            + "\nCheck that config.json belongs to these weights, or download the checkpoint again."
        )
    return on_disk


def _host_leaf(value: np.ndarray, dtype) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(value).astype(dtype, copy=False))


def load_hf_params(folder: str, cfg: ModelConfig, dtype: str = "float32",
                   place: Callable[[tuple[str, ...], np.ndarray], object] | None = None) -> dict:
    """Read a checkpoint folder's safetensors into the parameter tree, one parameter at a time.

    ``place(path, host_array)`` puts each converted parameter where it should live (default: left as numpy) and
    the host copy is dropped before the next, so a device-placing ``place`` keeps the peak near the params' size.
    """
    reader = _Reader(folder)
    on_disk = _check(reader.shapes, cfg, folder)
    target = np.dtype(jax.numpy.dtype(dtype))
    params: dict = {}
    for rule in rules(cfg):
        value = _host_leaf(rule.to_param(*(reader.read(on_disk[n]) for n in rule.names)), target)
        _set(params, rule.path, value if place is None else place(rule.path, value))
        del value
    return params


def tree_to_numpy(params) -> dict:
    """Device arrays -> numpy (for saving or comparing)."""
    return jax.tree_util.tree_map(np.asarray, params)
