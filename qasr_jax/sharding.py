"""Scale-out: one jitted program over a ``jax.sharding.Mesh`` with ``data`` and ``model`` axes.

Every parameter gets logical axis names from one regex table on its path (:data:`PARAM_AXES`; layers are stacked
on a leading ``layers`` axis), and the main activations get them in the model (``constrain`` calls in model.py).
One rules table per preset maps logical names onto mesh axes (:data:`PRESETS`):

* ``"data"``: data parallel. Parameters replicated, the batch split over ``data``.
* ``"tensor"``: tensor parallel as well. Attention heads, KV heads, MLP, vocabulary and aligner classes split over
  ``model`` (for chips too small for the 1.7B in float32); the batch over ``data``.
* ``"fsdp"``: fully sharded. As ``"tensor"``, and the embedding width of every weight also split over ``data``
  (for fine-tuning; inference gathers each weight where it is used).

A dimension is split only when its size (for fused head dims: the head count) divides by the mesh axes it maps to;
otherwise it stays whole. Parameters are created shard by shard from host numpy arrays
(``jax.make_array_from_callback``), so no device ever holds more than its own shards.

Many hosts: each process builds its mesh from its own local devices and transcribes its own share of the inputs
(:func:`host_share`), so hosts never wait on each other; :func:`initialize_distributed` joins the cluster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "model")

# Parameter path ("/"-joined Flax keys) -> logical axis names, one per dimension; the first full match wins.
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"audio_tower/conv2d\d/kernel", (None, None, None, "conv")),  # (3, 3, in, out)
    (r"audio_tower/conv2d\d/bias", ("conv",)),
    (r"audio_tower/conv_out/kernel", ("conv_flat", "audio_embed")),  # (channels * freq, d_model)
    (r"audio_tower/layers/[qkv]/kernel", ("layers", "audio_embed", "audio_heads")),
    (r"audio_tower/layers/[qkv]/bias", ("layers", "audio_heads")),
    (r"audio_tower/layers/o/kernel", ("layers", "audio_heads", "audio_embed")),
    (r"audio_tower/layers/fc1/kernel", ("layers", "audio_embed", "audio_mlp")),
    (r"audio_tower/layers/fc1/bias", ("layers", "audio_mlp")),
    (r"audio_tower/layers/fc2/kernel", ("layers", "audio_mlp", "audio_embed")),
    (r"audio_tower/layers/(o|fc2)/bias", ("layers", "audio_embed")),
    (r"audio_tower/layers/(attn|mlp)_norm/(scale|bias)", ("layers", "audio_embed")),
    (r"audio_tower/ln_post/(scale|bias)", ("audio_embed",)),
    (r"projector/proj1/kernel", ("audio_embed", "audio_mlp")),
    (r"projector/proj1/bias", ("audio_mlp",)),
    (r"projector/proj2/kernel", ("audio_mlp", "embed")),
    (r"projector/proj2/bias", ("embed",)),
    (r"decoder/embed/embedding", ("vocab", "embed")),
    (r"decoder/layers/q/kernel", ("layers", "embed", "heads")),  # (layers, hidden, heads * head_dim)
    (r"decoder/layers/[kv]/kernel", ("layers", "embed", "kv_heads")),
    (r"decoder/layers/o/kernel", ("layers", "heads", "embed")),
    (r"decoder/layers/(gate|up)/kernel", ("layers", "embed", "mlp")),
    (r"decoder/layers/down/kernel", ("layers", "mlp", "embed")),
    (r"decoder/layers/[qk]_norm/scale", ("layers", "head_dim")),
    (r"decoder/layers/(attn|mlp)_norm/scale", ("layers", "embed")),
    (r"decoder/norm/scale", ("embed",)),
    (r"lm_head/kernel", ("embed", "vocab")),
    (r"score/kernel", ("embed", "classes")),
)
_PARAM_AXES = tuple((re.compile(p), axes) for p, axes in PARAM_AXES)

# Logical axes of the KV cache leaves (model.KVCache): (layers, batch, kv_heads, slots, head_dim), valid, end.
CACHE_AXES = {"k": ("layers", "batch", "kv_heads", "length", "head_dim"),
              "v": ("layers", "batch", "kv_heads", "length", "head_dim"),
              "valid": ("batch", "length"), "end": ()}

Rules = tuple[tuple[str, Any], ...]  # (logical name, mesh axis | tuple of mesh axes | None)

_DATA: Rules = (("batch", "data"),)
_TENSOR: Rules = _DATA + tuple(
    (name, "model") for name in ("heads", "kv_heads", "mlp", "vocab", "classes", "audio_heads", "audio_mlp")
)
PRESETS: dict[str, Rules] = {
    "data": _DATA,
    "tensor": _TENSOR,
    "fsdp": _TENSOR + (("embed", "data"), ("audio_embed", "data")),
}


# ----------------------------------------------------------------------------------------------------------------
# Meshes and layouts
# ----------------------------------------------------------------------------------------------------------------


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """"data=4,model=2" -> {"data": 4, "model": 2}; one size may be -1 (the rest of the devices)."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES or name in sizes:
            raise ValueError(f"mesh {spec!r}: write it as 'data=N,model=M' (axes {MESH_AXES}, each once)")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"mesh {spec!r}: the size of {name!r} is not an integer: {value!r}") from None
        if sizes[name] == 0 or sizes[name] < -1:
            raise ValueError(f"mesh {spec!r}: axis sizes are positive (or -1 for the remaining devices)")
    if not sizes:
        raise ValueError(f"mesh {spec!r} is empty; write it as 'data=N,model=M'")
    return sizes


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """A ("data", "model") mesh over this process's devices: None puts them all on data; "data=4,model=2" uses
    the first 8."""
    devices = list(jax.local_devices() if devices is None else devices)
    sizes = dict(parse_mesh_spec(spec) if isinstance(spec, str) else (spec or {}))
    if not set(sizes) <= set(MESH_AXES):
        raise ValueError(f"mesh axes must be {MESH_AXES}, got {sorted(sizes)}")
    sizes.setdefault("model", 1)
    sizes.setdefault("data", -1)  # the devices the model axis leaves
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(f"mesh {spec!r}: only one axis may be -1")
    known = math.prod(v for v in sizes.values() if v != -1)
    for name, v in sizes.items():
        if v == -1:
            if len(devices) % known:
                raise ValueError(f"mesh {spec!r}: {len(devices)} devices do not divide into axes of size {known}")
            sizes[name] = len(devices) // known
    n = sizes["data"] * sizes["model"]
    if n > len(devices):
        raise ValueError(f"mesh {spec!r} needs {n} devices but this process has {len(devices)}: {devices}")
    shape, auto = (sizes["data"], sizes["model"]), (AxisType.Auto,) * 2
    try:  # topology-aware device order (TPU torus, GPU NVLink islands)
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices[:n])
    except (ValueError, NotImplementedError, AssertionError):  # a subset the topology helper cannot lay out
        return Mesh(np.array(devices[:n], dtype=object).reshape(shape), MESH_AXES, axis_types=auto)


