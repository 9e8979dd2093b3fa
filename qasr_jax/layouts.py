"""The two parameter layouts (see ``qasr_jax.model``): stacked, canonical for conversion, Orbax and sharded models,
and per layer, what a one-device ``qasr_jax.Model`` runs on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qasr_jax.config import ModelConfig, TextConfig
from qasr_jax.model import qkv_widths

STACKS = ("audio_tower", "decoder")  # the parameter subtrees whose per-layer parameters sit under "layers"


def unstack_layers(params: dict) -> dict:
    """Stacked layout -> per-layer layout: ``<stack>/layers`` (leading layer axis) becomes ``layers_0``, ... ,
    decoder layers with their q|k|v and gate|up kernels concatenated (see the module doc).

    Host (numpy) arrays stay on the host, as views or concatenations, until the caller converts them. A per-layer
    tree is returned as it is.
    """
    out = dict(params)
    for name in STACKS:
        if name not in out or "layers" not in out[name]:
            continue
        sub = dict(out[name])
        stacked = sub.pop("layers")
        n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
        for i in range(n):
            layer = jax.tree_util.tree_map(lambda x: x[i], stacked)  # noqa: B023
            sub[f"layers_{i}"] = _fuse_projections(layer) if name == "decoder" else layer
        out[name] = sub
    return out


def _fuse_projections(layer: dict) -> dict:
    layer = dict(layer)
    for fused, parts in (("qkv", ("q", "k", "v")), ("gate_up", ("gate", "up"))):
        kernels = [layer.pop(p)["kernel"] for p in parts]
        xp = np if isinstance(kernels[0], np.ndarray) else jnp  # host arrays stay on the host until converted
        layer[fused] = {"kernel": xp.concatenate(kernels, axis=-1)}
    return layer


def stack_layers(params: dict, cfg: ModelConfig) -> dict:
    """Per-layer layout -> stacked layout (the inverse of :func:`unstack_layers`); a stacked tree as it is."""
    out = dict(params)
    for name in STACKS:
        if name not in out or "layers_0" not in out[name]:
            continue
        sub = dict(out[name])
        layers = [sub.pop(f"layers_{i}") for i in range(sum(k.startswith("layers_") for k in out[name]))]
        if name == "decoder":
            layers = [_split_projections(layer, cfg.text) for layer in layers]
        sub["layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
        out[name] = sub
    return out


def _split_projections(layer: dict, cfg: TextConfig) -> dict:
    layer = dict(layer)
    for fused, parts, widths in (("qkv", ("q", "k", "v"), qkv_widths(cfg)),
                                 ("gate_up", ("gate", "up"), (cfg.intermediate_size,) * 2)):
        kernels = jnp.split(layer.pop(fused)["kernel"], np.cumsum(widths)[:-1], axis=-1)
        layer.update({p: {"kernel": k} for p, k in zip(parts, kernels)})
    return layer
