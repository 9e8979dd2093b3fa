"""Logical axis names and where they land on a mesh: the leaf that the model and the mesh code both read.

The model annotates its parameters (``qasr_jax.modeling.sharding.PARAM_AXES``) and main activations with logical names
("batch", "heads", "embed", ...). A :class:`Layout` (a mesh plus rules mapping logical names onto its ``data`` and
``model`` axes) is passed to the model explicitly, as a module attribute; without one every annotation is a no-op.
This module imports nothing of the model, so the model never depends on the mesh code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "model")

# Logical axes of the main activations.
AUDIO_ACT = ("batch", "length", "audio_embed")
AUDIO_QKV = ("batch", "length", "audio_heads", None)
AUDIO_MLP = ("batch", "length", "audio_mlp")
ACT = ("batch", "length", "embed")
MLP = ("batch", "length", "mlp")
QUERY = ("batch", "length", "kv_heads", None, None)  # queries grouped by the kv head they share
KV = ("batch", "kv_heads", "length", None)  # a layer's keys or values, as cached: (batch, kv_heads, keys, head_dim)

Rules = tuple[tuple[str, Any], ...]  # (logical name, mesh axis | tuple of mesh axes | None)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh plus the rules that map logical axis names onto it; hashable, so a jit or module can hold it."""

    mesh: Mesh
    rules: Rules

    @property
    def data_size(self) -> int:
        """Devices along ``data``: batches are padded to a multiple of this."""
        return self.mesh.shape["data"]

    def mesh_axes(self, name: str | None) -> tuple[str, ...]:
        """The mesh axes a logical name maps to under these rules (empty: not split)."""
        for logical, target in self.rules:
            if logical == name:
                return () if target is None else (target,) if isinstance(target, str) else tuple(target)
        return ()

    def spec(self, axes: Sequence[str | None], shape: Sequence[int] | None = None,
             units: Mapping[str, int] | None = None) -> PartitionSpec:
        """PartitionSpec for logical ``axes``: a dim is split only if its unit count (``units[name]``, else its
        size in ``shape``; unknown: assumed to divide) divides by its mesh axes; size-1 and used axes are skipped."""
        used: set[str] = set()
        out = []
        for i, name in enumerate(axes):
            targets = tuple(a for a in self.mesh_axes(name) if a not in used and self.mesh.shape[a] > 1)
            count = (units or {}).get(name, None if shape is None else shape[i])
            if targets and count is not None and count % math.prod(self.mesh.shape[a] for a in targets):
                targets = ()
            used.update(targets)
            out.append(None if not targets else targets[0] if len(targets) == 1 else targets)
        return PartitionSpec(*out)

    def sharding(self, axes: Sequence[str | None], shape: Sequence[int] | None = None,
                 units: Mapping[str, int] | None = None) -> NamedSharding:
        """NamedSharding on this mesh for logical ``axes`` (see ``spec``)."""
        return NamedSharding(self.mesh, self.spec(axes, shape, units))

    def batch_sharding(self, ndim: int) -> NamedSharding:
        """Leading axis split over ``data``, the rest whole: inputs and outputs of the batched programs."""
        return self.sharding(("batch",) + (None,) * (ndim - 1))


def cache_axes(row_axis: int, ndim: int) -> tuple[str | None, ...]:
    """The logical axes of a KV cache leaf of ``ndim`` dims with its rows on ``row_axis`` (``KVCache.row_axes``):
    a stacked buffer's layers, then :data:`KV`'s from the rows on (the lengths: the rows only)."""
    return ("layers",) * row_axis + KV[: ndim - row_axis]


def constrain(x: jax.Array, axes: Sequence[str | None], layout: Layout | None) -> jax.Array:
    """``x`` with its sharding pinned to logical ``axes`` under ``layout``; ``x`` itself without one."""
    if layout is None:
        return x
    return jax.lax.with_sharding_constraint(x, layout.sharding(axes, x.shape))


def per_row_and_head(fn: Callable, q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                     layout: Layout | None) -> jax.Array:
    """``fn(q, k, v, lengths)`` for attention independent per batch row and head, (batch, seq, heads, head_dim):
    under a layout each device runs it on its own rows and heads (``shard_map``), so a Pallas kernel, which XLA
    cannot partition, runs sharded; without one, a plain call."""
    if layout is None:
        return fn(q, k, v, lengths)
    spec = layout.spec(AUDIO_QKV, q.shape)
    return jax.shard_map(fn, mesh=layout.mesh, in_specs=(spec, spec, spec, PartitionSpec(spec[0])),
                         out_specs=spec, check_vma=False)(q, k, v, lengths)