def _as_auto_mesh(mesh: Mesh) -> Mesh:
    """A user's Mesh with exactly the ("data", "model") axes (a missing one added with size 1), in Auto mode."""
    names = tuple(mesh.axis_names)
    if not set(names) <= set(MESH_AXES):
        raise ValueError(f"mesh axes must be 'data' and/or 'model', got {names}")
    devices = np.asarray(mesh.devices)
    if "data" not in names:
        devices, names = devices[None], ("data",) + names
    if "model" not in names:
        devices, names = devices[..., None], names + ("model",)
    if names != MESH_AXES:
        devices = devices.T
    if any(d.process_index != jax.process_index() for d in devices.flat):
        raise ValueError(
            "the mesh holds devices of other processes; each process transcribes its own share of the inputs on "
            "its own devices: build the mesh from jax.local_devices() (qasr_jax.sharding.make_mesh does)"
        )
    return Mesh(devices, MESH_AXES, axis_types=(AxisType.Auto,) * 2)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh plus the rules that map logical axis names onto it; hashable, so a jit can take it as static."""

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


def make_layout(mesh: Mesh | str | Layout | None = None, rules: str | Rules | None = None) -> Layout:
    """A Layout from a Mesh or "data=4,model=2" (None: all local devices on data) and a preset name or rules
    (None: "tensor" when the model axis has more than one device, else "data")."""
    if isinstance(mesh, Layout):
        if rules is not None:
            raise ValueError("pass either a Layout or a mesh with rules, not both")
        return mesh
    mesh = _as_auto_mesh(mesh) if isinstance(mesh, Mesh) else make_mesh(mesh)
    if rules is None:
        rules = "tensor" if mesh.shape["model"] > 1 else "data"
    if isinstance(rules, str):
        if rules not in PRESETS:
            raise ValueError(f"unknown sharding preset {rules!r}; choose one of {sorted(PRESETS)}")
        rules = PRESETS[rules]
    rules = tuple((str(k), v if v is None or isinstance(v, str) else tuple(v)) for k, v in rules)
    for _, target in rules:
        if any(t not in MESH_AXES for t in ((target,) if isinstance(target, str) else target or ())):
            raise ValueError(f"sharding rules map onto mesh axes {MESH_AXES}, got {target!r}")
    return Layout(mesh, rules)


# ----------------------------------------------------------------------------------------------------------------
# Activations: constraints inside the model, active only while a Layout is (model.Qwen3ASRModule.layout)
# ----------------------------------------------------------------------------------------------------------------

_active = threading.local()


@contextlib.contextmanager
def use_layout(layout: Layout | None):
    """Within this block (while tracing), ``constrain`` pins activations to ``layout``; None turns it off."""
    before = getattr(_active, "layout", None)
    _active.layout = layout
    try:
        yield layout
    finally:
        _active.layout = before


def current_layout() -> Layout | None:
    """The Layout of the innermost ``use_layout`` block, or None."""
    return getattr(_active, "layout", None)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``x`` with its sharding pinned to logical ``axes`` under the active Layout; ``x`` itself without one."""
    layout = current_layout()
    if layout is None:
        return x
    return jax.lax.with_sharding_constraint(x, layout.sharding(axes, x.shape))


