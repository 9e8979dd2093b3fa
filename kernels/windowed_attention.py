"""Block-diagonal windowed attention over a padded batch, as the AuT encoder uses it.

Each audio's tokens are cut into windows of ``window`` tokens counted from the audio's start (the last window
may be shorter); a query attends to the keys of its own window that are valid (``position < length``). The mask is
described by structure (window length, per-item valid length) and never materialised as a (T x T) array, so cost
and memory are linear in the sequence length.

Implementations, chosen with ``impl``:
- ``"xla"``: :func:`windowed_attention_reference`, pure jnp, any backend (the parity reference).
- ``"pallas"``: the Pallas kernel of the current backend: ``gpu_attention`` (Triton) on GPU, ``tpu_attention``
  (Mosaic) on TPU. There is no CPU kernel: on CPU this raises unless ``interpret=True``, which runs the GPU kernel
  in the Pallas interpreter (slow; for tests).
- ``"auto"``: the kernel where it applies (GPU or TPU; float32, bfloat16 or float16; a supported head_dim),
  otherwise XLA. On CPU it silently uses XLA (there is nothing to fall back from); on GPU/TPU an unsupported input
  falls back with a warning, once per reason.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from qasr_jax.kernels._window_layout import KERNEL_DTYPES

IMPLS = ("auto", "xla", "pallas")
KERNEL_BACKENDS = ("gpu", "tpu")
_warned_reasons: set[str] = set()


def _pad_to_windows(x: jax.Array, window: int) -> jax.Array:
    pad = (-x.shape[1]) % window
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    return x


def windowed_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, window: int
) -> jax.Array:
    """Pure-jnp windowed attention: q, k, v (batch, seq, heads, head_dim), lengths (batch,) -> like q.

    Softmax runs in float32; rows at or past ``lengths`` come out as zeros.
    """
    batch, seq, heads, head_dim = q.shape
    # (batch, windows, window, heads, head_dim)
    qw, kw, vw = (_pad_to_windows(x, window).reshape(batch, -1, window, heads, head_dim) for x in (q, k, v))
    n_windows = qw.shape[1]
    pos = jnp.arange(n_windows * window).reshape(n_windows, window)  # (windows, window)
    valid = pos[None] < lengths[:, None, None]  # (batch, windows, window)
    scores = jnp.einsum("bwqhd,bwkhd->bwhqk", qw, kw, preferred_element_type=jnp.float32)
    scores = scores * (head_dim**-0.5)
    scores = jnp.where(valid[:, :, None, None, :], scores, -jnp.inf)
    # A window with no valid key (all padding) would give NaN; give it zeros instead.
    any_valid = valid.any(-1)[:, :, None, None, None]
    probs = jax.nn.softmax(jnp.where(any_valid, scores, 0.0), axis=-1)
    out = jnp.einsum("bwhqk,bwkhd->bwqhd", probs.astype(v.dtype), vw, preferred_element_type=jnp.float32)
    out = jnp.where(valid[..., None, None], out, 0.0).astype(q.dtype)
    return out.reshape(batch, n_windows * window, heads, head_dim)[:, :seq]


def kernel_unsupported_reason(backend: str, dtype, head_dim: int) -> str | None:
    """Why the Pallas kernel of ``backend`` ("gpu" or "tpu") cannot take these inputs, or None if it can."""
    if jnp.dtype(dtype) not in KERNEL_DTYPES:
        return f"the Pallas kernels take float32, bfloat16 or float16, not {jnp.dtype(dtype).name}"
    if backend == "tpu" and head_dim not in (64, 128, 256):
        return f"the TPU kernel takes head_dim 64, 128 or 256 (lane-aligned), not {head_dim}"
    if head_dim % 8 or not 8 <= head_dim <= 256:
        return f"the GPU kernel takes head_dim a multiple of 8 up to 256, not {head_dim}"
    return None


def _warn_once(reason: str) -> None:
    if reason not in _warned_reasons:
        _warned_reasons.add(reason)
        warnings.warn(f"windowed_attention(impl='auto') falls back to XLA: {reason}", stacklevel=3)


def windowed_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    window: int,
    *,
    impl: str = "xla",
    interpret: bool = False,
) -> jax.Array:
    """Windowed attention with the chosen implementation ("auto", "xla" or "pallas"); see the module docstring.

    q, k, v (batch, seq, heads, head_dim) of one dtype, lengths (batch,) int -> (batch, seq, heads, head_dim).
    ``interpret=True`` runs the Pallas kernel in the interpreter (the GPU kernel on CPU), for testing.
    """
    if impl not in IMPLS:
        raise ValueError(f"attention_impl must be one of {IMPLS}, got {impl!r}")
    if impl == "xla":
        return windowed_attention_reference(q, k, v, lengths, window)
    platform = jax.default_backend()
    if platform not in KERNEL_BACKENDS and not interpret:
        if impl == "auto":  # CPU: XLA is the only implementation, nothing to warn about
            return windowed_attention_reference(q, k, v, lengths, window)
        raise ValueError(
            f"attention_impl='pallas' has no kernel for the {platform!r} backend: the Pallas kernels are compiled "
            "for GPU (Triton) and TPU (Mosaic). Use attention_impl='xla' (or 'auto'), or pass interpret=True to run "
            "the GPU kernel in the Pallas interpreter for testing."
        )
    backend = platform if platform in KERNEL_BACKENDS else "gpu"
    if not (q.dtype == k.dtype == v.dtype):
        reason = f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    else:
        reason = kernel_unsupported_reason(backend, q.dtype, q.shape[-1])
    if reason is not None:
        if impl == "pallas":
            raise ValueError(f"attention_impl='pallas': {reason}; use attention_impl='auto' or 'xla'")
        _warn_once(reason)
        return windowed_attention_reference(q, k, v, lengths, window)
    if backend == "tpu":
        from qasr_jax.kernels.tpu_attention import windowed_attention_tpu as kernel
    else:
        from qasr_jax.kernels.gpu_attention import windowed_attention_gpu as kernel
    return kernel(q, k, v, lengths, window, interpret=interpret)
