"""What trains: frozen parts, LoRA adapters through qwix, and base weights trained whole beside the adapters.

A run trains the whole tree, the tree less its frozen parts (``FREEZABLE``), or LoRA adapters on the projections
of ``LORA_MODULES`` (qwix intercepts the engine's module; :func:`merge_lora` folds them into the weights for
export), with the parts of ``LORA_ALSO`` trained whole beside them. Adapters alone cannot make a model say a token
it never said: with tied embeddings the token table is also the output head, and a word made of pieces the model
was never trained to emit needs their rows to move (PEFT's ``modules_to_save`` for the same reason).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from qasr_jax.modeling.sharding import param_path

# What --freeze names: parameter path prefixes.
FREEZABLE = {"encoder": ("audio_tower",), "projector": ("projector",), "decoder": ("decoder", "lm_head")}
# What --lora-targets names: module paths (regex, full match) whose projections get adapters.
LORA_MODULES = {"decoder": r"decoder/layers_\d+/(qkv|o|gate_up|down)",
                "encoder": r"audio_tower/layers_\d+/(q|k|v|o|fc1|fc2)"}
LORA_SUFFIXES = ("_lora_a", "_lora_b")
# What --lora-also names: parameter path prefixes trained whole beside the adapters.
LORA_ALSO = {"embeddings": ("decoder/embed", "lm_head"), "projector": ("projector",)}


# ----------------------------------------------------------------------------------------------------------------
# Trees


def split_params(params: Mapping, keep: Callable[[str], bool]) -> tuple[dict, dict]:
    """(leaves whose "/"-joined path ``keep`` accepts, the others), both nested as ``params`` is."""
    kept: dict = {}
    rest: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [str(getattr(k, "key", k)) for k in path]
        tree = kept if keep("/".join(keys)) else rest
        for k in keys[:-1]:
            tree = tree.setdefault(k, {})
        tree[keys[-1]] = leaf
    return kept, rest


def merge_trees(a: Mapping, b: Mapping) -> dict:
    """The union of two nested dicts with disjoint leaves."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_trees(out[k], v) if k in out and isinstance(v, Mapping) else v
    return out


# ----------------------------------------------------------------------------------------------------------------
# LoRA through qwix


def lora_provider(config):
    """The qwix LoraProvider for a ``TrainConfig``: rank, alpha and the module paths of ``lora_targets``."""
    import qwix

    pattern = "|".join(f"(?:{LORA_MODULES[t]})" for t in config.lora_targets)
    return qwix.LoraProvider(module_path=pattern, rank=config.lora_rank, alpha=config.alpha)


def lora_transform(provider) -> Callable:
    """Module -> the same module with qwix's LoRA intercepting the projections of ``encode`` and ``decode``."""
    import qwix

    return lambda module: qwix.apply_lora_to_model(module, provider, methods=("encode", "decode"))


def init_lora(engine, provider, key: jax.Array) -> dict:
    """Fresh adapters for an engine running a qwix-wrapped module: shapes from qwix (traced, nothing computed), A
    drawn with the rule's initializer (he-uniform), B zeros, so the adapted model starts as the base model."""
    shapes = engine.declared_params()
    adapters, _ = split_params(shapes, lambda p: p.endswith(LORA_SUFFIXES))
    if not adapters:
        raise ValueError("LoRA matched no projection; check lora_targets")
    rule = provider._rules[0]  # the one rule lora_provider makes
    leaves, tree = jax.tree_util.tree_flatten_with_path(adapters)
    keys = jax.random.split(key, len(leaves))
    values = [rule.lora_a_initializer(k, s.shape, jnp.float32) if param_path(p).endswith("_lora_a")
              else rule.lora_b_initializer(k, s.shape, jnp.float32) for k, (p, s) in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(tree, values)


def merge_lora(params: Mapping, adapters: Mapping, rank: int, alpha: float) -> dict:
    """Base params with every adapter folded in: kernel + (A @ B).reshape(kernel.shape) * alpha / rank."""
    scale = alpha / rank

    def merge(base: Mapping, node: Mapping) -> dict:
        out = dict(base)
        for name, value in node.items():
            if isinstance(value, Mapping):
                out[name] = merge(base[name], value)
            elif name.endswith("_lora_a"):
                weight = name[: -len("_lora_a")]
                kernel = base[weight]
                delta = (value @ node[weight + "_lora_b"]).reshape(kernel.shape) * scale
                out[weight] = (kernel + delta).astype(kernel.dtype)
        return out

    return merge(params, adapters)