def per_row_and_head(fn: Callable, q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array) -> jax.Array:
    """``fn(q, k, v, lengths)`` for attention independent per batch row and head, (batch, seq, heads, head_dim):
    under a Layout each device runs it on its own rows and heads (``shard_map``), so a Pallas kernel, which XLA
    cannot partition, runs sharded; without one, a plain call."""
    layout = current_layout()
    if layout is None:
        return fn(q, k, v, lengths)
    spec = layout.spec(("batch", "length", "audio_heads", None), q.shape)
    return jax.shard_map(fn, mesh=layout.mesh, in_specs=(spec, spec, spec, PartitionSpec(spec[0])),
                         out_specs=spec, check_vma=False)(q, k, v, lengths)


# ----------------------------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------------------------


def param_path(path) -> str:
    """A tree path from ``jax.tree_util`` as "decoder/layers/q/kernel"."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """The logical axis names of the parameter at ``path`` (from PARAM_AXES); an unknown path is an error."""
    for pattern, axes in _PARAM_AXES:
        if pattern.fullmatch(path):
            if len(axes) != ndim:
                raise ValueError(f"parameter {path}: PARAM_AXES gives {len(axes)} axes {axes} for {ndim} dims")
            return axes
    raise ValueError(f"parameter {path} matches no entry of qasr_jax.sharding.PARAM_AXES; add one")


def head_units(cfg) -> dict[str, int]:
    """Fused head dims split by whole heads: logical name -> head count."""
    return {"heads": cfg.text.heads, "kv_heads": cfg.text.kv_heads, "audio_heads": cfg.audio.heads}


def param_specs(shapes, layout: Layout, cfg) -> Any:
    """The PartitionSpec of every parameter (same tree as ``shapes``: arrays or ShapeDtypeStructs)."""
    units = head_units(cfg)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: layout.spec(logical_axes(param_path(p), len(x.shape)), x.shape, units), shapes
    )


def param_shardings(shapes, layout: Layout, cfg) -> Any:
    """The NamedSharding of every parameter (same tree as ``shapes``)."""
    return jax.tree_util.tree_map(lambda spec: NamedSharding(layout.mesh, spec), param_specs(shapes, layout, cfg),
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))


def cache_shardings(layout: Layout, cfg):
    """The KVCache's shardings: batch over data, KV heads over model where they divide."""
    from qasr_jax.model import KVCache

    units = {"kv_heads": cfg.text.kv_heads}
    return KVCache(**{name: layout.sharding(axes, None, units) for name, axes in CACHE_AXES.items()})


def _host_shard(host: np.ndarray, index, dtype) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(host[index]).astype(dtype, copy=False))


def place_params(params, layout: Layout, cfg, dtype: str) -> Any:
    """Put a parameter tree (host numpy or jax arrays) onto the mesh, each device receiving only its own shards
    (``jax.make_array_from_callback`` on host slices, cast to ``dtype`` on the host)."""
    target = jnp_dtype(dtype)
    shardings = param_shardings(params, layout, cfg)

    def put(x, sharding):
        if isinstance(x, jax.Array) and x.dtype == target and x.sharding == sharding:
            return x  # already in place (e.g. restored by Orbax into these shardings)
        host = np.asarray(x)  # a jax.Array gathers to the host first: never to one device
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: _host_shard(host, idx, target))

    return jax.tree_util.tree_map(put, params, shardings)


