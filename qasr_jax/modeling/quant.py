"""How the model's matmuls run at each precision, and int8 weights for the encoder's and decoder's layers.

Every matmul of the model is :func:`matmul` (``Linear``, the tied head, nothing else):

* float32: a plain dot, as the parity tests pin it.
* bfloat16 (any half-precision operands): bf16 x bf16 with float32 accumulation (``preferred_element_type``),
  rounded to bf16 once at the end. On XLA:CPU this is the fast form: a bf16 dot with a bf16 result runs at a
  fraction of the speed, and so does a one-row bf16 dot (XLA converts the whole weight matrix to float32 first),
  so a single row is padded to two. The products of two bf16 numbers are exact in float32, so the result is the
  float32 dot of the same bf16 values up to summation order.
* int8 (a kernel stored as int8 with a float32 ``scale`` per output feature, see :func:`quantize_params`): each
  row of activations is quantized on the fly with its own scale (max |x| / 127), multiplied int8 x int8 -> int32
  and rescaled. XLA:CPU has no fast path for a float activation times int8 weights (the weights are converted in
  memory first, 1-2 GB/s), while int8 x int8 -> int32 streams the weights at the rate of a bf16 dot with a quarter
  of float32's bytes. One row is padded to two here too.

Measured on AMD EPYC family 26 (see benchmarks/RESULTS.md, "Precision on CPU").
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

QUANTIZE_MODES = ("int8",)
SCALE = "_scale"  # a quantized parameter ``name`` has its per-feature scales beside it as ``name + SCALE``


def _pad_one_row(x: jax.Array, lead: int) -> tuple[jax.Array, bool]:
    """A single row (all ``lead`` leading axes of size 1) padded with a zero row on axis 0, on CPU only."""
    rows = int(np.prod(x.shape[:lead]))
    if rows != 1 or jax.default_backend() != "cpu":
        return x, False
    return jnp.concatenate([x, jnp.zeros_like(x)], axis=0), True


def matmul(x: jax.Array, kernel: jax.Array, in_axis: int = 0, scale: jax.Array | None = None,
           out_dtype=None) -> jax.Array:
    """x (..., in) times kernel over its axis ``in_axis`` -> (..., kernel's other axes) in ``out_dtype`` (default:
    x's dtype). ``scale`` (kernel's other axes) marks an int8 kernel."""
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    lead = x.ndim - 1
    dims = (((lead,), (in_axis,)), ((), ()))
    if scale is not None:
        return _int8_matmul(x, kernel, scale, dims, out_dtype)
    if x.dtype == jnp.float32:
        return jax.lax.dot_general(x, kernel.astype(x.dtype), dims).astype(out_dtype)
    xp, padded = _pad_one_row(x, lead)
    y = jax.lax.dot_general(xp, kernel.astype(x.dtype), dims, preferred_element_type=jnp.float32)
    return (y[:1] if padded else y).astype(out_dtype)


def _int8_matmul(x, values, scale, dims, out_dtype):
    lead = x.ndim - 1
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)  # (..., 1): one scale per token
    x_scale = amax / 127.0
    xq = jnp.round(x32 / jnp.where(amax > 0, x_scale, 1.0)).astype(jnp.int8)
    xq, padded = _pad_one_row(xq, lead)
    acc = jax.lax.dot_general(xq, values, dims, preferred_element_type=jnp.int32)
    acc = acc[:1] if padded else acc
    x_scale = x_scale.reshape(x.shape[:-1] + (1,) * (acc.ndim - lead))
    return (acc.astype(jnp.float32) * x_scale * scale).astype(out_dtype)


class Linear(nn.Module):
    """A projection over the last axis: kernel (in, *features), optional bias; every matmul of the model is one.

    Parameters are stored in ``dtype``, the product runs on operands in ``dtype``; the result is in ``out_dtype``
    (default: ``dtype``). An int8 kernel (``qasr_jax.modeling.quant.quantize_params``) brings its per-feature scales.
    """

    features: int | tuple[int, ...]
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    out_dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        init = nn.initializers.lecun_normal(in_axis=0, out_axis=tuple(range(1, 1 + len(features))))
        kernel = self.param("kernel", init, (x.shape[-1], *features), self.dtype)
        scale = self.param("kernel" + SCALE, nn.initializers.ones, features) if kernel.dtype == jnp.int8 else None
        y = matmul(x.astype(self.dtype), kernel, 0, scale, self.out_dtype or self.dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, features, self.dtype)
        return y


class Embedding(nn.Module):
    """Token embedding table (vocab, hidden), also the tied LM head; int8 with a scale per row when quantized."""

    vocab: int
    features: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embedding = self.param("embedding", nn.linear.default_embed_init, (self.vocab, self.features), self.dtype)
        quantized = self.embedding.dtype == jnp.int8
        self.scale = self.param("embedding" + SCALE, nn.initializers.ones, (self.vocab,)) if quantized else None

    def __call__(self, ids):
        rows = jnp.take(self.embedding, ids, axis=0)
        if self.scale is None:
            return rows.astype(self.dtype)
        return (rows.astype(jnp.float32) * jnp.take(self.scale, ids, axis=0)[..., None]).astype(self.dtype)

    def attend(self, hidden):
        """hidden (..., hidden) -> float32 logits (..., vocab), contracting the table's own last axis (``@ table.T``
        made XLA copy the whole matrix)."""
        return matmul(hidden, self.embedding, 1, self.scale, jnp.float32)


def quantize(w: jax.Array, in_axis: int = 0) -> tuple[jax.Array, jax.Array]:
    """A weight -> (int8 values, float32 scale per output feature: w's shape without ``in_axis``), symmetric."""
    w32 = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=in_axis, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    values = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
    return values, jnp.squeeze(scale, in_axis)


DECODER_KERNELS = ("qkv", "o", "gate_up", "down")
ENCODER_KERNELS = ("q", "k", "v", "o", "fc1", "fc2")


def quantize_params(params: dict, cfg, mode: str = "int8") -> dict:
    """The matmul weights of every decoder layer (q|k|v, o, gate|up, down) and of every audio encoder layer (q, k, v,
    o, fc1, fc2), and the LM head, as int8 with a float32 scale per output feature; the encoder's convolutions and
    their output projection, the projector, norms, biases and an aligner's class head are left as they are.

    The encoder's layers are compute-bound (a row per audio token): there int8 x int8 products run several times
    faster than float32 ones on CPU (the random ASR-0.6B's encoder on an 11.3 s clip 417 -> 287 ms, tiny-en's
    held-out WER unchanged; benchmarks/RESULTS.md).

    For a tied head the embedding table itself is quantized (one scale per vocabulary row); token lookups scale
    their rows back. Returns a new tree; ``params`` is not changed.
    """
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES} or None, got {mode!r}")
    if is_quantized(params):
        raise ValueError("these parameters are quantized already; pass quantize=None")
    quantize_jit = jax.jit(quantize, static_argnums=1)

    def layers(tree: dict, kernels: tuple[str, ...]) -> dict:
        tree = dict(tree)
        for name, layer in tree.items():
            if name.startswith("layers_"):
                quantized = {k: dict(zip(("kernel", "kernel" + SCALE), quantize_jit(layer[k]["kernel"], 0)))
                             for k in kernels}
                tree[name] = {**layer, **{k: {**layer[k], **quantized[k]} for k in kernels}}
        return tree

    out = {**params, "audio_tower": layers(params["audio_tower"], ENCODER_KERNELS)}
    dec = layers(params["decoder"], DECODER_KERNELS)
    if not cfg.is_aligner and cfg.text.tie_word_embeddings:
        values, scale = quantize_jit(dec["embed"]["embedding"], 1)
        dec["embed"] = {"embedding": values, "embedding" + SCALE: scale}
    elif not cfg.is_aligner:
        values, scale = quantize_jit(params["lm_head"]["kernel"], 0)
        out["lm_head"] = {"kernel": values, "kernel" + SCALE: scale}
    out["decoder"] = dec
    return out


def cast_params(params, dtype) -> dict:
    """Every parameter as a ``dtype`` jax array, except int8 values and their scales (kept int8 and float32)."""

    def cast(path, x):
        name = getattr(path[-1], "key", "")
        keep = name.endswith(SCALE) or getattr(x, "dtype", None) == jnp.int8
        want = x.dtype if keep else jnp.dtype(dtype)
        if isinstance(x, jax.Array):
            return x if x.dtype == want else x.astype(want)
        return jax.device_put(np.asarray(x, want))  # host arrays: cast on the host, then transferred

    return jax.tree_util.tree_map_with_path(cast, params)


def is_quantized(params) -> bool:
    """Whether a parameter tree holds int8 kernels (from :func:`quantize_params`)."""
    return any(getattr(x, "dtype", None) == jnp.int8 for x in jax.tree_util.tree_leaves(params))
