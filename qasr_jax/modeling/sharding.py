"""Scale-out: one jitted program over a ``jax.sharding.Mesh`` with ``data`` and ``model`` axes.

Every parameter gets logical axis names from one regex table on its path (:data:`PARAM_AXES`), the main
activations get them in the model (``qasr_jax.modeling.axes``), and one rules table per preset maps logical names onto
mesh axes (:data:`PRESETS`). The parameter tree is the same with and without a mesh:

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

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from qasr_jax.modeling.axes import MESH_AXES, Layout, Rules, cache_axes
from qasr_jax.modeling.model import KVCache

# Parameter path ("/"-joined Flax keys) -> logical axis names, one per dimension; the first full match wins.
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"audio_tower/conv2d\d/kernel", (None, None, None, "conv")),  # (3, 3, in, out)
    (r"audio_tower/conv2d\d/bias", ("conv",)),
    (r"audio_tower/conv_out/kernel", ("conv_flat", "audio_embed")),  # (channels * freq, d_model)
    (r"audio_tower/layers_\d+/[qkv]/kernel", ("audio_embed", "audio_heads")),
    (r"audio_tower/layers_\d+/[qkv]/bias", ("audio_heads",)),
    (r"audio_tower/layers_\d+/o/kernel", ("audio_heads", "audio_embed")),
    (r"audio_tower/layers_\d+/fc1/kernel", ("audio_embed", "audio_mlp")),
    (r"audio_tower/layers_\d+/fc1/bias", ("audio_mlp",)),
    (r"audio_tower/layers_\d+/fc2/kernel", ("audio_mlp", "audio_embed")),
    (r"audio_tower/layers_\d+/(o|fc2)/bias", ("audio_embed",)),
    (r"audio_tower/layers_\d+/(attn|mlp)_norm/(scale|bias)", ("audio_embed",)),
    (r"audio_tower/ln_post/(scale|bias)", ("audio_embed",)),
    (r"projector/proj1/kernel", ("audio_embed", "audio_mlp")),
    (r"projector/proj1/bias", ("audio_mlp",)),
    (r"projector/proj2/kernel", ("audio_mlp", "embed")),
    (r"projector/proj2/bias", ("embed",)),
    (r"decoder/embed/embedding", ("vocab", "embed")),
    (r"decoder/layers_\d+/qkv/kernel", ("embed", "kv_heads", None, "head_dim")),  # (hidden, kv, groups + 2, hd)
    (r"decoder/layers_\d+/o/kernel", ("heads", "embed")),  # (heads * head_dim, hidden)
    (r"decoder/layers_\d+/gate_up/kernel", ("embed", None, "mlp")),  # (hidden, 2, intermediate)
    (r"decoder/layers_\d+/down/kernel", ("mlp", "embed")),
    (r"decoder/layers_\d+/[qk]_norm/scale", ("head_dim",)),
    (r"decoder/layers_\d+/(attn|mlp)_norm/scale", ("embed",)),
    (r"decoder/norm/scale", ("embed",)),
    (r"lm_head/kernel", ("embed", "vocab")),
    (r"score/kernel", ("embed", "classes")),
)
_PARAM_AXES = tuple((re.compile(p), axes) for p, axes in PARAM_AXES)


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
            "its own devices: build the mesh from jax.local_devices() (qasr_jax.modeling.sharding.make_mesh does)"
        )
    return Mesh(devices, MESH_AXES, axis_types=(AxisType.Auto,) * 2)


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
# Parameters
# ----------------------------------------------------------------------------------------------------------------


def param_path(path) -> str:
    """A tree path from ``jax.tree_util`` as "decoder/layers_0/qkv/kernel"."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """The logical axis names of the parameter at ``path`` (from PARAM_AXES); an unknown path is an error."""
    for pattern, axes in _PARAM_AXES:
        if pattern.fullmatch(path):
            if len(axes) != ndim:
                raise ValueError(f"parameter {path}: PARAM_AXES gives {len(axes)} axes {axes} for {ndim} dims")
            return axes
    raise ValueError(f"parameter {path} matches no entry of qasr_jax.modeling.sharding.PARAM_AXES; add one")


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


def cache_shardings(layout: Layout, cfg, stacked: bool) -> KVCache:
    """The shardings of a ``KVCache.init(..., stacked=stacked)``: slots over data, KV heads over model where they
    divide (a stacked buffer's layers whole)."""
    units = {"kv_heads": cfg.text.kv_heads}
    shapes = jax.eval_shape(lambda: KVCache.init(cfg.text, 1, 1, stacked=stacked))  # the tree and ranks only
    return jax.tree_util.tree_map(lambda axis, x: layout.sharding(cache_axes(axis, x.ndim), None, units),
                                  shapes.row_axes(), shapes)


def _host_shard(host: np.ndarray, index, dtype) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(host[index]).astype(dtype, copy=False))


def place_leaf(x, sharding: NamedSharding, dtype) -> jax.Array:
    """One parameter (host numpy or jax array) onto the mesh, each device receiving only its own shards."""
    target = jnp_dtype(dtype)
    if isinstance(x, jax.Array) and x.dtype == target and x.sharding == sharding:
        return x  # already in place (e.g. restored by Orbax into these shardings)
    host = np.asarray(x)  # a jax.Array gathers to the host first: never to one device
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: _host_shard(host, idx, target))


def place_params(params, layout: Layout, cfg, dtype: str) -> Any:
    """Put a parameter tree (host numpy or jax arrays) onto the mesh, shard by shard, cast to ``dtype``."""
    return jax.tree_util.tree_map(lambda x, sh: place_leaf(x, sh, dtype), params,
                                  param_shardings(params, layout, cfg))


def jnp_dtype(dtype) -> np.dtype:
    """"float32" / "bfloat16" -> numpy dtype (bfloat16 via ml_dtypes, as jax uses)."""
    return np.dtype(jax.numpy.dtype(dtype))


def describe(params) -> list[str]:
    """One line per parameter, returned as a list: path, shape, logical axes and PartitionSpec (None: not on a
    mesh); ``print("\\n".join(describe(model.params)))`` shows the layout, on one device or a mesh."""
    lines = []
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = param_path(path)
        spec = getattr(getattr(x, "sharding", None), "spec", None)
        lines.append(f"{name:40s} {str(tuple(x.shape)):22s} {str(logical_axes(name, x.ndim)):44s} {spec}")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------------


def check_rows(rows: int, layout: Layout) -> None:
    """Raise if ``rows`` batch rows do not divide over the layout's data axis."""
    if rows % layout.data_size:
        raise ValueError(
            f"a batch of {rows} rows does not divide over the mesh's data axis ({layout.data_size} devices); "
            "pad it to a multiple (Transcriber does this itself)"
        )


def put_batch(x, layout: Layout | None):
    """A host or device batch (leading axis = rows) placed with rows over ``data`` (on the device without a layout).
    A single row is replicated (one input runs whole on every device of the data axis, weights still split)."""
    if layout is None:
        return x if isinstance(x, jax.Array) else jax.device_put(np.asarray(x))
    if np.shape(x)[0] == 1:
        return jax.device_put(x, NamedSharding(layout.mesh, PartitionSpec()))
    check_rows(np.shape(x)[0], layout)
    return jax.device_put(x, layout.batch_sharding(np.ndim(x)))


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