def jnp_dtype(dtype) -> np.dtype:
    """"float32" / "bfloat16" -> numpy dtype (bfloat16 via ml_dtypes, as jax uses)."""
    return np.dtype(jax.numpy.dtype(dtype))


def describe(params) -> list[str]:
    """One line per parameter: path, shape, logical axes and PartitionSpec (for printing a sharded model)."""
    lines = []
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = param_path(path)
        spec = getattr(getattr(x, "sharding", None), "spec", None)
        lines.append(f"{name:40s} {str(tuple(x.shape)):22s} {str(logical_axes(name, x.ndim)):44s} {spec}")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Batched programs with explicit in/out shardings
# ----------------------------------------------------------------------------------------------------------------


def check_rows(rows: int, layout: Layout) -> None:
    """Raise if ``rows`` batch rows do not divide over the layout's data axis."""
    if rows % layout.data_size:
        raise ValueError(
            f"a batch of {rows} rows does not divide over the mesh's data axis ({layout.data_size} devices); "
            "pad it to a multiple (Transcriber does this itself)"
        )


def put_batch(x, layout: Layout | None):
    """A host or device batch (leading axis = rows) placed with rows over ``data`` (jnp.asarray without a layout)."""
    if layout is None:
        return jax.numpy.asarray(x)
    check_rows(np.shape(x)[0], layout)
    return jax.device_put(x, layout.batch_sharding(np.ndim(x)))


def batch_programs(module, layout: Layout, params_sharding, cfg) -> dict[str, Callable]:
    """The encoder, embedding, prefill and one-step programs of ``module``, jitted with explicit in/out shardings:
    params as placed, batch rows over data, the KV cache as ``cache_shardings``, logits with the vocabulary over
    model where the rules say so. Each takes ``{"params": params}`` first, like ``module.apply``."""
    from qasr_jax.compiles import jit_with_encoder
    from qasr_jax.model import KVCache, Qwen3ASRModule

    variables = {"params": params_sharding}
    cache = cache_shardings(layout, cfg)
    b1, b2, b3 = (layout.batch_sharding(n) for n in (1, 2, 3))
    width = cfg.num_labels if cfg.is_aligner else cfg.text.vocab_size
    logits = layout.sharding(("batch", "classes" if cfg.is_aligner else "vocab"), None,
                             {"classes": width, "vocab": width})

    def encode(v, feats, n_frames):
        return module.apply(v, feats, n_frames, method=Qwen3ASRModule.encode)

    def embed(v, input_ids, audio_embeds):
        return module.apply(v, input_ids, audio_embeds, method=Qwen3ASRModule.embed)

    def prefill(v, embeds, token_mask, kv_cache):
        return module.apply(v, embeds, token_mask, kv_cache, method=Qwen3ASRModule.prefill)

    def step(v, tokens, kv_cache):
        return module.apply(v, tokens, kv_cache, method=Qwen3ASRModule.step)

    return {
        "encode": jit_with_encoder(encode, in_shardings=(variables, b3, b1), out_shardings=(b3, b1)),
        "embed": jax.jit(embed, in_shardings=(variables, b2, b3), out_shardings=b3),
        "prefill": jax.jit(prefill, in_shardings=(variables, b3, b2, cache), out_shardings=(logits, cache)),
        "step": jax.jit(step, in_shardings=(variables, b1, cache), out_shardings=(logits, cache), donate_argnums=2),
        "init_cache": jax.jit(lambda batch, max_len: KVCache.init(cfg.text, batch, max_len, module.dtype),
                              static_argnums=(0, 1), out_shardings=cache),
    }


# ----------------------------------------------------------------------------------------------------------------
# Many hosts
# ----------------------------------------------------------------------------------------------------------------


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> tuple[int, int]:
    """Join a multi-host cluster (``jax.distributed.initialize``; on TPU pods and SLURM the arguments are found
    automatically) -> (this process's index, process count). Call it before anything else touches a device."""
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return jax.process_index(), jax.process_count()


def host_share(items: Sequence, index: int | None = None, count: int | None = None) -> list:
    """This process's share of an input list: every ``count``-th item from ``index`` (defaults: jax's process
    index and count), so shares are disjoint, cover the list and hold similar mixes of lengths."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    if not 0 <= index < count:
        raise ValueError(f"process index {index} is outside 0..{count - 1}")
    return list(items)[index::count]
